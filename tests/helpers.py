"""Test helpers: inputs built free of near-ties, a naive oracle, tolerances per dtype."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from desap_ops import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOKEN_TOL = {  # (rtol, atol) for merged tokens against the reference
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float64: (1e-12, 1e-12),
}
SCORE_ATOL = 2e-5  # cosines in float32 from the same inputs, summed in another order
TIE_MARGIN = 1e-4  # deciding scores are at least this far apart in tie-free inputs


def triton_devices() -> list[str]:
    """Where the Triton kernels run in this session: CPU under the interpreter (set by conftest when
    there is no GPU), else the GPU, compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ["cpu"]
    return ["cuda"] if torch.cuda.is_available() else []


TRITON_DEVICE = (triton_devices() or ["cpu"])[0]


@dataclass
class Case:
    hidden: torch.Tensor
    attn: torch.Tensor
    text: torch.Tensor
    saliency: torch.Tensor
    keep: int
    text_mask: Optional[torch.Tensor] = None
    task_ratio: float = 0.5
    merge: bool = True
    metric: Optional[torch.Tensor] = None
    text_reduce: str = "max"
    options: dict = field(init=False)

    def __post_init__(self):
        self.options = dict(text_mask=self.text_mask, task_ratio=self.task_ratio, merge=self.merge,
                            metric=self.metric, text_reduce=self.text_reduce)

    def args(self):
        return self.hidden, self.attn, self.text, self.saliency, self.keep

    def op_args(self):
        return (self.hidden, self.attn, self.text, self.text_mask, self.saliency, self.metric,
                self.keep, self.task_ratio, self.merge, self.text_reduce)

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Case(move(self.hidden), move(self.attn), move(self.text), move(self.saliency),
                    self.keep, move(self.text_mask), self.task_ratio, self.merge, move(self.metric),
                    self.text_reduce)


def _boundary_gap(scores: torch.Tensor, budget: int) -> float:
    """Gap between the budget-th and the next score (inf when nothing competes)."""
    finite = scores[torch.isfinite(scores)].double().sort(descending=True).values
    if budget <= 0 or budget >= finite.numel():
        return math.inf
    return float(finite[budget - 1] - finite[budget])


def tie_free_case(batch=2, tokens=40, width=32, text_width=24, n_text=5, keep=8, *,
                  dtype=torch.float32, task_ratio=0.5, merge=True, text_reduce="max",
                  with_mask=False, separate_metric=False, seed=0) -> Case:
    """Random inputs whose selection and assignment have a margin >= TIE_MARGIN everywhere.

    Saliency is a shuffled grid (distinct, evenly spaced). Task scores are redrawn until the
    stage-2 boundary of each image is clear. Then the hidden (or metric) rows are built around the
    kept tokens: each dropped token is a noisy copy of one kept token, far from the others.
    """
    gen = torch.Generator().manual_seed(seed)
    k_sal, k_task = reference.split_budget(keep, task_ratio)
    for attempt in range(200):
        saliency = torch.stack([torch.randperm(tokens, generator=gen) for _ in range(batch)]).float()
        saliency = (saliency + 1) / tokens
        attn = torch.randn(batch, tokens, text_width, generator=gen).to(dtype)
        text = torch.randn(batch, n_text, text_width, generator=gen).to(dtype)
        mask = None
        if with_mask:
            mask = torch.rand(batch, n_text, generator=gen) > 0.4
            mask[:, 0] = True
        scores = reference.task_scores(attn, text, mask, text_reduce)
        by_saliency = reference.descending_rank(saliency) < k_sal
        ok = all(
            _boundary_gap(scores[b][~by_saliency[b]], k_task) >= TIE_MARGIN for b in range(batch)
        )
        if ok:
            break
    else:
        raise RuntimeError("could not draw tie-free task scores")
    has_text = reference.has_valid_text(mask, batch, "cpu")
    indices = reference.select_tokens(saliency, scores, keep, reference.task_budget(scores, keep, task_ratio, has_text))

    def clustered(dim):
        rows = torch.randn(batch, tokens, dim, generator=gen)
        owner = torch.randint(0, keep, (batch, tokens), generator=gen)
        centres = rows.gather(1, indices[:, :, None].expand(-1, -1, dim))
        near = centres.gather(1, owner[:, :, None].expand(-1, -1, dim))
        near = near + 0.15 * torch.randn(batch, tokens, dim, generator=gen)
        kept = reference.output_positions(indices, tokens) >= 0
        return torch.where(kept[:, :, None], rows, near)

    hidden = clustered(width).to(dtype)
    metric = clustered(width).to(dtype) if separate_metric else None
    if keep > 1:  # the clustering leaves a clear nearest kept token; check it
        unit = reference.unit_rows(hidden if metric is None else metric)
        kept_rows = unit.gather(1, indices[:, :, None].expand(-1, -1, unit.shape[-1]))
        top2 = torch.bmm(unit, kept_rows.transpose(1, 2)).topk(2, dim=-1).values
        dropped = reference.output_positions(indices, tokens) < 0
        assert ((top2[..., 0] - top2[..., 1])[dropped] > TIE_MARGIN).all()
    # bfloat16 has too few bits for N distinct saliency values: keep saliency in float32 there
    return Case(hidden, attn, text, saliency.to(dtype) if dtype != torch.bfloat16 else saliency,
                keep, mask, task_ratio, merge, metric, text_reduce)


# ---------------------------------------------------------------------------------------------
# The naive oracle: the contract (docs/contract.md) read literally, one image and one token at a time, in float64.


def _cos64(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(x @ y / (max(float(x.norm()), 1e-6) * max(float(y.norm()), 1e-6)))


def naive_task_scores(attn, text, text_mask=None, text_reduce="max") -> torch.Tensor:
    """(B, N) float64, the contract's step 1 literally: the max or mean over an image's valid text
    tokens of cos(attn, text); -inf for an image with no valid text (text-blind), NaN where a cosine is."""
    batch, tokens, _ = attn.shape
    out = torch.empty(batch, tokens, dtype=torch.float64)
    for b in range(batch):
        valid = [l for l in range(text.shape[1]) if text_mask is None or bool(text_mask[b, l])]
        for n in range(tokens):
            sims = [_cos64(attn[b, n], text[b, l]) for l in valid]
            if not sims:
                out[b, n] = -math.inf
            elif any(math.isnan(s) for s in sims):
                out[b, n] = math.nan
            else:
                out[b, n] = max(sims) if text_reduce == "max" else sum(sims) / len(sims)
    return out


def _rank_key(score: float, index: int):
    return (1, 0.0, index) if math.isnan(score) else (0, -score, index)


def naive_auto_keep(scores: list, keep: int) -> int:
    """Contract step 2 for task_ratio="auto", literally, in NumPy float32 (the contract's operations
    in its order): g = (max - median) / (1.4826 MAD), K_task = round-half-up(0.75 K clamp((g-4)/4))."""
    f32 = np.float32
    half = (len(scores) + 1) // 2
    ordered = sorted(range(len(scores)), key=lambda n: _rank_key(scores[n], n))
    top, median = f32(scores[ordered[0]]), f32(scores[ordered[half - 1]])
    with np.errstate(all="ignore"):
        deviation = [float(abs(f32(v) - median)) for v in scores]
        ranked = sorted(range(len(scores)), key=lambda n: _rank_key(deviation[n], n))
        spread = f32(deviation[ranked[half - 1]]) * f32(1.4826)
        share = ((top - median) / spread - f32(4.0)) / f32(4.0)
    share = f32(0.0) if math.isnan(share) else min(max(share, f32(0.0)), f32(1.0))
    wanted = f32(share) * f32(0.75 * keep)
    return int(math.floor(wanted)) + int(wanted - f32(math.floor(wanted)) >= 0.5)


def naive_select(saliency, scores, keep, task_ratio, has_text) -> torch.Tensor:
    """Contract steps 2-3 with Python's sorted() on (NaN last, score descending, index) keys."""
    rows = []
    for b in range(saliency.shape[0]):
        sal = [float(v) for v in saliency[b].double()]
        task = [float(v) for v in scores[b].double()]
        if not bool(has_text[b]):
            k_task = 0
        elif task_ratio == "auto":
            k_task = naive_auto_keep(task, keep)
        else:
            k_task = math.floor(task_ratio * keep + 0.5)
        k_sal = keep - k_task
        order = sorted(range(len(sal)), key=lambda n: _rank_key(sal[n], n))
        chosen = set(order[:k_sal])
        rest = sorted((n for n in range(len(sal)) if n not in chosen), key=lambda n: _rank_key(task[n], n))
        chosen |= set(rest[:k_task])
        rows.append(sorted(chosen))
    return torch.tensor(rows, dtype=torch.int64)


def naive_assignment(metric, indices, merge) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment, margin): margin[b, j] = best minus second-best cosine (inf when unique)."""
    batch, tokens, _ = metric.shape
    assignment = torch.full((batch, tokens), -1, dtype=torch.int64)
    margin = torch.full((batch, tokens), math.inf, dtype=torch.float64)
    for b in range(batch):
        kept = [int(i) for i in indices[b]]
        for j in range(tokens):
            if j in kept:
                assignment[b, j] = kept.index(j)
            elif merge:
                sims = [_cos64(metric[b, j], metric[b, i]) for i in kept]
                sims = [-math.inf if math.isnan(s) else s for s in sims]
                best = max(range(len(sims)), key=lambda p: (sims[p], -p))
                assignment[b, j] = best
                ordered = sorted(sims, reverse=True)
                if len(ordered) > 1:
                    margin[b, j] = ordered[0] - ordered[1]
    return assignment, margin


def naive_merge(hidden, indices, assignment, merge) -> torch.Tensor:
    batch, tokens, width = hidden.shape
    keep = indices.shape[1]
    out = torch.zeros(batch, keep, width, dtype=torch.float64)
    for b in range(batch):
        for p in range(keep):
            members = [j for j in range(tokens) if int(assignment[b, j]) == p] if merge \
                else [int(indices[b, p])]
            out[b, p] = hidden[b, members].double().mean(dim=0)
    return out


def assert_matches_reference(result, case: Case, *, exact_assignment=True):
    """Check a result against the reference, step by step, on the result's own scores.

    The selection is compared exactly given the scores the result produced (bitwise ties then
    mean the same thing to both), scores within float32 rounding, the merge given the result's own
    assignment within the dtype's tolerance.
    """
    ref_scores = reference.task_scores(case.attn, case.text, case.text_mask, case.text_reduce)
    torch.testing.assert_close(result.task_scores, ref_scores, atol=SCORE_ATOL, rtol=0, equal_nan=True)
    has_text = reference.has_valid_text(case.text_mask, case.hidden.shape[0], case.hidden.device)
    expected_keep = reference.task_budget(result.task_scores, case.keep, case.task_ratio, has_text)
    assert torch.equal(result.task_keep, expected_keep)
    expected_indices = reference.select_tokens(case.saliency, result.task_scores, case.keep, expected_keep)
    assert torch.equal(result.indices, expected_indices)
    metric = case.hidden if case.metric is None else case.metric
    if exact_assignment:
        assert torch.equal(result.assignment, reference.assign_tokens(result.indices, metric, case.merge))
    expected_tokens = reference.merge_tokens(case.hidden, result.indices, result.assignment, case.merge)
    rtol, atol = TOKEN_TOL[case.hidden.dtype]
    torch.testing.assert_close(result.tokens, expected_tokens, rtol=rtol, atol=atol, equal_nan=True)
    assert result.tokens.dtype == case.hidden.dtype
    assert result.indices.dtype == result.assignment.dtype == result.task_keep.dtype == torch.int64
    assert result.task_scores.dtype == torch.float32


def one_error_line(err: str) -> str:
    """The single ``desap: error:`` line of a refused command (progress lines start with '... ')."""
    assert "Traceback" not in err
    errors = [line for line in err.strip().splitlines() if not line.startswith("... ")]
    assert len(errors) == 1 and errors[0].startswith("desap: error: "), err
    return errors[0]


# ---------------------------------------------------------------------------------------------
# Twins: bit-identical tokens (contract, "Exact ties").


def twin_case(batch=2, groups=10, tokens=30, keep=11, width=16, text_width=12, n_text=4, *,
              dtype=torch.float32, task_ratio=0.5, merge=True, separate_metric=False, seed=0) -> Case:
    """Inputs whose ``tokens`` are copies of ``groups`` distinct tokens per image (every group at
    least once, the rest drawn at random): hidden, attn, metric and saliency of a copy equal its
    group's bit for bit. Between different groups every deciding value is at least TIE_MARGIN
    apart (float64: the groups' task scores, saliency, and each group's cosines with the others),
    so the only ties are the twins', which the contract sends to the lower index."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        src = torch.stack([torch.cat([torch.randperm(groups, generator=gen),
                                      torch.randint(0, groups, (tokens - groups,), generator=gen)])
                           [torch.randperm(tokens, generator=gen)] for _ in range(batch)])
        hidden = torch.randn(batch, groups, width, generator=gen).to(dtype)
        metric = torch.randn(batch, groups, width, generator=gen).to(dtype) if separate_metric else hidden
        attn = torch.randn(batch, groups, text_width, generator=gen).to(dtype)
        text = torch.randn(batch, n_text, text_width, generator=gen).to(dtype)
        saliency = (torch.stack([torch.randperm(groups, generator=gen) for _ in range(batch)]).float() + 1) / groups
        scores = naive_task_scores(attn, text)
        unit = metric.double() / metric.double().norm(dim=-1, keepdim=True)
        cosines = unit @ unit.transpose(1, 2)
        apart = all(float(scores[b].sort().values.diff().min()) > TIE_MARGIN for b in range(batch)) and \
            all(float(cosines[b, g].sort().values.diff().min()) > TIE_MARGIN for b in range(batch) for g in range(groups))
        if apart:
            break
    else:
        raise RuntimeError("could not draw groups free of near-ties")

    def copies(rows):
        return rows.gather(1, src[:, :, None].expand(-1, -1, rows.shape[-1]))

    return Case(copies(hidden), copies(attn), text, saliency.gather(1, src).to(dtype if dtype != torch.bfloat16 else torch.float32),
                keep, None, task_ratio, merge, copies(metric) if separate_metric else None)


def twin_groups(rows: torch.Tensor) -> list[list[list[int]]]:
    """Per image, the groups of bit-identical rows of ``rows`` (B, N, W), by hand: index lists."""
    out = []
    for image in rows:
        seen: dict[bytes, list[int]] = {}
        for n, row in enumerate(image):
            seen.setdefault(row.contiguous().view(torch.uint8).numpy().tobytes(), []).append(n)
        out.append(list(seen.values()))
    return out


def assert_twins_settled(hidden: torch.Tensor, indices: torch.Tensor, assignment: torch.Tensor) -> None:
    """The exact-tie rule on one result, by hand, image by image: of each group of bit-identical
    rows of ``hidden`` (B, N, D), the kept copies are its lowest indices; its dropped copies merge
    into one kept token, their first copy when it is kept; and no dropped token merges into a kept
    copy that has a kept copy of lower position."""
    for b, groups in enumerate(twin_groups(hidden)):
        kept = indices[b].tolist()
        position = {index: p for p, index in enumerate(kept)}
        first_kept_copy = {}
        for group in groups:
            is_kept = [n in position for n in group]
            assert is_kept == sorted(is_kept, reverse=True), (b, group, kept)
            targets = {int(assignment[b, n]) for n in group if n not in position}
            assert len(targets) <= 1, (b, group, targets)
            if targets and group[0] in position:
                assert targets == {position[group[0]]}, (b, group, targets)
            first_kept_copy.update({position[n]: min(position[m] for m in group if m in position)
                                    for n in group if n in position})
        for n in range(hidden.shape[1]):
            if n not in position and int(assignment[b, n]) >= 0:
                target = int(assignment[b, n])
                assert first_kept_copy[target] == target, (b, n, target)
