"""DeSAP in vLLM's Qwen3-VL and Qwen3.5, dense and MoE (the classes vLLM's registry resolves:
``vllm.model_executor.models.qwen3_vl``, ``qwen3_vl_moe``, and ``qwen3_5`` up to vLLM 0.33,
``vllm.models.qwen3_5`` from 0.34; the four share the Qwen3 vision tower and its processor). Each image
becomes at most ``keep`` tokens, and so does each video, its frames competing for one budget (kept
tokens in frame-major order), as in ``apply_desap``. They are chosen and merged inside
``embed_multimodal`` from vLLM's own tower (``qwen_tower``: the last block's received attention,
its attention branch through the merger), in micro-batches within vLLM's encoder budget.

- DeepStack (Qwen3-VL): vLLM's tower returns each token's DeepStack levels after its features along
  the channels (``multiscale_dim``); every level is pruned with the same kept indices and merged
  with the same assignment as the features, and stays in that layout.
- Positions: kept tokens keep their original (t, h, w), placed after the encoder (``mrope``).
- Videos: the processor writes each frame's timestamp text and markers around its tokens. How
  many tokens each frame keeps is known only after the encoder, so a video's whole span is one run
  of ``<|video_pad|>`` placeholders as long as the pruned span (the prompt's ids differ from
  transformers' inside it, and only there), and the model writes every row of it: the timestamp and
  marker embeddings where transformers has that text, the kept tokens of each frame between its
  markers (vLLM's own EVS pruning makes its video spans embeddings for the same reason).
"""
from __future__ import annotations

import contextvars
import dataclasses
from typing import Sequence

import torch
from vllm.model_executor.models.qwen3_vl import Qwen3VLMultiModalProcessor

from ...methods import TokenGrid
from ...reference import merge_tokens
from ..common.pruning import tower_reads
from ..common.signals import TowerSignals
from . import qwen
from .hooks import QWEN3_ARCHITECTURES, registered_class
from .model import registered_with
from .mrope import Media, media_positions, span_positions, with_position_channels
from .options import DesapOptions, read_options
from .qwen import DesapQwenModelMixin, DesapQwenProcessorMixin

FAMILY = "Qwen3-VL and Qwen3.5"


def check(hf_config, options: DesapOptions) -> None:
    """Refuse at start-up what cannot run (``keep`` is checked per request: an image's token count
    depends on its size)."""
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if not isinstance(getattr(hf_config, name, None), int):
            raise ValueError(f"DeSAP in vLLM's Qwen3-VL and Qwen3.5 needs the config's {name}")


def check_engine(vllm_config) -> None:
    """The engine settings Qwen3-VL and Qwen3.5 refuse (``engine_checks``), as Qwen2.5-VL's."""
    qwen.check_engine(vllm_config, FAMILY)


def video_span(config, tokenizer, timestamps: Sequence[float], tokens_per_frame: Sequence[int]) -> list[int]:
    """A video's ids as the processor lays them out: per frame, its timestamp text, the start
    marker, its tokens, the end marker (vLLM's ``get_video_repl``, which transformers matches)."""
    return Qwen3VLMultiModalProcessor.get_video_repl(
        tokens_per_frame=list(tokens_per_frame), timestamps=list(timestamps), tokenizer=tokenizer,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        video_token_id=config.video_token_id).full


def medium_positions(config, tokenizer, modality: str, item) -> torch.Tensor:
    """An image's or video's full (4, N) positions (``mrope``: a video's over its whole span) from
    its processed fields (``item``: a field name to an element with ``.data``), for the model and
    the processor alike."""
    merge = config.vision_config.spatial_merge_size
    t, h, w = item[f"{modality}_grid_thw"].data.tolist()
    h, w = h // merge, w // merge
    if modality == "image":
        return media_positions(1, h, w)
    full = video_span(config, tokenizer, item["timestamps"].data, [h * w] * t)
    return span_positions(full, config.video_token_id, h, w)


# set while a DeSAP Qwen3 model builds its layers: the decoder layers ask ``mrope_positions_factor``
# with the config they are given, which for the MoE language model is its text config alone (no
# ``desap`` key), so the model being built, not that config, says whose cache it is
_BUILDING_DESAP = contextvars.ContextVar("building_desap_qwen3", default=False)


def size_rotary_cache() -> None:
    """Give DeSAP's Qwen3 models vLLM's rotary cache for pruned positions: in the module of each
    class vLLM's registry resolves for a Qwen3 architecture, which builds its decoder layers with
    ``mrope_positions_factor(vllm_config)`` (``hooks``), wrap that function to return at least
    ``qwen.ROTARY_FACTOR`` while a DeSAP model is being built (``DesapQwen3Mixin``). Every other
    model gets vLLM's factor; the model checks its caches' size at start-up
    (``qwen.check_rotary_cache``)."""
    import sys

    for architecture in QWEN3_ARCHITECTURES:
        module = sys.modules[registered_class(architecture).__module__]
        factor = module.mrope_positions_factor
        if hasattr(factor, "desap_wraps"):
            continue

        def for_desap(vllm_config, factor=factor) -> int:
            own = factor(vllm_config)
            return max(own, qwen.ROTARY_FACTOR) if _BUILDING_DESAP.get() else own

        for_desap.desap_wraps = factor
        module.mrope_positions_factor = for_desap


class DesapQwen3VLProcessor(DesapQwenProcessorMixin, Qwen3VLMultiModalProcessor):
    """vLLM's Qwen3-VL processor (Qwen3.5's too) with DeSAP's placeholders: an image's as every
    Qwen family's, a video's its whole pruned span (the model writes it)."""

    def desap_medium_positions(self, modality: str, item) -> torch.Tensor:
        return medium_positions(self.info.get_hf_config(), self.info.get_tokenizer(), modality, item)

    def desap_placeholders(self, out_mm_kwargs, modality: str, index: int) -> list[int]:
        if modality == "image":
            return super().desap_placeholders(out_mm_kwargs, modality, index)
        item = out_mm_kwargs[modality][index]
        t = int(item[f"{modality}_grid_thw"].data[0])
        budget = self.desap_item_budget(out_mm_kwargs, modality, index)
        # the pruned span's length, whichever frames keep the tokens
        span = video_span(self.info.get_hf_config(), self.info.get_tokenizer(), item["timestamps"].data,
                          [budget] + [0] * (t - 1))
        return [self.desap_media_tokens()["video"]] * len(span)


class DesapQwen3Mixin(DesapQwenModelMixin):
    """DeSAP over any of vLLM's Qwen3-generation classes (put before it in the bases)."""

    desap_family = FAMILY
    # vLLM's own pixel normalization on the device stays on (raw 8-bit pixels cross to the tower):
    # ``random`` seeds from the order of each patch row's values (``signals.patch_content``), which
    # the raw and the normalized pixels share

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        size_rotary_cache()   # before vLLM builds the decoder layers
        building = _BUILDING_DESAP.set(read_options(vllm_config.model_config.hf_config) is not None)
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            _BUILDING_DESAP.reset(building)

    def desap_media(self, media, modality: str, texts, text_mask, options) -> list[torch.Tensor]:
        """Per image (or video): its embeddings, each row followed by its position channels
        (``mrope``). An image: its kept tokens. A video: its whole span (``video_span``), the kept
        tokens of each frame between its markers, the text rows embedded as the language model
        embeds them (their DeepStack levels zero, as transformers adds none there)."""
        merge = self.visual.spatial_merge_size
        out = []
        for i, (t, h, w), item in self.desap_tower_items(media, modality, tower_reads(options)):
            tokens, kept = self.desap_prune_item(item, texts[i:i + 1], text_mask[i:i + 1], options[i],
                                                 TokenGrid(((t, h // merge, w // merge),)))
            if modality == "image":
                out.append(with_position_channels(tokens, media_positions(1, h // merge, w // merge)[:, kept]))
            else:
                out.append(self.desap_video_span(tokens, kept, (t, h // merge, w // merge), media["timestamps"][i]))
        return out

    def desap_prune_item(self, item: TowerSignals, texts, text_mask, options,
                         grid: TokenGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """One item's kept rows (K, C with its DeepStack levels after, as vLLM's tower lays them
        along the channels of ``item.hidden``) and their indices (CPU, ascending: frame-major for a
        video); ``grid``: where its tokens lie."""
        width, hidden = self.visual_dim, item.hidden
        features = hidden[:, :width]
        levels = hidden[:, width:].split(width, dim=1) if hidden.shape[1] > width else ()
        projected = None if item.projected is None else features   # the language model's rows: no levels
        signals = dataclasses.replace(item, hidden=features, projected=projected).map(lambda t: t[None])
        result = self.desap_prune(signals, texts, text_mask, self.desap_budget(options, features.shape[0]), options,
                                  grid)
        merged = [merge_tokens(level[None], result.indices, result.assignment, options.merges)[0] for level in levels]
        return torch.cat([result.tokens[0], *merged], dim=1), result.indices[0].cpu()

    def desap_video_span(self, tokens: torch.Tensor, kept: torch.Tensor, grid: tuple[int, int, int],
                         timestamps) -> torch.Tensor:
        """A video's span rows: transformers' pruned span (the full span without the dropped
        tokens), text rows embedded, the kept tokens in order, all at their full-span positions."""
        t, h, w = grid
        video = self.config.video_token_id
        full = torch.tensor(video_span(self.config, self._tokenizer, timestamps, [h * w] * t))
        is_video = full == video
        rows = ~is_video
        rows[is_video.nonzero()[:, 0][kept]] = True
        ids = full[rows]
        span = tokens.new_zeros(ids.shape[0], tokens.shape[1])
        text = self.get_language_model().embed_input_ids(ids[ids != video].to(tokens.device))
        span[ids != video, :text.shape[1]] = text.to(span.dtype)
        span[ids == video] = tokens
        return with_position_channels(span, span_positions(full.tolist(), video, h, w)[:, rows])

    def desap_media_layouts(self, input_tokens, mm_features) -> list[Media]:
        return [Media(feature.mm_position.offset, feature.mm_position.length,
                      medium_positions(self.config, self._tokenizer, feature.modality, feature.data))
                for feature in sorted(mm_features, key=lambda f: f.mm_position.offset)]


# each over the class vLLM's registry resolves for its architecture in the running release (vLLM 0.34
# moved Qwen3.5 to vllm.models.qwen3_5, whose CUDA classes are new code)
@registered_with(DesapQwen3VLProcessor, "Qwen3VLForConditionalGeneration")
class DesapQwen3VLForConditionalGeneration(DesapQwen3Mixin, registered_class("Qwen3VLForConditionalGeneration")):
    """vLLM's Qwen3-VL with DeSAP in ``embed_multimodal`` and in its M-RoPE positions."""


@registered_with(DesapQwen3VLProcessor, "Qwen3VLMoeForConditionalGeneration")
class DesapQwen3VLMoeForConditionalGeneration(DesapQwen3Mixin, registered_class("Qwen3VLMoeForConditionalGeneration")):
    """vLLM's Qwen3-VL-MoE with DeSAP, as Qwen3-VL."""


@registered_with(DesapQwen3VLProcessor, "Qwen3_5ForConditionalGeneration")
class DesapQwen3_5ForConditionalGeneration(DesapQwen3Mixin, registered_class("Qwen3_5ForConditionalGeneration")):
    """vLLM's Qwen3.5 with DeSAP, as Qwen3-VL (its tower has no DeepStack)."""


@registered_with(DesapQwen3VLProcessor, "Qwen3_5MoeForConditionalGeneration")
class DesapQwen3_5MoeForConditionalGeneration(DesapQwen3Mixin, registered_class("Qwen3_5MoeForConditionalGeneration")):
    """vLLM's Qwen3.5-MoE with DeSAP, as Qwen3-VL."""
