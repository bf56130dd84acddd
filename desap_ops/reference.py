"""Pure-PyTorch reference of DeSAP pruning: the oracle for the kernels and the CPU path.

Each function is one step of the contract (docs/contract.md) and reads as that step. Everything is vectorised over the
batch and the tokens (no Python loop over tokens), never synchronises with the device, and is
differentiable from ``tokens`` to ``hidden`` through ordinary PyTorch autograd.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .validation import check_inputs, split_budget

NORM_EPS = 1e-6


class PruneResult(NamedTuple):
    """What :func:`desap_ops.prune` returns."""

    tokens: torch.Tensor       # (B, K, D) hidden's dtype: kept tokens, merged when merge=True
    indices: torch.Tensor      # (B, K) int64, ascending: the kept token indices
    assignment: torch.Tensor   # (B, N) int64: output position of each token, -1 if dropped
    task_scores: torch.Tensor  # (B, N) float32: the decoupled-similarity task score


def floor_log2(magnitude: torch.Tensor) -> torch.Tensor:
    """int32 floor(log2 m) of float32 magnitudes from the exponent bits, clamped to [-126, 126]
    (zero and subnormals give -126; inf and NaN 126)."""
    exponent = (magnitude.float().view(torch.int32) >> 23) & 0xFF
    return (exponent - 127).clamp(-126, 126)


def power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2 ** exponent in float32, exactly, for int32 exponents in [-126, 127]."""
    return ((exponent + 127) << 23).view(torch.float32)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float32, scale-free (contract, step 1).

    Each row is first multiplied by a power of two that brings its largest magnitude into [1, 2):
    exact, and after it no square overflows or underflows, so any finite row gets its true
    direction. The norm is then clamped below at 1e-6, which only a row of zeros reaches.
    """
    x = x.float()
    if x.shape[-1] == 0:
        return x
    scale = power_of_two(-floor_log2(x.abs().amax(dim=-1, keepdim=True)))
    x = x * scale
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def decoupled_similarity(attn: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Step 1a: S[b, n, l] = cos(attn[b, n], text[b, l]) in float32, shape (B, N, L)."""
    return torch.bmm(unit_rows(attn), unit_rows(text).transpose(1, 2))


def task_scores(
    attn: torch.Tensor,
    text: torch.Tensor,
    text_mask: Optional[torch.Tensor] = None,
    text_reduce: str = "max",
) -> torch.Tensor:
    """Step 1b: reduce S over the valid text tokens ("max" or "mean"); -inf where none is valid.

    NaN propagates: a NaN similarity with a valid text token makes the score NaN.
    """
    sim = decoupled_similarity(attn, text)
    if text_mask is None:
        text_mask = torch.ones(sim.shape[0], sim.shape[2], dtype=torch.bool, device=sim.device)
    valid = text_mask[:, None, :]
    if text_reduce == "max":
        return sim.masked_fill(~valid, float("-inf")).amax(dim=-1)
    count = text_mask.sum(dim=-1, keepdim=True)                     # (B, 1)
    mean = sim.masked_fill(~valid, 0.0).sum(dim=-1) / count.clamp_min(1)
    return mean.masked_fill(count == 0, float("-inf"))


def descending_rank(scores: torch.Tensor, excluded: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank of each token, 0 = first chosen, along the last dim.

    Order: higher score first; ties go to the lower index; NaN below every number; ``excluded``
    tokens below NaN. Built from stable sorts, least significant key first.
    """
    nan = torch.isnan(scores)
    tier = nan.to(torch.int8)                                 # 0 number, 1 NaN, 2 excluded
    if excluded is not None:
        tier = torch.where(excluded, torch.full_like(tier, 2), tier)
    numbers = scores.masked_fill(nan, float("-inf"))
    order = torch.sort(numbers, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(-1, order), dim=-1, stable=True).indices
    order = order.gather(-1, by_tier)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def has_valid_text(text_mask: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
    if text_mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    return text_mask.any(dim=-1)


def select_tokens(
    saliency: torch.Tensor,
    scores: torch.Tensor,
    keep: int,
    task_ratio: float,
    has_text: torch.Tensor,
) -> torch.Tensor:
    """Steps 2-3: the kept indices (B, K), ascending.

    First the K_sal most salient tokens, then among the rest the K_task of highest task score.
    An image without valid text gives its whole budget to saliency (K_task = 0).
    """
    _, k_task = split_budget(keep, task_ratio)
    task_budget = torch.where(has_text, k_task, 0)[:, None]            # (B, 1)
    saliency_budget = keep - task_budget
    by_saliency = descending_rank(saliency.float()) < saliency_budget
    by_task = descending_rank(scores, excluded=by_saliency) < task_budget
    kept = by_saliency | by_task                                       # exactly K per row
    tokens = scores.shape[-1]
    positions = torch.arange(tokens, device=scores.device).expand_as(kept)
    return torch.sort(positions.masked_fill(~kept, tokens), dim=-1).values[:, :keep].contiguous()


def output_positions(indices: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, N) int64: the output position of each kept token, -1 for the others."""
    batch, keep = indices.shape
    positions = torch.full((batch, tokens), -1, dtype=torch.int64, device=indices.device)
    slots = torch.arange(keep, device=indices.device).expand(batch, keep)
    return positions.scatter_(1, indices, slots)


def nearest_kept(metric: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Step 4a: for every token, the kept position of highest cosine similarity of ``metric``.

    Ties go to the lower kept position (argmax returns the first maximum); a NaN similarity counts
    as -inf, so a token whose similarities are all NaN goes to position 0.
    """
    unit = unit_rows(metric)
    kept = unit.gather(1, indices[:, :, None].expand(-1, -1, unit.shape[-1]))
    sim = torch.bmm(unit, kept.transpose(1, 2))                        # (B, N, K)
    return sim.masked_fill(torch.isnan(sim), float("-inf")).argmax(dim=-1)


def assign_tokens(
    indices: torch.Tensor, metric: torch.Tensor, merge: bool
) -> torch.Tensor:
    """Step 4b: kept tokens go to their own position; dropped ones to the nearest kept or -1."""
    positions = output_positions(indices, metric.shape[1])
    if not merge:
        return positions
    return torch.where(positions >= 0, positions, nearest_kept(metric, indices))


def _flat_rows(index: torch.Tensor, rows_per_image: int) -> torch.Tensor:
    """Row numbers into a (B * rows_per_image, ...) view from per-image row numbers (B, M)."""
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * rows_per_image
    return (index + offsets).reshape(-1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_mean(rows: torch.Tensor, assignment: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, keep, W): the plain mean of the rows (B, N, W) assigned to each output position; rows with
    assignment -1 count nowhere, and an empty group is zero. Accumulates in float32 (float64 stays)."""
    batch, tokens, width = rows.shape
    acc = accumulation_dtype(rows.dtype)
    valid = (assignment >= 0).reshape(-1)
    target = _flat_rows(assignment.clamp_min(0), keep)
    flat = rows.reshape(batch * tokens, width).to(acc).masked_fill(~valid[:, None], 0.0)
    sums = flat.new_zeros(batch * keep, width).index_add(0, target, flat)
    counts = flat.new_zeros(batch * keep).index_add(0, target, valid.to(acc))
    return (sums / counts.clamp_min(1)[:, None]).to(rows.dtype).view(batch, keep, width)


def merge_tokens(
    hidden: torch.Tensor, indices: torch.Tensor, assignment: torch.Tensor, merge: bool
) -> torch.Tensor:
    """Step 4c: output i is the plain mean of hidden[i] and the rows assigned to it (or hidden[i])."""
    batch, tokens, width = hidden.shape
    keep = indices.shape[1]
    if not merge:
        rows = hidden.reshape(batch * tokens, width)
        return rows.index_select(0, _flat_rows(indices, tokens)).view(batch, keep, width)
    return group_mean(hidden, assignment, keep)


def prune(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    text: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    *,
    text_mask: Optional[torch.Tensor] = None,
    task_ratio: float = 0.5,
    merge: bool = True,
    metric: Optional[torch.Tensor] = None,
    text_reduce: str = "max",
) -> PruneResult:
    """The whole operator, step by step. Same arguments as :func:`desap_ops.prune`."""
    keep, task_ratio, merge, text_reduce = check_inputs(hidden, attn, text, text_mask, saliency, metric, keep,
                                                        task_ratio, merge, text_reduce)
    # the scores choose tokens, a piecewise-constant decision: like the op, they carry no graph
    scores = task_scores(attn, text, text_mask, text_reduce).detach()
    has_text = has_valid_text(text_mask, hidden.shape[0], hidden.device)
    indices = select_tokens(saliency, scores, keep, task_ratio, has_text)
    assignment = assign_tokens(indices, hidden if metric is None else metric, merge)
    tokens = merge_tokens(hidden, indices, assignment, merge)
    return PruneResult(tokens, indices, assignment, scores)


def prune_backward(grad_tokens: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Gradient of ``tokens`` w.r.t. ``hidden`` with the assignment held fixed.

    grad_hidden[j] = grad_tokens[a_j] / count[a_j], zero where a_j = -1. Covers merge and no merge:
    without merge every kept token is alone in its group.
    """
    batch, keep, width = grad_tokens.shape
    tokens = assignment.shape[1]
    acc = accumulation_dtype(grad_tokens.dtype)
    valid = assignment >= 0
    target = _flat_rows(assignment.clamp_min(0), keep)
    counts = torch.zeros(batch * keep, dtype=acc, device=grad_tokens.device).index_add(
        0, target, valid.reshape(-1).to(acc)
    )
    per_group = grad_tokens.reshape(batch * keep, width).to(acc) / counts.clamp_min(1)[:, None]
    grad = per_group.index_select(0, target).view(batch, tokens, width)
    return grad.masked_fill(~valid[:, :, None], 0.0).to(grad_tokens.dtype)
