"""DeSAP in vLLM's Qwen2.5-VL (``vllm.model_executor.models.qwen2_5_vl``). Each image becomes
at most ``keep`` tokens (``sequence.image_budget``; an image with no more passes whole), and so
does each video, its frames competing for one budget (kept tokens in frame-major order), as in
``apply_desap``. They are chosen and merged inside ``embed_multimodal`` from vLLM's own vision
encoder (``qwen_tower``), which runs in micro-batches within vLLM's encoder budget
(``model.encoder_batches``). The kept tokens keep their original 3D rotary positions (a video's
time scaled by ``second_per_grid_ts`` and ``tokens_per_second``); ``mrope`` explains how vLLM is
told them after the encoder has run (V1 and V2 model runners alike).
"""
from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLMultiModalProcessor

from ...methods import TokenGrid
from ..common.pruning import tower_reads
from . import qwen
from .hooks import registered_class
from .model import registered_with
from .mrope import Media, media_positions, prompt_positions, with_position_channels
from .options import DesapOptions
from .qwen import DesapQwenModelMixin, DesapQwenProcessorMixin


def check(hf_config, options: DesapOptions) -> None:
    """Refuse at start-up what cannot run. An image's token count depends on its size, so
    ``keep`` is checked per request (the processor)."""
    for name in ("image_token_id", "video_token_id"):
        if not isinstance(getattr(hf_config, name, None), int):
            raise ValueError(f"DeSAP in vLLM's Qwen2.5-VL needs the config's {name}")
    if not getattr(hf_config.vision_config, "fullatt_block_indexes", None):
        raise ValueError("DeSAP reads Qwen2.5-VL's last full-attention block; vision_config.fullatt_block_indexes "
                         "is empty")


def check_engine(vllm_config) -> None:
    """The engine settings Qwen2.5-VL refuses (``qwen.check_engine``)."""
    qwen.check_engine(vllm_config, "Qwen2.5-VL")


def medium_positions(config, modality: str, grid, seconds: float | None) -> torch.Tensor:
    """An image's or video's full (4, N) positions (``mrope.media_positions``) from its (t, h, w)
    patch ``grid`` and, for a video, its ``second_per_grid_ts`` (None: 1), its time scaled as vLLM's
    ``iter_mm_grid_thw`` scales it; for the model and the processor alike."""
    t, h, w = (int(n) for n in grid)
    merge = config.vision_config.spatial_merge_size
    per_second = getattr(config.vision_config, "tokens_per_second", 1.0)
    t_factor = 1.0 if modality == "image" else per_second * (1.0 if seconds is None else seconds)
    return media_positions(t, h // merge, w // merge, t_factor)


class DesapQwen2_5_VLProcessor(DesapQwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor with DeSAP's placeholders (``qwen.DesapQwenProcessorMixin``)."""

    def desap_medium_positions(self, modality: str, item) -> torch.Tensor:
        seconds = item.get("second_per_grid_ts") if modality == "video" else None
        return medium_positions(self.info.get_hf_config(), modality, item[f"{modality}_grid_thw"].data.tolist(),
                                None if seconds is None else float(seconds.data))


@registered_with(DesapQwen2_5_VLProcessor, "Qwen2_5_VLForConditionalGeneration")
class DesapQwen2_5_VLForConditionalGeneration(DesapQwenModelMixin, registered_class("Qwen2_5_VLForConditionalGeneration")):
    """vLLM's Qwen2.5-VL with DeSAP in ``embed_multimodal`` and in its M-RoPE positions."""

    desap_family = "Qwen2.5-VL"
    # vLLM's own pixel normalization on the device stays on (raw 8-bit pixels cross to the tower):
    # ``random`` seeds from the order of each patch row's values (``signals.patch_content``), which
    # the raw and the normalized pixels share

    def desap_media(self, media, modality: str, texts, text_mask, options) -> list[torch.Tensor]:
        """Per image (or video): at most its request's ``keep`` tokens (``options``: one per item; a
        video's frames compete for one budget, as in ``apply_desap``), each followed by its position
        channels (``mrope``; a video's time scaled as vLLM's and transformers' Qwen2.5-VL scale it),
        from ``desap_tower_items``."""
        seconds = media.get("second_per_grid_ts")
        merge, out = self.visual.spatial_merge_size, []
        for i, (t, h, w), item in self.desap_tower_items(media, modality, tower_reads(options)):
            result = self.desap_prune(item.map(lambda tensor: tensor[None]), texts[i:i + 1], text_mask[i:i + 1],
                                      self.desap_budget(options[i], item.hidden.shape[0]), options[i],
                                      TokenGrid(((t, h // merge, w // merge),)))
            full = medium_positions(self.config, modality, (t, h, w), None if seconds is None else float(seconds[i]))
            out.append(with_position_channels(result.tokens[0], full[:, result.indices[0].cpu()]))
        return out

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.desap is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        media = [Media(offset, feature.mm_position.length, media_positions(t, h, w, t_factor))
                 for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features))]
        return prompt_positions(len(input_tokens), media)
