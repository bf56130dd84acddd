"""DeSAP's signals from vLLM's own CLIP tower (``vllm.model_executor.models.clip``).

vLLM's CLIP attention fuses the query, key and value projections into one ``qkv_proj`` and, under
tensor parallelism, each rank holds ``num_heads / tp`` of the heads. Hooks on the feature layer
(``common.signals.capture``) read the local queries and keys (out of ``qkv_proj``) and the attention
branch (the output of ``self_attn``, whose row-parallel ``out_proj`` has already summed the ranks).
The [CLS] saliency is a mean over all heads: each rank sums its own heads' softmax rows, one
all-reduce adds the ranks, and every rank divides by the head count, so all ranks hold the same saliency
and keep the same tokens.
"""
from __future__ import annotations

from typing import AbstractSet, Optional

import torch
from torch import nn

from ...methods import SIGNALS, Signal
from ..common.signals import (CLIP_MIDDLE, LayerTap, Taps, TowerCapture, TowerSignals, cls_attention, frame_content,
                              head_mean, image_received, middle_block, tower_pass)


def mean_over_ranks(local_mean: torch.Tensor, local_heads: int, heads: int, tp_size: int) -> torch.Tensor:
    """A mean over all ``heads`` from each rank's mean over its ``local_heads``: one all-reduce of
    the sums, then every rank divides by ``heads``, so all ranks hold the same float32 values."""
    if tp_size == 1:
        return local_mean   # the same float32 operations as the transformers path
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(local_mean * local_heads) / heads


def cls_saliency(qkv: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """(B, T) float32 [CLS] attention averaged over every head of every rank, from one rank's fused
    (B, T, 3 * local heads * head size) projection output."""
    query, key, _ = qkv.chunk(3, dim=-1)
    local_heads = attention.num_heads_per_partition
    mean = cls_attention(query[:, 0], key, local_heads, attention.scale)
    return mean_over_ranks(mean, local_heads, attention.num_heads, getattr(attention, "tp_size", 1))


def received_saliency(qkv: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """(B, T) float32: the attention each token receives in its image (``Signal.RECEIVED``:
    ``common.signals.image_received``), averaged over every head of every rank, from one rank's
    fused projection output, as :func:`cls_saliency` averages the [CLS] attention."""
    query, key, _ = qkv.chunk(3, dim=-1)
    local_heads = attention.num_heads_per_partition
    mean = image_received(query, key, local_heads, attention.scale)
    return mean_over_ranks(mean, local_heads, attention.num_heads, getattr(attention, "tp_size", 1))


def head_mean_keys(qkv: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """(B, T, d) float32 keys averaged over every head of every rank (``Signal.KEYS``), from one
    rank's fused projection output, as :func:`cls_saliency` averages the saliency."""
    _, key, _ = qkv.chunk(3, dim=-1)
    local_heads = attention.num_heads_per_partition
    return mean_over_ranks(head_mean(key, local_heads), local_heads, attention.num_heads,
                           getattr(attention, "tp_size", 1))


def read_vllm_tower(tower: nn.Module, pixel_values: torch.Tensor, drop_cls: bool,
                    reads: AbstractSet[str] = SIGNALS) -> TowerSignals:
    """Run vLLM's CLIP ``tower`` (built up to the feature layer) on ``pixel_values`` and read the
    signals at its last layer ((B, T, .): the layer's output, its attention branch before the
    residual add, and the [CLS] saliency averaged over all heads of all ranks); ``drop_cls``
    removes [CLS] from all of them. Only the signals the methods ``reads``
    (``common.signals.tower_pass``): without saliency and branch the tower runs plainly, no hooks,
    and only its output is read."""
    def attention() -> nn.Module:
        return tower.vision_model.encoder.layers[-1].self_attn

    def read(hidden: torch.Tensor, captured: Optional[TowerCapture]) -> TowerSignals:
        if captured is None:
            return TowerSignals(hidden)
        saliency = cls_saliency(captured.qkv, attention())
        keys = head_mean_keys(captured.qkv, attention()) if Signal.KEYS in reads else None
        received = received_saliency(captured.qkv, attention()) if Signal.RECEIVED in reads else None
        return TowerSignals(hidden, captured.attention, saliency, keys=keys, received=received)

    def middle() -> nn.Module:   # HiPrune's object layer of the whole tower, at or before the feature layer
        layers = tower.vision_model.encoder.layers
        index = middle_block(tower.vision_model.config.num_hidden_layers, CLIP_MIDDLE)
        return layers[min(index, len(layers) - 1)].self_attn

    signals, _ = tower_pass(
        reads, lambda: tower(pixel_values, feature_select_strategy=None),
        lambda: Taps(attention=attention(), qkv=attention().qkv_proj), read,
        lambda signals: frame_content(pixel_values, signals.hidden.shape[1], signals.hidden.dtype),
        LayerTap(lambda: Taps(qkv=middle().qkv_proj), lambda captured: received_saliency(captured.qkv, middle())))
    return signals.map(lambda t: t[:, 1:]) if drop_cls else signals
