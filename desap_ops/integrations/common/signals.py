"""DeSAP's signals from a vision tower, for every family and both engines.

:class:`TowerSignals` is what a tower pass gives the operator, whichever engine read it. The rest
computes them. Hooks on the feature layer's attention module (:func:`capture`) capture:
- the attention branch: the attention module's output (after its output projection), before the
  layer adds it to the residual stream;
- the queries and keys, from the outputs of the query and key projections. [CLS] saliency is the
  softmax of the [CLS] query against all keys, averaged over heads: O(T) per head, so the attention
  implementation (eager, SDPA, flash) is left as it is and no T x T matrix is ever formed.

Encoders without [CLS] (the Qwen families) use :func:`received_attention` instead: the attention
each token receives, one block of queries at a time.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ...methods import Signal, content_rows, order_rows

TOWER_READS = frozenset({Signal.SALIENCY, Signal.ATTN})   # the signals that need the tower's attention captured


@dataclass(frozen=True)
class TowerSignals:
    """DeSAP's inputs from one pass of a vision tower. Every tensor has the same leading
    dimensions: (images or crops, tokens) for a CLIP-style tower, (tokens,) for a Qwen tower's
    items one after another. A signal the pruning method does not read (``common.pruning``) is
    None: a method that reads neither ``attn`` nor ``saliency`` runs the tower plainly. The fields
    carrying a signal are named by its :class:`~desap_ops.methods.Signal`."""

    hidden: torch.Tensor                       # (..., D): the tokens that are kept and merged
    attn: Optional[torch.Tensor] = None        # (..., D'): the attention branch (CLIP: before the projector; Qwen: through the merger)
    saliency: Optional[torch.Tensor] = None    # (...,) float32: [CLS] attention, or the attention a token receives
    levels: tuple[torch.Tensor, ...] = ()      # DeepStack levels (Qwen3-VL in transformers), row for row with hidden
    seed: Optional[torch.Tensor] = None        # (...,) int64: a hash of the pixels each token comes from (methods.content)

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> "TowerSignals":
        """``function`` applied to every tensor (an index, a reshape): the rows stay aligned."""
        def apply(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else function(t)
        return TowerSignals(function(self.hidden), apply(self.attn), apply(self.saliency),
                            tuple(function(level) for level in self.levels), apply(self.seed))

    def split(self, sizes: Sequence[int]) -> list["TowerSignals"]:
        """One :class:`TowerSignals` per part of the leading dimension (``sizes`` rows each)."""
        def parts(t: Optional[torch.Tensor]) -> Sequence[Optional[torch.Tensor]]:
            return [None] * len(sizes) if t is None else t.split(list(sizes))
        levels = [parts(level) for level in self.levels]
        return [TowerSignals(h, b, s, tuple(level[i] for level in levels), c)
                for i, (h, b, s, c) in enumerate(zip(parts(self.hidden), parts(self.attn), parts(self.saliency),
                                                     parts(self.seed)))]


def captures(reads: AbstractSet[str]) -> bool:
    """Whether a tower pass for a method reading ``reads`` must capture attention (saliency or
    the attention branch); otherwise the tower runs plainly."""
    return bool(reads & TOWER_READS)


def with_content(signals: TowerSignals, content: Callable[[], torch.Tensor], reads: AbstractSet[str]) -> TowerSignals:
    """``signals`` with their pixel hashes (``content()``, row for row) where the method reads the seed."""
    return replace(signals, seed=content()) if Signal.SEED in reads else signals


def frame_content(pixel_values: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) int64: the hash of each image's (crop's, frame's) pixels ``pixel_values`` (B, ...) as
    ``dtype``, for each of its ``tokens`` tokens."""
    return content_rows(pixel_values, dtype)[:, None].expand(-1, tokens)


def patch_content(pixels: torch.Tensor, visual: nn.Module) -> torch.Tensor:
    """(T',) int64: per language-model token of a Qwen tower ``visual``, the hash of the patch rows
    of ``pixels`` (T, patch) it merges (the processor lays each token's ``spatial_merge_unit`` rows
    out together), from the order of the values within each channel of a row
    (``methods.order_rows``). The tower normalizes each channel with an increasing affine map, so
    its raw 8-bit pixels (vLLM normalizing on the device) and the processor's normalized ones
    (transformers; vLLM normalizing on the CPU) give the same hash: the seed does not depend on
    where, or in which float formula, normalization ran. A row holds ``temporal_patch_size *
    patch_size ** 2`` values per channel (both engines' towers name them so)."""
    embed = visual.patch_embed
    channels = pixels.shape[1] // (embed.temporal_patch_size * embed.patch_size**2)
    return order_rows(pixels, channels).view(-1, visual.spatial_merge_unit).sum(dim=1)


@dataclass
class AttentionLayout:
    """Where the pieces of one self-attention module are."""

    attention: nn.Module      # returns the attention branch (a tensor or a tuple starting with it)
    query: nn.Module          # Linear producing the queries (B, T, H * d)
    key: nn.Module            # Linear producing the keys (B, T, H * d)
    num_heads: int
    scale: float


@dataclass
class CapturedSignals:
    attention_branch: Optional[torch.Tensor] = None   # (B, T, D)
    queries: Optional[torch.Tensor] = None            # (B, T, H * d)
    keys: Optional[torch.Tensor] = None               # (B, T, H * d)
    num_heads: int = 1
    scale: float = 1.0
    handles: list = field(default_factory=list)

    def cls_saliency(self, cls_index: int = 0) -> torch.Tensor:
        """(B, T) float32: attention of the [CLS] query to every token, averaged over heads."""
        return cls_attention(self.queries[:, cls_index], self.keys, self.num_heads, self.scale)


def cls_attention(query: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """softmax(q . k_t * scale) over t for one query per image, averaged over heads: (B, T) float32."""
    batch, tokens, width = keys.shape
    head_dim = width // num_heads
    q = query.float().view(batch, num_heads, 1, head_dim)
    k = keys.float().view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * scale          # (B, H, T)
    return logits.softmax(dim=-1).mean(dim=1)


QUERY_BLOCK_BYTES = 64 * 2**20   # bound on the scores of one block of queries


def received_attention(queries: torch.Tensor, keys: torch.Tensor, segments, scale: float) -> torch.Tensor:
    """(T,) float32: for each token, the mean over the queries of its segment of the softmax
    attention it receives, averaged over heads. queries, keys: (T, H, d)."""
    tokens, heads, _ = keys.shape
    out = torch.zeros(tokens, dtype=torch.float32, device=keys.device)
    for start, end in segments:
        k = keys[start:end].transpose(0, 1).float()                     # (H, n, d)
        block = max(1, QUERY_BLOCK_BYTES // (4 * heads * (end - start)))
        for first in range(start, end, block):
            q = queries[first:min(first + block, end)].transpose(0, 1).float()   # (H, b, d)
            weights = ((q @ k.transpose(1, 2)) * scale).softmax(dim=-1)           # (H, b, n)
            out[start:end] += weights.sum(dim=1).mean(dim=0)
        out[start:end] /= end - start
    return out


@contextmanager
def capture(layout: AttentionLayout) -> Iterator[CapturedSignals]:
    """Capture the signals of one forward pass through ``layout.attention``."""
    signals = CapturedSignals(num_heads=layout.num_heads, scale=layout.scale)

    def save(name):
        def hook(module, args, output):
            value = output[0] if isinstance(output, (tuple, list)) else output
            setattr(signals, name, value)
        return hook

    signals.handles = [
        layout.attention.register_forward_hook(save("attention_branch")),
        layout.query.register_forward_hook(save("queries")),
        layout.key.register_forward_hook(save("keys")),
    ]
    try:
        yield signals
    finally:
        for handle in signals.handles:
            handle.remove()
        signals.handles = []
