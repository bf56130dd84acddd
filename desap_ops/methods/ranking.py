"""The ranking rule the built-in methods share: the highest scores, ties to the lower index, NaN
last (the contract's order, ``reference.descending_rank``)."""
from __future__ import annotations

import torch

from .. import reference


def top_scores(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, K) ascending: the ``keep`` highest ``scores`` (B, N) per row, ties to the lower index, NaN last."""
    order = reference.descending_rank(scores.float()).argsort(dim=-1)
    return order[:, :keep].sort(dim=-1).values
