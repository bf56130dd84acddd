"""Hypothesis: random shapes and budgets, the reference against the naive oracle and the kernels
against the reference. Near-ties are not avoided here, so the checks are tie-aware: the selection
is compared exactly given the scores each side computed, the assignment exactly wherever the best
kept token leads the second by more than float32 rounding."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import desap_ops
from desap_ops import reference

from helpers import (SCORE_ATOL, TOKEN_TOL, TRITON_DEVICE, Case, assert_matches_reference, naive_assignment,
                     naive_merge, naive_select, naive_task_scores)

ROUNDING = 1e-5


@st.composite
def cases(draw, max_tokens=1000, max_batch=3):
    batch = draw(st.integers(1, max_batch))
    tokens = draw(st.integers(1, max_tokens))
    keep = draw(st.integers(1, tokens))
    n_text = draw(st.integers(1, 6))
    width = draw(st.integers(1, 12))
    text_width = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    discrete_saliency = draw(st.booleans())  # a handful of values: exact ties everywhere
    if discrete_saliency:
        saliency = torch.randint(0, 4, (batch, tokens), generator=gen).float()
    else:
        saliency = torch.rand(batch, tokens, generator=gen)
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(batch, n_text, generator=gen) > 0.5
    return Case(
        hidden=torch.randn(batch, tokens, width, generator=gen).to(dtype),
        attn=torch.randn(batch, tokens, text_width, generator=gen).to(dtype),
        text=torch.randn(batch, n_text, text_width, generator=gen).to(dtype),
        saliency=saliency.to(dtype),
        keep=keep,
        text_mask=mask,
        task_ratio=draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, "auto", draw(st.floats(0, 1))])),
        merge=draw(st.booleans()),
        metric=None,
        text_reduce=draw(st.sampled_from(["max", "mean"])),
    )


def _check_invariants(result, case):
    batch, tokens = case.saliency.shape
    idx = result.indices
    assert idx.shape == (batch, case.keep)
    assert (idx[:, 1:] > idx[:, :-1]).all(), "indices strictly ascending"
    assert ((idx >= 0) & (idx < tokens)).all()
    slots = torch.arange(case.keep).expand(batch, -1)
    assert torch.equal(result.assignment.gather(1, idx), slots), "kept tokens map to themselves"
    if case.merge:
        assert ((result.assignment >= 0) & (result.assignment < case.keep)).all()
    else:
        assert ((result.assignment >= 0).sum(dim=1) == case.keep).all()


def check_reference_against_the_naive_oracle(case):
    result = reference.prune(*case.args(), **case.options)
    _check_invariants(result, case)
    naive = naive_task_scores(case.attn, case.text, case.text_mask, case.text_reduce)
    torch.testing.assert_close(result.task_scores.double(), naive, atol=SCORE_ATOL, rtol=0, equal_nan=True)
    has_text = reference.has_valid_text(case.text_mask, case.saliency.shape[0], "cpu")
    assert torch.equal(result.indices, naive_select(case.saliency, result.task_scores, case.keep,
                                                    case.task_ratio, has_text))
    assignment, margin = naive_assignment(case.hidden, result.indices, case.merge)
    clear = margin > ROUNDING
    assert torch.equal(result.assignment[clear], assignment[clear])
    expected = naive_merge(case.hidden, result.indices, result.assignment, case.merge)
    rtol, atol = TOKEN_TOL[case.hidden.dtype]
    torch.testing.assert_close(result.tokens.double(), expected, rtol=rtol, atol=atol)
    if case.merge:  # the sum is conserved
        counts = torch.zeros(result.tokens.shape[:2], dtype=torch.float64).scatter_add_(
            1, result.assignment, torch.ones(result.assignment.shape, dtype=torch.float64))
        torch.testing.assert_close((counts[..., None] * result.tokens.double()).sum(1),
                                   case.hidden.double().sum(1), rtol=rtol, atol=atol * case.saliency.shape[1])


def check_kernels_against_the_reference(case):
    result = desap_ops.prune(*case.to(TRITON_DEVICE).args(), **case.to(TRITON_DEVICE).options, backend="triton")
    result = type(result)(*(t.cpu() for t in result))
    _check_invariants(result, case)
    assert_matches_reference(result, case, exact_assignment=False)
    if case.merge:
        unit = reference.unit_rows(case.hidden)
        kept = unit.gather(1, result.indices[:, :, None].expand(-1, -1, unit.shape[-1]))
        sim = torch.bmm(unit, kept.transpose(1, 2)).nan_to_num(nan=-math.inf)
        chosen = sim.gather(2, result.assignment[:, :, None]).squeeze(2)
        assert (chosen >= sim.max(dim=2).values - ROUNDING).all()
        top2 = sim.topk(min(2, case.keep), dim=2).values
        if case.keep > 1:
            clear = (top2[..., 0] - top2[..., 1]) > ROUNDING
            expected = reference.assign_tokens(result.indices, case.hidden, True)
            assert torch.equal(result.assignment[clear], expected[clear])


# The main suite draws few, small examples (the kernels run under the interpreter there); the sweep
# draws many, up to 1000 tokens: `python -m pytest -m sweep tests/test_properties.py` (opt-in).
QUICK = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK_KERNELS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SWEEP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@QUICK
@given(case=cases(max_tokens=160))
def test_reference_matches_the_naive_oracle(case):
    check_reference_against_the_naive_oracle(case)


@QUICK_KERNELS
@given(case=cases(max_tokens=80, max_batch=2))
def test_kernels_match_the_reference(case):
    check_kernels_against_the_reference(case)


@pytest.mark.sweep
@SWEEP
@given(case=cases())
def test_sweep_reference_matches_the_naive_oracle(case):
    check_reference_against_the_naive_oracle(case)


@pytest.mark.sweep
@SWEEP
@given(case=cases(max_tokens=1000, max_batch=2))
def test_sweep_kernels_match_the_reference(case):
    check_kernels_against_the_reference(case)
