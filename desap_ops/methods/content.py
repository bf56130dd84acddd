"""A hash of the pixels, for methods that draw at random (``random``): the same image gives the
same seed in every run and in both engines, whatever device hashes it. Integer arithmetic only, so
the sum is exact in any order (int64 wraps around alike on every device).

:func:`content_rows` hashes the values' bits: both engines must hand it the same bits (the CLIP
towers, whose pixels the same processor normalizes in both). :func:`order_rows` hashes only the
order of the values within each channel of a row, which every strictly increasing per-channel map
keeps: the raw 8-bit levels vLLM ships when the tower normalizes on the device, and the normalized
pixels transformers' processor gives, in any formula whose float32 results keep the 256 levels
apart (tests/methods/test_method_builtins.py checks the Qwen processors' means and deviations)."""
from __future__ import annotations

import torch

_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ODD = 0x2545F4914F6CDD1D   # a large odd multiplier (< 2**63), so every position weighs differently


def _weights(count: int, device) -> torch.Tensor:
    return torch.arange(count, dtype=torch.int64, device=device) * _ODD + 1


def content_rows(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R,) int64: a hash of each row of ``pixels`` (R, ...) as ``dtype`` (the tower's dtype, what
    both engines feed it), from the values' bits."""
    values = pixels.detach().to(dtype).reshape(pixels.shape[0], -1).contiguous()
    bits = values.view(_INTEGER[values.element_size()]).long()
    return (bits * _weights(bits.shape[1], bits.device)).sum(dim=1)


def content_seeds(content: torch.Tensor) -> torch.Tensor:
    """(B,) int64 on the CPU, in [0, 2**63): one seed per image from its tokens' hashes ``content``
    (B, N), in token order."""
    mixed = (content.long() * _weights(content.shape[1], content.device)).sum(dim=1)
    return (mixed & (2**63 - 1)).cpu()


def order_rows(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """(R,) int64: a hash of each row of ``pixels`` (R, channels * L), laid out channel by channel
    (a Qwen patch row), from each value's dense rank among the distinct values of its row's
    channel. No read-back and no data-dependent shape: a sort along the row."""
    rows = pixels.detach().reshape(pixels.shape[0], channels, -1)
    values, order = rows.sort(dim=-1)
    steps = torch.ones_like(values, dtype=torch.int64)
    steps[..., 0] = 0
    steps[..., 1:] = (values[..., 1:] != values[..., :-1]).long()
    ranks = torch.empty_like(steps).scatter_(-1, order, steps.cumsum(-1)).reshape(pixels.shape[0], -1)
    return (ranks * _weights(ranks.shape[1], ranks.device)).sum(dim=1)
