"""DeSAP's signals from vLLM's own Qwen vision encoders (Qwen2.5-VL's
``Qwen2_5_VisionTransformer``; the Qwen3 generation's ``qwen3_vl.Qwen3_VisionTransformer``, which
Qwen3-VL, Qwen3.5 and their MoE share), read as the transformers path reads them
(``integrations/hf/qwen2_5_vl.py``, ``integrations/hf/qwen3_vl.py``): at the last full-attention block
(Qwen3: every block is one, so the last), the attention each language-model token receives (its
2 x 2 patches summed: ``common.signals.merged_saliency``, the fold both engines share) and the
attention branch mapped by the model's own patch merger.

Qwen2.5-VL's encoder runs in window order. One encoder-metadata dict, computed here and passed to
the encoder, gives the per-image segments and the permutation back to the model's order (Qwen3's
runs in the model's order and has none). The queries and keys are read as the block's attention
backend receives them, rotary already applied. Under tensor parallelism each rank holds some of the
heads: the received attention is averaged over all of them with one all-reduce
(``tower.mean_over_ranks``), so every rank keeps the same tokens.
"""
from __future__ import annotations

from typing import AbstractSet, Callable, Optional

import torch
from torch import nn

from ...methods import SIGNALS, Signal
from ..common.signals import (QWEN_MIDDLE, LayerTap, Taps, TowerCapture, TowerSignals, merged_keys, merged_saliency,
                              middle_block, patch_content, tower_pass, with_projected,
                              with_received)
from .tower import mean_over_ranks


def frame_segments(grid_thw: list[list[int]]) -> list[tuple[int, int]]:
    """(start, end) patch rows of each frame, the spans full attention runs over (frames stay
    contiguous in window order). Read from the grids, not from the metadata's ``cu_seqlens``,
    which some attention backends rewrite into their own offsets."""
    bounds = [0]
    for t, h, w in grid_thw:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return list(zip(bounds[:-1], bounds[1:]))


def saliency_block(visual: nn.Module) -> int:
    """The block DeSAP reads: the last full-attention one (every Qwen3 block attends fully)."""
    full = getattr(visual, "fullatt_block_indexes", None)
    return full[-1] if full else len(visual.blocks) - 1


def read_qwen_tower(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: list[list[int]],
                    reads: AbstractSet[str] = SIGNALS) -> TowerSignals:
    """Run ``visual`` on the images of ``grid_thw`` and read, per language-model token in the
    model's order (all images concatenated): hidden (T', C; Qwen3-VL: its DeepStack levels
    follow along the channels, as vLLM's tower returns them), branch (T', C), saliency (T',).
    Only the signals the methods ``reads`` (``common.signals.tower_pass``: without saliency and
    branch, hidden alone from a plain pass with no hooks), and the pixel hashes where they read the seed."""
    metadata = visual.prepare_encoder_metadata(grid_thw)

    def attention() -> nn.Module:
        return visual.blocks[saliency_block(visual)].attn

    order = metadata.get("reverse_indices")   # Qwen2.5-VL: window order -> model order

    def saliency(block: nn.Module, captured: TowerCapture) -> torch.Tensor:
        """The saliency at ``block`` (a full-attention one) from what its backend received."""
        return merged_saliency(
            captured.inputs["query"][0], captured.inputs["key"][0], frame_segments(grid_thw), block.attn.scale,
            visual.spatial_merge_unit, order, across_ranks(block))

    def across_ranks(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The mean over every head of every rank from this rank's mean over its heads (``block``'s shard)."""
        local_heads = block.num_attention_heads_per_partition
        return lambda mean: mean_over_ranks(mean, local_heads, local_heads * block.tp_size, block.tp_size)

    def read(hidden: torch.Tensor, captured: Optional[TowerCapture]) -> TowerSignals:
        if captured is None:
            return TowerSignals(hidden)
        branch = None
        if Signal.ATTN in reads:   # the merger on every patch's branch: only for a method that reads it
            branch = visual.merger(captured.attention)
            branch = branch if order is None else branch[order]
        keys = merged_keys(captured.inputs["key"][0], visual.spatial_merge_unit, order, across_ranks(attention())) \
            if Signal.KEYS in reads else None
        # the received attention (two attention passes at the block) only for a method that reads it
        read_saliency = reads & {Signal.SALIENCY, Signal.RECEIVED}
        return TowerSignals(hidden, branch, saliency(attention(), captured) if read_saliency else None, keys=keys)

    def middle() -> nn.Module:   # HiPrune's object block (a full-attention one)
        return visual.blocks[middle_block(len(visual.blocks), QWEN_MIDDLE,
                                          getattr(visual, "fullatt_block_indexes", None))].attn

    # the backend (attention().attn) receives the queries and keys by name, rotary already applied
    signals, _ = tower_pass(reads, lambda: visual(pixel_values, grid_thw=grid_thw, encoder_metadata=metadata),
                            lambda: Taps(attention=attention(), inputs=attention().attn), read,
                            lambda signals: patch_content(pixel_values, visual),
                            LayerTap(lambda: Taps(inputs=middle().attn), lambda captured: saliency(middle(), captured)))
    # the merged tokens are the language model's rows; the saliency is the attention they receive
    return with_received(with_projected(signals, reads), reads)
