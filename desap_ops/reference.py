"""Pure-PyTorch reference of DeSAP pruning: the oracle for the kernels and the CPU path.

Each function is one step of the contract (docs/contract.md) and reads as that step. Everything is vectorised over the
batch and the tokens (no Python loop over tokens), never synchronises with the device, and is
differentiable from ``tokens`` to ``hidden`` through ordinary PyTorch autograd.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

NORM_EPS = 1e-6
AUTO = "auto"  # task_ratio="auto" (contract, step 2): each image's split read from its own task scores
# task_ratio="auto": the robust z-score g of the best task score maps linearly to a task share from 0
# at g = AUTO_LOW to AUTO_MAX_SHARE at g = AUTO_HIGH. Written here only: the selection kernel gets
# them from the operator (triton_backend.auto_split), since the kernels never import the operator.
AUTO_LOW, AUTO_HIGH, AUTO_MAX_SHARE = 4.0, 8.0, 0.75
MAD_TO_SIGMA = 1.4826       # a normal distribution's standard deviation over its median absolute deviation
SKETCH_WIDTH = 32           # text_budget (contract, step 0): width of the random-sign sketch


class PruneResult(NamedTuple):
    """What :func:`desap_ops.prune` returns, and what any pruning method gives back
    (``desap_ops.methods.run_method``). The task scores are DeSAP's: :func:`desap_ops.prune` always
    fills them; a method that scores no task leaves both None (never zeros, which would read as data)."""

    tokens: torch.Tensor                  # (B, K, D) hidden's dtype: kept tokens, merged when merge=True
    indices: torch.Tensor                 # (B, K) int64, ascending: the kept token indices
    assignment: torch.Tensor              # (B, N) int64: output position of each token, -1 if dropped
    task_scores: Optional[torch.Tensor]   # (B, N) float32: the decoupled-similarity task score; None: not scored
    task_keep: Optional[torch.Tensor]     # (B,) int64: how many tokens each image chose by task score; None: not scored


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


def sign_sketch(width: int, device) -> torch.Tensor:
    """(width, SKETCH_WIDTH) float32 matrix of +-1/sqrt(SKETCH_WIDTH) from an integer hash of the
    position: the same on every device and run, with no random generator to trace."""
    row = torch.arange(width, device=device, dtype=torch.int64)[:, None]
    col = torch.arange(SKETCH_WIDTH, device=device, dtype=torch.int64)[None, :]
    mixed = (row * 0x9E3779B1 + col * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    mixed = ((mixed ^ (mixed >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    sign = ((mixed >> 12) & 1).float() * 2.0 - 1.0
    return sign * SKETCH_WIDTH ** -0.5


def first_occurrences(rows: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: False for a row whose every element equals, bit for bit, an earlier row of its
    image (:func:`first_twin`: O(L W), no L x L comparison)."""
    return first_twin(rows) == torch.arange(rows.shape[1], device=rows.device)


def _row_bits(rows: torch.Tensor) -> torch.Tensor:
    """(B, N, W') signed integers of at most 32 bits holding each row's bits as stored (an 8-byte
    element as two): equal rows, and only they, have equal integer rows."""
    rows = rows.detach().contiguous()
    if rows.dtype == torch.bool:
        return rows.view(torch.int8)
    return rows.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int32}[rows.element_size()])


def first_twin(rows: torch.Tensor) -> torch.Tensor:
    """(B, N) int64: for each row of ``rows`` (B, N, W), the lowest index of a row of the same image
    that is bit-identical to it (its own index when none is): the token whose scores its twins take
    (contract, "Exact ties").

    Rows are sorted stably by two integer fingerprints of their bits (equal rows have equal
    fingerprints, so they end up adjacent, in index order) and compared bit for bit with their
    neighbour: O(N W), no N x N comparison. Rows that differ are never twins; two equal rows would
    be told apart only if a different row had both their fingerprints and sorted between them,
    which leaves that tie to rounding, as before this rule."""
    bits = _row_bits(rows)
    wide = bits.to(torch.int64)
    columns = torch.arange(bits.shape[-1], device=rows.device, dtype=torch.int64)
    # weights below 2**16: each product below 2**47, a sum of up to 2**16 of them below 2**63
    first = (wide * ((columns * 40503 + 1) & 0xFFFF)).sum(dim=-1)
    second = (wide * ((columns * 9973 + 7919) & 0xFFFF)).sum(dim=-1)
    del wide
    order = torch.sort(second, dim=-1, stable=True).indices
    order = order.gather(1, torch.sort(first.gather(1, order), dim=-1, stable=True).indices)   # by (first, second, index)
    ordered = bits.gather(1, order[:, :, None].expand_as(bits))
    same = (ordered[:, 1:] == ordered[:, :-1]).all(dim=-1)
    place = torch.arange(order.shape[1], device=rows.device).expand_as(order)
    # each run of equal rows starts where a row differs from the one before; its head has the lowest index
    starts = torch.cat([torch.ones(same.shape[0], 1, dtype=torch.bool, device=rows.device), ~same], dim=1)
    head = torch.where(starts, place, 0).cummax(dim=1).values
    return torch.empty_like(order).scatter_(1, order, order.gather(1, head))


def tie_exact(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``scores`` (B, N) with each token given its first twin's score (:func:`first_twin` of
    ``rows`` (B, N, W), the inputs the score is a function of): bit-identical tokens then tie
    exactly, and every rank of this module sends the tie to the lower index."""
    return scores.gather(-1, first_twin(rows))


def budget_text(attn: torch.Tensor, text: torch.Tensor, text_mask: Optional[torch.Tensor],
                budget: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Step 0: at most ``budget`` text tokens per image, as (text (B, M, C), mask (B, M)).

    With L <= budget (or no budget) the inputs come back untouched. Otherwise repeated rows count
    once (rows whose sketches agree bit for bit), and the distinct valid rows are ranked by their best cosine with any visual token,
    measured cheaply in a SKETCH_WIDTH-wide sign sketch of attn and text (O((N + L) C S + N L S)
    instead of the O(N L C) of the similarity). The best ``budget`` rows are kept in prompt order.
    """
    batch, length, width = text.shape
    if budget is None or length <= budget:
        return text, text_mask
    sketch = sign_sketch(width, text.device)
    text_sketch = text.float() @ sketch
    relevance = torch.bmm(unit_rows(text_sketch), unit_rows(attn.float() @ sketch).transpose(1, 2)).amax(dim=-1)
    # equal rows have equal sketches (the same products in the same order), and telling repeats
    # apart by their 32 sketch values costs O(L S) instead of the O(L C) of the rows themselves
    valid = first_occurrences(text_sketch)
    if text_mask is not None:
        valid &= text_mask
    chosen = descending_rank(relevance, excluded=~valid) < budget
    chosen &= valid
    positions = torch.arange(length, device=text.device).expand(batch, length)
    picked = torch.sort(positions.masked_fill(~chosen, length), dim=-1).values[:, :budget]
    rows = picked.clamp_max(length - 1)
    return text.gather(1, rows[:, :, None].expand(-1, -1, width)), chosen.gather(1, rows) & (picked < length)


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


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) the k-th largest value of each row (k >= 1) in the selection order of
    :func:`descending_rank`: NaN below every number, ties by index."""
    at_k = (descending_rank(values) == k - 1).to(torch.int32).argmax(dim=-1, keepdim=True)
    return values.gather(-1, at_k).squeeze(-1)


def guidance(scores: torch.Tensor) -> torch.Tensor:
    """(B,) float32: how far each image's best task score stands above its typical one, in robust
    standard deviations: (max - median) / (1.4826 * MAD). Unchanged by any affine map of the scores."""
    half = (scores.shape[-1] + 1) // 2
    top = kth_largest(scores, 1)
    median = kth_largest(scores, half)
    spread = kth_largest((scores - median[:, None]).abs(), half) * MAD_TO_SIGMA
    return (top - median) / spread


def split_budget(keep: int, task_ratio: float) -> tuple[int, int]:
    """Step 2 for a number rho: (K_sal, K_task) with K_task = floor(rho * K + 0.5), K_sal = K - K_task."""
    k_task = math.floor(task_ratio * keep + 0.5)
    return keep - k_task, k_task


def task_budget(scores: torch.Tensor, keep: int, task_ratio: Union[float, str],
                has_text: torch.Tensor) -> torch.Tensor:
    """Step 2: (B,) int64 K_task per image; 0 for an image without valid text.

    A number rho gives floor(rho * K + 0.5) to every image. "auto" reads each image's own scores:
    K_task = round(0.75 * K * clamp((g - 4) / 4, 0, 1)) with g = :func:`guidance`, rounded half up
    from one product so that the kernels, which do the same float32 operations, agree exactly.
    """
    if task_ratio == AUTO:
        share = ((guidance(scores) - AUTO_LOW) / (AUTO_HIGH - AUTO_LOW)).clamp(0.0, 1.0)
        share = torch.where(torch.isnan(share), 0.0, share)     # no spread and no lead: no guidance
        wanted = share * (AUTO_MAX_SHARE * keep)
        whole = torch.floor(wanted)
        k_task = (whole + (wanted - whole >= 0.5).float()).to(torch.int64)
    else:
        k_task = torch.full_like(has_text, split_budget(keep, task_ratio)[1], dtype=torch.int64)
    return torch.where(has_text, k_task, 0)


def select_tokens(
    saliency: torch.Tensor,
    scores: torch.Tensor,
    keep: int,
    k_task: torch.Tensor,
) -> torch.Tensor:
    """Step 3: the kept indices (B, K), ascending.

    First the K - K_task most salient tokens, then among the rest the K_task (per image, (B,)) of
    highest task score.
    """
    task_keep = k_task[:, None]                                        # (B, 1)
    by_saliency = descending_rank(saliency.float()) < keep - task_keep
    by_task = descending_rank(scores, excluded=by_saliency) < task_keep
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
    as -inf, so a token whose similarities are all NaN goes to position 0. Twins then settle
    exactly (:func:`settle_twins`).
    """
    unit = unit_rows(metric)
    kept = unit.gather(1, indices[:, :, None].expand(-1, -1, unit.shape[-1]))
    sim = torch.bmm(unit, kept.transpose(1, 2))                        # (B, N, K)
    nearest = sim.masked_fill(torch.isnan(sim), float("-inf")).argmax(dim=-1)
    return settle_twins(nearest, indices, metric)


def settle_twins(nearest: torch.Tensor, indices: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Step 4a's twin rule on ``nearest`` (B, N), each token's kept position of highest cosine (a
    kept token's entry is not read): bit-identical rows of ``metric`` go where their first twin
    (:func:`first_twin`) goes, a token whose first twin is kept goes to it, and a position whose
    kept token has a kept twin of lower position gives way to that one. So the rounding of equal
    cosines never decides, in the reference or in the kernels (which run this after theirs)."""
    twins = first_twin(metric)
    positions = output_positions(indices, metric.shape[1])
    # each kept position's first kept twin: the kept positions keyed by their tokens' first twins
    lowest_kept = first_twin(twins.gather(1, indices)[:, :, None])
    by_twin = lowest_kept.gather(1, nearest.gather(1, twins))
    kept_twin = positions.gather(1, twins)                            # the first twin's position, or -1
    return torch.where(kept_twin >= 0, kept_twin, by_twin)


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
    # in place: torch's out-of-place index_add takes a path several times slower on the CPU, same sums
    sums = flat.new_zeros(batch * keep, width).index_add_(0, target, flat)
    counts = flat.new_zeros(batch * keep).index_add_(0, target, valid.to(acc))
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
    task_ratio: Union[float, str] = 0.5,
    merge: bool = True,
    metric: Optional[torch.Tensor] = None,
    text_reduce: str = "max",
    text_budget: Optional[int] = None,
) -> PruneResult:
    """The whole operator, step by step, on checked inputs: the arguments of :func:`desap_ops.prune`
    as ``validation.check_inputs`` passes and normalises them (``task_ratio`` a number or ``AUTO``).
    Every entry point checks before it gets here; ``desap_ops.prune(..., backend="reference")`` is
    this function behind the checks. The reference defines the steps and checks nothing itself, so
    that the checks can use its definitions (``AUTO``) and imports run one way."""
    has_text = has_valid_text(text_mask, hidden.shape[0], hidden.device)
    text, text_mask = budget_text(attn.detach(), text.detach(), text_mask, text_budget)
    # the scores choose tokens, a piecewise-constant decision: like the op, they carry no graph
    scores = tie_exact(task_scores(attn, text, text_mask, text_reduce), attn).detach()
    k_task = task_budget(scores, keep, task_ratio, has_text)
    indices = select_tokens(saliency, scores, keep, k_task)
    assignment = assign_tokens(indices, hidden if metric is None else metric, merge)
    tokens = merge_tokens(hidden, indices, assignment, merge)
    return PruneResult(tokens, indices, assignment, scores, k_task)


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
