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

import dataclasses
import logging

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLMultiModalProcessor
from vllm.multimodal.processing import PromptReplacement

from ..sequence import image_budget
from .model import DesapModelMixin, encoder_batches, registered_with
from .mrope import (CHANNELS, Media, decode_fields, media_positions, place_media, prompt_positions,
                    prune_in_v2_runner, recompute_after_encoder, with_position_channels)
from .options import DesapOptions
from .processor import TEXT_KEY, VIDEO_TEXT_KEY, DesapProcessorMixin
from .qwen_tower import read_qwen_tower

log = logging.getLogger(__name__)


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
    """Refuse engine settings under which the kept tokens' positions or signals would be lost (the
    runner names the plugin hooks for positions are in ``hooks.HOOKS``, checked with the rest)."""
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("DeSAP on Qwen2.5-VL places the kept tokens' positions after the encoder, on the first "
                         "pipeline stage only: pipeline_parallel_size must be 1")
    if vllm_config.model_config.multimodal_config.video_pruning_rate:
        raise ValueError("DeSAP prunes Qwen2.5-VL's images and videos: it does not run together with "
                         "video_pruning_rate")
    if vllm_config.compilation_config.compile_mm_encoder:
        raise ValueError("DeSAP reads the vision encoder through hooks, which a compiled encoder skips: "
                         "turn compile_mm_encoder off")


class DesapQwen2_5_VLProcessor(DesapProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    def desap_image_token(self) -> int:
        return self.info.get_hf_config().image_token_id

    def desap_media_tokens(self) -> dict[str, int]:
        return {"image": self.desap_image_token(), "video": self.info.get_hf_config().video_token_id}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if self.desap is None:
            return updates
        keep, tokens = self.desap.keep, self.desap_media_tokens()
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def kept_placeholders(i: int, modality: str) -> list[int]:
            grid = out_mm_kwargs[modality][i][f"{modality}_grid_thw"].data
            # a video's frames share one budget; a small image or short video passes whole
            return [tokens[modality]] * image_budget(keep, int(grid.prod()) // merge**2)

        def kept(modality: str):
            return lambda i: kept_placeholders(i, modality)

        return [PromptReplacement(modality=update.modality, target=[tokens[update.modality]],
                                  replacement=kept(update.modality))
                if update.modality in tokens else update for update in updates]


@registered_with(DesapQwen2_5_VLProcessor, Qwen2_5_VLForConditionalGeneration)
class DesapQwen2_5_VLForConditionalGeneration(DesapModelMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with DeSAP in ``embed_multimodal`` and in its M-RoPE positions."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.desap is not None:
            check_engine(vllm_config)
            if vllm_config.use_v2_model_runner:
                prune_in_v2_runner()
            else:
                recompute_after_encoder()

    @property
    def desap_recomputes_mrope(self) -> bool:
        return self.desap is not None

    def desap_text_space(self, branch: torch.Tensor) -> torch.Tensor:
        return branch   # the tower reader already ran the patch merger

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        # the CUDA-graph encoder path would return unpruned features without positions
        return config if self.desap is None else dataclasses.replace(config, modalities=[])

    def embed_multimodal(self, **kwargs):
        if self.desap is None:
            return super().embed_multimodal(**kwargs)
        texts = {"image": kwargs.pop(TEXT_KEY, None), "video": kwargs.pop(VIDEO_TEXT_KEY, None)}
        embeddings = []
        for modality, media in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            embeddings += self.desap_media(media, modality, *self.desap_texts(texts[modality]))
        return tuple(embeddings)

    def desap_media(self, media, modality: str, texts, text_mask) -> list[torch.Tensor]:
        """Per image (or video): its at most ``keep`` tokens (a video's frames compete for one
        budget, as in ``apply_desap``), each followed by its position channels (``mrope``; a
        video's time scaled as vLLM's and transformers' Qwen2.5-VL scale it). The encoder runs on
        micro-batches within vLLM's encoder budget."""
        pixels_key = "pixel_values" if modality == "image" else "pixel_values_videos"
        if media["type"] != pixels_key:
            raise ValueError(f"DeSAP prunes from pixels; this request gave {media['type']}")
        grids = media[f"{modality}_grid_thw"].tolist()
        merge = self.visual.spatial_merge_size
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = media.get("second_per_grid_ts")
        # each video's time scale, as iter_mm_grid_thw reads it (images have none)
        t_factors = [1.0 if modality == "image" else per_second * (float(seconds[i]) if seconds is not None else 1.0)
                     for i in range(len(grids))]
        patches = [t * h * w for t, h, w in grids]
        sizes = [n // merge**2 for n in patches]
        starts = [sum(patches[:i]) for i in range(len(patches) + 1)]
        out = []
        for batch in encoder_batches(sizes, self.desap_encoder_budget):
            pixels = media[pixels_key][starts[batch.start]:starts[batch.stop]]
            signals = read_qwen_tower(self.visual, pixels, grids[batch.start:batch.stop])
            for i, parts in zip(batch, zip(*(s.split(sizes[batch.start:batch.stop]) for s in signals))):
                t, h, w = grids[i]
                hidden, branch, saliency = (p[None] for p in parts)
                result = self.desap_prune(type(signals)(hidden, branch, saliency), texts[i:i + 1], text_mask[i:i + 1],
                                          image_budget(self.desap.keep, sizes[i]))
                kept = media_positions(t, h // merge, w // merge, t_factors[i])[:, result.indices[0].cpu()]
                out.append(with_position_channels(result.tokens[0], kept))
        return out

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """vLLM's runners call this after the encoder with the embeddings of the scheduled window
        (V1: ``GPUModelRunner._gather_mm_embeddings``, V2: ``MultiModalPruner.recompute``): the
        embeddings without their position channels, the prompt's positions with each window
        embedding's placeholders at its tokens' own positions, and the position delta."""
        if self.desap is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        stripped = [embedding[:, :-CHANNELS] for embedding in multimodal_embeddings]
        try:
            fields = [decode_fields(embedding[:, -CHANNELS:]) for embedding in multimodal_embeddings]
            positions, delta = place_media(input_ids, fields, mrope_positions, num_computed_tokens,
                                           (self.config.image_token_id, self.config.video_token_id))
        except Exception:   # an exception here would take the engine down with every request in it
            log.warning("DeSAP M-RoPE: positions left as they were", exc_info=True)
            positions, delta = mrope_positions, int(mrope_positions.max()) + 1 - mrope_positions.shape[1]
        return stripped, positions, delta

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.desap is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        media = [Media(offset, feature.mm_position.length, media_positions(t, h, w, t_factor))
                 for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features))]
        return prompt_positions(len(input_tokens), media)
