"""What every DeSAP Qwen family in vLLM shares (Qwen2.5-VL, Qwen3-VL, Qwen3.5 and their MoE).

- :class:`DesapQwenProcessorMixin`, over :class:`processor.DesapProcessorMixin`: images and videos
  both pruned, each item's placeholders at its budget; a family whose video span mixes text with
  its tokens (Qwen3) overrides ``desap_placeholders``.
- :class:`DesapQwenModelMixin`, over :class:`model.DesapModelMixin`: the engine settings it
  refuses, the runner hooks that let it place the kept tokens' positions after the encoder
  (``mrope``), and its M-RoPE methods. A family supplies ``desap_media`` (its layout of a medium's
  embeddings, from ``desap_tower_items``) and ``desap_media_layouts`` (each medium's placeholders
  and positions on arrival; Qwen2.5-VL overrides ``get_mrope_input_positions`` itself instead,
  which the V2 runner test's stand-in binds alone)."""
from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import Iterator

import torch
from vllm.multimodal.processing import PromptReplacement

from ..common.pruning import tower_reads
from ..common.sequence import image_budget
from ..common.signals import TowerSignals
from .model import DesapModelMixin, encoder_batches
from .mrope import (CHANNELS, Media, decode_fields, medium_summary, place_media, prompt_positions,
                    recompute_after_encoder, rotary_reach)
from .options import DesapOptions
from .processor import OPTIONS_KEYS, TEXT_KEYS, DesapProcessorMixin
from .qwen_tower import read_qwen_tower

log = logging.getLogger(__name__)
# the rotary cache DeSAP's Qwen models are built with, in max_position_embeddings: vLLM's own factor for
# Qwen2.5-VL, and the one vLLM gives the Qwen3 generation for its own video pruning (qwen3_vl raises
# it for DeSAP too), because pruned tokens keep positions past the prompt's length
ROTARY_FACTOR = 4
SUMMARIES = 1 << 16   # media whose position summary a processor keeps, for items the processor cache holds


def rotary_positions(hf_config) -> int:
    """How many positions the rotary cache of a DeSAP Qwen model holds, at the least (the model
    checks its own at start-up, the processor refuses a request that would read past it)."""
    return int(hf_config.get_text_config().max_position_embeddings) * ROTARY_FACTOR


def check_rotary_cache(model, hf_config, family: str) -> None:
    """Refuse at start-up a model whose M-RoPE caches hold fewer positions than
    :func:`rotary_positions` (a release that sizes them otherwise: the processor would let through
    requests the cache cannot hold, and one would take the engine down)."""
    from vllm.model_executor.layers.rotary_embedding import MRotaryEmbedding

    from .hooks import SUPPORTED_VLLM, VllmVersionError

    sizes = {int(m.cos_sin_cache.shape[0]) for m in model.modules() if isinstance(m, MRotaryEmbedding)}
    needed = rotary_positions(hf_config)
    if not sizes or min(sizes) < needed:
        raise VllmVersionError(
            f"DeSAP's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)}: DeSAP on {family} needs M-RoPE caches "
            f"of {needed} positions (max_position_embeddings x {ROTARY_FACTOR}), this vLLM built "
            f"{sorted(sizes) or 'none'}")


def check_engine(vllm_config, family: str) -> None:
    """Refuse engine settings under which the kept tokens' positions or signals would be lost (the
    runner names the plugin hooks for positions are in ``hooks.HOOKS``, checked with the rest)."""
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(f"DeSAP on {family} places the kept tokens' positions after the encoder, on the first "
                         "pipeline stage only: pipeline_parallel_size must be 1")
    if vllm_config.model_config.multimodal_config.video_pruning_rate:
        raise ValueError(f"DeSAP prunes {family}'s images and videos: it does not run together with "
                         "video_pruning_rate")
    if vllm_config.compilation_config.compile_mm_encoder:
        raise ValueError("DeSAP reads the vision encoder through hooks, which a compiled encoder skips: "
                         "turn compile_mm_encoder off")
    if vllm_config.speculative_config is not None:
        # how a drafter would get the kept tokens' positions is untested
        raise ValueError(f"DeSAP on {family} places the kept tokens' M-RoPE positions after the encoder, which a "
                         "drafter is not given: speculative decoding (speculative_config) is not supported")
    lora = vllm_config.lora_config
    if lora is not None and lora.enable_tower_connector_lora:
        # vLLM would size the tower's LoRA batch by the pruned placeholders, not by the image's grid
        raise ValueError(f"DeSAP on {family} gives an image fewer placeholders than tower tokens: LoRA on the "
                         "vision tower and connector (enable_tower_connector_lora) is not supported")
    if vllm_config.model_config.enable_prompt_embeds:
        # the kept tokens' position channels ride on the embeddings; prompt embeddings beside them do not fit
        raise ValueError(f"DeSAP on {family} widens its media embeddings by their positions: enable_prompt_embeds is "
                         "not supported")


class DesapQwenProcessorMixin(DesapProcessorMixin):
    """Put before the vLLM Qwen processor class in the bases."""

    def desap_image_token(self) -> int:
        return self.info.get_hf_config().image_token_id

    def desap_media_tokens(self) -> dict[str, int]:
        return {"image": self.desap_image_token(), "video": self.info.get_hf_config().video_token_id}

    def desap_item_budget(self, out_mm_kwargs, modality: str, index: int) -> int:
        """Item ``index``'s budget under its request's ``keep``: a video's frames share one, and a
        small image or short video passes whole."""
        t, h, w = out_mm_kwargs[modality][index][f"{modality}_grid_thw"].data.tolist()
        unit = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        return image_budget(self.desap_item(out_mm_kwargs, modality, index).keep, t * h * w // unit)

    def desap_placeholders(self, out_mm_kwargs, modality: str, index: int) -> list[int]:
        """The prompt's placeholders of item ``index``: one per kept token."""
        return [self.desap_media_tokens()[modality]] * self.desap_item_budget(out_mm_kwargs, modality, index)

    def desap_medium_positions(self, modality: str, item) -> torch.Tensor:
        """Item's full (4, N) positions from its processed fields (``item``: a field name to an
        element with ``.data``), as the model lays them out (``mrope``)."""
        raise NotImplementedError

    @property
    def desap_summaries(self) -> OrderedDict:
        """Each recent item's ``mrope.medium_summary`` by its hash: an item the processor cache holds
        comes back from ``apply`` without its fields."""
        if "_desap_summaries" not in self.__dict__:
            self.__dict__["_desap_summaries"] = OrderedDict()
        return self.__dict__["_desap_summaries"]

    def apply(self, inputs, timing_ctx):
        result = super().apply(inputs, timing_ctx)
        if self.desap is None:
            return result
        media = self.desap_media_summaries(result)
        if media is None:   # an item cached by vLLM but no longer here: its fields, processed again
            result = super().apply(dataclasses.replace(inputs, cache=None), timing_ctx)
            media = self.desap_media_summaries(result)
        self.desap_check_positions(len(result["prompt_token_ids"]), media)
        return result

    def desap_media_summaries(self, result) -> list[Media] | None:
        """Each item of ``result`` (``apply``'s) as a Media of its ``mrope.medium_summary``; None if an
        item has neither its fields nor a summary here."""
        media, summaries = [], self.desap_summaries
        for modality, ranges in result["mm_placeholders"].items():
            if modality not in self.desap_media_tokens():
                continue
            for item, key, where in zip(result["mm_kwargs"].get(modality, ()), result["mm_hashes"][modality], ranges,
                                        strict=True):
                if item is not None:
                    summaries[key] = medium_summary(self.desap_medium_positions(modality, item))
                    while len(summaries) > SUMMARIES:
                        summaries.popitem(last=False)
                summary = summaries.get(key)
                if summary is None:
                    return None
                summaries.move_to_end(key)
                media.append(Media(where.offset, where.length, summary))
        return media

    def desap_check_positions(self, prompt_length: int, media: list[Media]) -> None:
        """Refuse (ValueError: a 400) a prompt whose tokens could run past the model's rotary cache,
        whichever tokens its media keep, up to max_model_len tokens: the worker would index past it
        and take the engine down."""
        config = self.info.get_hf_config()
        limit, max_model_len = rotary_positions(config), int(self.info.ctx.model_config.max_model_len)
        reach = rotary_reach(prompt_length, media, max_model_len)
        if reach >= limit:
            raise ValueError(
                f"DeSAP keeps each image's and video's tokens at their own rotary positions: this prompt of "
                f"{prompt_length} tokens reaches position {reach} by max_model_len {max_model_len}, past the model's "
                f"{limit} (max_position_embeddings {config.get_text_config().max_position_embeddings} x "
                f"{ROTARY_FACTOR}). Send fewer or smaller images or shorter videos (a smaller max_pixels), or "
                "serve with a smaller max_model_len")

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if self.desap is None:
            return updates

        def placeholders(modality: str):
            return lambda i: self.desap_placeholders(out_mm_kwargs, modality, i)

        return [PromptReplacement(modality=update.modality, target=update.target,
                                  replacement=placeholders(update.modality))
                if update.modality in self.desap_media_tokens() else update for update in updates]


class DesapQwenModelMixin(DesapModelMixin):
    """Put before the vLLM Qwen class in the bases; ``desap_family`` names it in errors."""

    desap_family = "Qwen"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.desap is not None:
            check_engine(vllm_config, self.desap_family)
            check_rotary_cache(self, vllm_config.model_config.hf_config, self.desap_family)
            recompute_after_encoder()   # in whichever runner the engine uses (never a field 0.34 lacks)

    @property
    def desap_recomputes_mrope(self) -> bool:
        return self.desap is not None

    def desap_text_space(self, branch: torch.Tensor) -> torch.Tensor:
        return branch   # the tower reader already ran the patch merger

    def desap_budget(self, options: DesapOptions, tokens: int) -> int:
        """An item's budget under its request's ``options`` (the one place the model reads ``keep``)."""
        return image_budget(options.keep, tokens)

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        # the CUDA-graph encoder path would return unpruned features without positions
        return config if self.desap is None else dataclasses.replace(config, modalities=[])

    def embed_multimodal(self, **kwargs):
        if self.desap is None:
            return super().embed_multimodal(**kwargs)
        texts = {modality: kwargs.pop(key, None) for modality, key in TEXT_KEYS.items()}
        options = {modality: kwargs.pop(key, None) for modality, key in OPTIONS_KEYS.items()}
        embeddings = []
        for modality, media in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            pixels_key = "pixel_values" if modality == "image" else "pixel_values_videos"
            if media["type"] != pixels_key:
                raise ValueError(f"DeSAP prunes from pixels; this request gave {media['type']}")
            count = len(texts[modality]) if texts[modality] is not None else 0   # a (I, L) tensor or I tensors
            items = self.desap_item_options(options[modality], count)
            text, text_mask = self.desap_texts(texts[modality], tower_reads(items))
            embeddings += self.desap_media(media, modality, text, text_mask, items)
        return tuple(embeddings)

    def desap_tower_items(self, media, modality: str,
                          reads: frozenset) -> Iterator[tuple[int, list[int], TowerSignals]]:
        """Each item of ``media`` as (index, its (t, h, w) patch grid, its signals (T', .)), read
        from vLLM's own tower (``qwen_tower``) run on micro-batches within vLLM's encoder budget
        (``model.encoder_batches``); only the signals the items' methods ``reads``."""
        pixels = media["pixel_values" if modality == "image" else "pixel_values_videos"]
        grids = media[f"{modality}_grid_thw"].tolist()
        patches = [t * h * w for t, h, w in grids]
        sizes = [n // self.visual.spatial_merge_size**2 for n in patches]
        starts = [sum(patches[:i]) for i in range(len(patches) + 1)]
        for batch in encoder_batches(sizes, self.desap_encoder_budget):
            signals = read_qwen_tower(self.visual, pixels[starts[batch.start]:starts[batch.stop]],
                                      grids[batch.start:batch.stop], reads)
            for i, item in zip(batch, signals.split(sizes[batch.start:batch.stop]), strict=True):
                yield i, grids[i], item

    def desap_media(self, media, modality: str, texts, text_mask, options) -> list[torch.Tensor]:
        """Per image (or video) of ``media``: its embeddings, each row followed by its position channels."""
        raise NotImplementedError

    def desap_media_layouts(self, input_tokens, mm_features) -> list[Media]:
        """Each medium's placeholders in the prompt and its full (4, N) positions (``mrope``)."""
        raise NotImplementedError

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.desap is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        return prompt_positions(len(input_tokens), self.desap_media_layouts(input_tokens, mm_features))

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
