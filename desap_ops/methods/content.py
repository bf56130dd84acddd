"""A hash of the pixels, for methods that draw at random (``random``): the same image gives the
same seed in every run and in both engines, whatever device hashes it. Integer arithmetic only, so
the sum is exact in any order (int64 wraps around alike on every device)."""
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
