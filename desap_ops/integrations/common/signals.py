"""DeSAP's signals from a vision tower, for every family and both engines.

:class:`TowerSignals` is what a tower pass gives the operator, whichever engine read it. The rest
computes them, once for every reader of both engines:

- :func:`tower_pass`, the skeleton of every reader: a plain pass where the method reads no
  attention, else one pass under :func:`capture`, then the pixel hashes where it reads the seed;
- :func:`capture`: forward hooks, for one pass, on the modules a reader names (:class:`Taps`),
  giving a :class:`TowerCapture`: the attention branch (the attention module's output, after its
  output projection, before the layer adds it to the residual stream) and the queries and keys
  (from the query and key projections, or a fused one);
- [CLS] saliency (:func:`cls_attention`): the softmax of the [CLS] query against all keys,
  averaged over heads: O(T) per head, so the attention implementation (eager, SDPA, flash) is left
  as it is and no T x T matrix is ever formed;
- encoders without [CLS] (the Qwen families): :func:`merged_saliency`, the attention each patch
  receives (:func:`received_attention`, the operator ``desap::received_attention``) summed per merged token,
  in the model's order;
- the attention each token of a CLIP-style image receives (``Signal.RECEIVED``, HiPrune's):
  :func:`image_received`, the same operator with one segment per image.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace
from typing import AbstractSet, Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, TypeVar

import torch
from torch import nn

from ...methods import Signal, content_rows, order_rows
from ...received import received_attention as received_attention_op

TOWER_READS = frozenset({Signal.SALIENCY, Signal.ATTN, Signal.KEYS, Signal.RECEIVED})   # read by attention hooks


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
    # (..., C): the rows the language model receives; the Qwen readers give hidden itself, and on
    # CLIP-style towers, whose projector runs after the family's own reshaping, common.pruning
    # projects hidden where the method reads them
    projected: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None        # (..., d): the saliency block's keys, mean over heads
    received: Optional[torch.Tensor] = None    # (...,) float32: the attention a token receives (HiPrune; Qwen: saliency)
    layer_received: Optional[torch.Tensor] = None  # (...,) float32: the same at a middle block (HiPrune)

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> "TowerSignals":
        """``function`` applied to every tensor (an index, a reshape): the rows stay aligned."""
        def apply(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else function(t)
        return TowerSignals(function(self.hidden), apply(self.attn), apply(self.saliency),
                            tuple(function(level) for level in self.levels), apply(self.seed), apply(self.projected),
                            apply(self.keys), apply(self.received), apply(self.layer_received))

    def split(self, sizes: Sequence[int]) -> list["TowerSignals"]:
        """One :class:`TowerSignals` per part of the leading dimension (``sizes`` rows each)."""
        def parts(t: Optional[torch.Tensor]) -> Sequence[Optional[torch.Tensor]]:
            return [None] * len(sizes) if t is None else t.split(list(sizes))
        levels = [parts(level) for level in self.levels]
        return [TowerSignals(h, b, s, tuple(level[i] for level in levels), c, p, k, r, m)
                for i, (h, b, s, c, p, k, r, m) in enumerate(zip(parts(self.hidden), parts(self.attn),
                                                                 parts(self.saliency), parts(self.seed),
                                                                 parts(self.projected), parts(self.keys),
                                                                 parts(self.received), parts(self.layer_received)))]


def captures(reads: AbstractSet[str]) -> bool:
    """Whether a tower pass for a method reading ``reads`` must capture attention (saliency, the
    attention branch, the keys or the received attention); otherwise the tower runs plainly."""
    return bool(reads & TOWER_READS)


def with_content(signals: TowerSignals, content: Callable[[], torch.Tensor], reads: AbstractSet[str]) -> TowerSignals:
    """``signals`` with their pixel hashes (``content()``, row for row) where the method reads the seed."""
    return replace(signals, seed=content()) if Signal.SEED in reads else signals


def with_received(signals: TowerSignals, reads: AbstractSet[str]) -> TowerSignals:
    """``signals`` of a tower whose saliency already is the attention each token receives (the Qwen
    towers: :func:`merged_saliency`), with that same tensor as ``received`` where the method reads it."""
    return replace(signals, received=signals.saliency) if Signal.RECEIVED in reads else signals


def with_projected(signals: TowerSignals, reads: AbstractSet[str]) -> TowerSignals:
    """``signals`` of a tower whose ``hidden`` already is what the language model receives (the
    Qwen towers: the merger's output), with that same tensor as ``projected`` where the method reads it."""
    return replace(signals, projected=signals.hidden) if Signal.PROJECTED in reads else signals


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


@dataclass(frozen=True)
class Taps:
    """Where a tower reader's hooks go for one pass (:func:`capture`): the module whose output
    fills the :class:`TowerCapture` field of the same name (the first element where it returns a
    tuple), and the module whose keyword arguments fill ``inputs``; None: not read."""

    attention: Optional[nn.Module] = None   # the attention module: its output is the attention branch
    query: Optional[nn.Module] = None       # the query projection
    key: Optional[nn.Module] = None         # the key projection
    qkv: Optional[nn.Module] = None         # a fused query, key and value projection
    inputs: Optional[nn.Module] = None      # a module whose keyword arguments are read (rotary tables, segments, ...)


@dataclass
class TowerCapture:
    """What one tower pass gave the modules of its :class:`Taps` (the last call of each), field for field."""

    attention: Optional[torch.Tensor] = None        # the attention branch, before the residual add
    query: Optional[torch.Tensor] = None
    key: Optional[torch.Tensor] = None
    qkv: Optional[torch.Tensor] = None
    inputs: Optional[Mapping[str, Any]] = None      # the keyword arguments of the ``inputs`` module


@contextmanager
def capture(taps: Taps) -> Iterator[TowerCapture]:
    """Hooks on the modules of ``taps`` while the block runs one tower pass; the hooks are removed
    when the block ends, also when the pass raises."""
    if not isinstance(taps, Taps):
        raise TypeError(f"capture needs the Taps of a tower's modules, got {type(taps).__name__}")
    captured = TowerCapture()

    def save(name: str):
        def hook(module, args, output):
            setattr(captured, name, output[0] if isinstance(output, (tuple, list)) else output)
        return hook

    def save_inputs(module, args, kwargs):
        captured.inputs = dict(kwargs)

    handles = []
    try:
        for tap in fields(Taps):
            module = getattr(taps, tap.name)
            if module is None:
                continue
            handles.append(module.register_forward_pre_hook(save_inputs, with_kwargs=True) if tap.name == "inputs"
                           else module.register_forward_hook(save(tap.name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


Output = TypeVar("Output")


class LayerTap(NamedTuple):
    """A second block a tower pass reads (HiPrune's middle block, ``Signal.LAYER_RECEIVED``): the
    :class:`Taps` of its modules, and the attention each token receives there, from their capture."""

    taps: Callable[[], Taps]
    received: Callable[[TowerCapture], torch.Tensor]


def tower_pass(reads: AbstractSet[str], run: Callable[[], Output], taps: Callable[[], Taps],
               read: Callable[[Output, Optional[TowerCapture]], TowerSignals],
               content: Callable[[TowerSignals], torch.Tensor],
               layer: Optional[LayerTap] = None) -> tuple[TowerSignals, Output]:
    """The one skeleton of every tower reader: ``run()`` the tower once, plainly where the method's
    ``reads`` need no attention (:func:`captures`; ``read`` then gets None), else under
    :func:`capture` of ``taps()``; ``read`` turns the tower's output and the capture into signals;
    the pixel hashes (``content(signals)``) are added where the method reads the seed. Where it
    reads ``Signal.LAYER_RECEIVED``, the same pass also captures the middle block of ``layer``
    (a ValueError where the reader names none). Returns the signals and the tower's output."""
    middle = Signal.LAYER_RECEIVED in reads
    if middle and layer is None:
        raise ValueError("this tower reader reads no middle block: the method's layer_received cannot be given")
    with ExitStack() as stack:
        captured = stack.enter_context(capture(taps())) if captures(reads) else None
        at_layer = stack.enter_context(capture(layer.taps())) if middle else None
        output = run()
    signals = read(output, captured)
    if at_layer is not None:
        signals = replace(signals, layer_received=layer.received(at_layer))
    return with_content(signals, lambda: content(signals), reads), output


def middle_block(blocks: int, share: float, full: Optional[Sequence[int]] = None) -> int:
    """The 0-based index of HiPrune's middle (object-centric) block of a tower of ``blocks``
    blocks: block ``round(share * blocks)`` counted from 1 (the authors' block 9 of CLIP-L/14's 24,
    16 of Qwen2.5-VL's 32), at least the first. ``full``: the full-attention blocks where only some
    attend over the whole image (Qwen2.5-VL), of which the last at or before it (else the first)."""
    index = max(0, round(share * blocks) - 1)
    if full:
        before = [b for b in full if b <= index]
        index = before[-1] if before else full[0]
    return index


CLIP_MIDDLE = 9 / 24    # HiPrune's object layer on CLIP-style towers: 9 of CLIP-L/14's 24
QWEN_MIDDLE = 16 / 32   # and on Qwen towers: 16 of Qwen2.5-VL's 32


@dataclass(frozen=True)
class AttentionLayout:
    """Where the pieces of one self-attention module with a [CLS] token are (CLIP, SigLIP, DINOv2)."""

    attention: nn.Module      # returns the attention branch (a tensor or a tuple starting with it)
    query: nn.Module          # Linear producing the queries (B, T, H * d)
    key: nn.Module            # Linear producing the keys (B, T, H * d)
    num_heads: int
    scale: float

    def taps(self) -> Taps:
        return Taps(attention=self.attention, query=self.query, key=self.key)

    def cls_saliency(self, captured: TowerCapture, cls_index: int = 0) -> torch.Tensor:
        """(B, T) float32: attention of the [CLS] query to every token, averaged over heads."""
        return cls_attention(captured.query[:, cls_index], captured.key, self.num_heads, self.scale)

    def received(self, captured: TowerCapture) -> torch.Tensor:
        """(B, T) float32: the attention each token receives in its image (:func:`image_received`)."""
        return image_received(captured.query, captured.key, self.num_heads, self.scale)


def cls_attention(query: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """softmax(q . k_t * scale) over t for one query per image, averaged over heads: (B, T) float32."""
    batch, tokens, width = keys.shape
    head_dim = width // num_heads
    q = query.float().view(batch, num_heads, 1, head_dim)
    k = keys.float().view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * scale          # (B, H, T)
    return logits.softmax(dim=-1).mean(dim=1)


def received_attention(queries: torch.Tensor, keys: torch.Tensor, segments: Sequence[tuple[int, int]],
                       scale: float) -> torch.Tensor:
    """(T,) float32: for each token, the mean over the queries of its segment of the softmax
    attention it receives, averaged over heads. queries, keys: (T, H, d); ``segments``: the
    (start, end) of each image or frame, one after another from 0 to T. The operator
    ``desap::received_attention`` (``desap_ops.received``: fused attention on the CPU, a Triton
    kernel on CUDA)."""
    boundaries = [0] + [int(end) for _, end in segments]
    starts = [int(start) for start, _ in segments]
    if starts != boundaries[:-1]:
        raise ValueError(f"received_attention: segments must follow one another from 0, got {list(segments)}")
    return received_attention_op(queries, keys, boundaries, float(scale))


def image_received(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """(B, T) float32: for each token of B images of T tokens ([CLS] included, as the block ran
    them), the softmax attention it receives, averaged over ``num_heads`` heads and over its
    image's T queries: what HiPrune's code reads on CLIP towers (``attentions.mean(1).mean(1)``),
    with no T x T matrix kept (:func:`received_attention`, one segment per image). queries, keys:
    (B, T, num_heads * d)."""
    batch, tokens, width = keys.shape
    shape = (batch * tokens, num_heads, width // num_heads)
    segments = [(i * tokens, (i + 1) * tokens) for i in range(batch)]
    return received_attention(queries.reshape(shape), keys.reshape(shape), segments, scale).view(batch, tokens)


def merged_saliency(queries: torch.Tensor, keys: torch.Tensor, segments, scale: float, merge_unit: int,
                    order: Optional[torch.Tensor] = None,
                    across_ranks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """(T',) float32, the saliency of a Qwen tower's language-model tokens: the attention each patch
    receives within its segment (:func:`received_attention`; queries, keys: (T, H, d) as the
    encoder ran them), averaged over every head of every rank by ``across_ranks`` (vLLM under
    tensor parallelism), summed over the ``merge_unit`` patches each token merges, and put back in
    the model's order by the index ``order`` (Qwen2.5-VL's encoder runs in window order; None:
    the encoder's order is the model's). The one entry point of this fold for both engines."""
    received = received_attention(queries, keys, segments, scale)
    if across_ranks is not None:
        received = across_ranks(received)
    saliency = received.view(-1, merge_unit).sum(dim=1)
    return saliency if order is None else saliency[order]


# --- the keys (Signal.KEYS, VisionZip's similarity) ------------------------------------------------

def head_mean(keys: torch.Tensor, num_heads: Optional[int]) -> torch.Tensor:
    """(..., d) float32: ``keys`` (..., H * d), or (..., H, d) when ``num_heads`` is None, averaged
    over the heads: VisionZip's key metric (the authors average the feature layer's keys over heads)."""
    if num_heads is not None:
        keys = keys.reshape(*keys.shape[:-1], num_heads, keys.shape[-1] // num_heads)
    return keys.float().mean(dim=-2)


def merged_keys(keys: torch.Tensor, merge_unit: int, order: Optional[torch.Tensor] = None,
                across_ranks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """(T', d) float32, the keys of a Qwen tower's language-model tokens: the block's keys (T, H, d)
    as its attention receives them (rotary applied), averaged over every head of every rank
    (``across_ranks``: vLLM under tensor parallelism), then over the ``merge_unit`` patches each
    token merges (the mean: the key of the 2 x 2 patches as one token, as the merger makes them
    one), put back in the model's order by ``order``. The one fold of both engines, as
    :func:`merged_saliency` is for the saliency."""
    mean = head_mean(keys, None)
    if across_ranks is not None:
        mean = across_ranks(mean)
    merged = mean.view(-1, merge_unit, mean.shape[-1]).mean(dim=1)
    return merged if order is None else merged[order]
