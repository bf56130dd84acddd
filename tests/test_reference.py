"""The reference against the contract (docs/contract.md): exact properties and the naive oracle."""
import math

import pytest
import torch

import desap_ops
from desap_ops import reference

from helpers import (DTYPES, TOKEN_TOL, Case, assert_matches_reference, naive_assignment,
                     naive_merge, naive_select, naive_task_scores, tie_free_case)


def _prune(case: Case, **overrides):
    options = {**case.options, **overrides}
    return reference.prune(*case.args(), **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("text_reduce", ["max", "mean"])
def test_matches_naive_oracle(dtype, merge, text_reduce):
    case = tie_free_case(batch=2, tokens=23, keep=6, dtype=dtype, merge=merge,
                         text_reduce=text_reduce, with_mask=True, seed=3)
    result = _prune(case)
    torch.testing.assert_close(result.task_scores.double(),
                               naive_task_scores(case.attn, case.text, case.text_mask, text_reduce),
                               atol=2e-5, rtol=0)
    has_text = reference.has_valid_text(case.text_mask, 2, "cpu")
    assert torch.equal(result.indices, naive_select(case.saliency, result.task_scores, case.keep,
                                                    case.task_ratio, has_text))
    assignment, _ = naive_assignment(case.hidden, result.indices, merge)
    assert torch.equal(result.assignment, assignment)
    rtol, atol = TOKEN_TOL[dtype]
    torch.testing.assert_close(result.tokens.double(), naive_merge(case.hidden, result.indices,
                                                                   assignment, merge),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_all_with_merge_returns_hidden(dtype):
    case = tie_free_case(tokens=17, keep=17, dtype=dtype)
    result = _prune(case)
    assert torch.equal(result.tokens, case.hidden)
    assert torch.equal(result.indices, torch.arange(17).expand(2, 17))
    assert torch.equal(result.assignment, torch.arange(17).expand(2, 17))


def test_keep_all_without_merge_is_a_copy():
    case = tie_free_case(tokens=9, keep=9, merge=False)
    result = _prune(case)
    assert torch.equal(result.tokens, case.hidden)
    assert result.tokens.data_ptr() != case.hidden.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_zero_is_top_saliency_and_one_is_top_task_score(dtype):
    case = tie_free_case(tokens=30, keep=7, dtype=dtype, task_ratio=0.0)
    top_saliency = case.saliency.float().topk(7, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(_prune(case).indices, top_saliency)
    result = _prune(case, task_ratio=1.0)
    top_task = result.task_scores.topk(7, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(result.indices, top_task)


@pytest.mark.parametrize("keep,ratio,expected", [(64, 0.5, 32), (5, 0.5, 3), (5, 0.3, 2), (1, 0.5, 1),
                                                 (1, 0.49, 0), (7, 1.0, 7), (7, 0.0, 0)])
def test_budget_split(keep, ratio, expected):
    assert reference.split_budget(keep, ratio) == (keep - expected, expected)


def test_two_stages_do_not_overlap():
    """Stage 2 picks among tokens stage 1 left, even when the same tokens lead both rankings."""
    saliency = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    attn = torch.eye(6)[None]
    text = torch.tensor([[[1.0, 0.9, 0.8, 0.0, 0.0, 0.0]]])   # task order follows saliency too
    result = reference.prune(attn, attn, text, saliency, 4, task_ratio=0.5, merge=False)
    assert result.indices.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_conserves_the_sum(dtype):
    case = tie_free_case(tokens=50, keep=9, dtype=dtype, separate_metric=True)
    result = _prune(case)
    counts = torch.zeros(2, 9).scatter_add_(1, result.assignment, torch.ones(2, 50))
    merged_sum = (counts[:, :, None] * result.tokens.double()).sum(dim=1)
    rtol, atol = TOKEN_TOL[dtype]
    torch.testing.assert_close(merged_sum, case.hidden.double().sum(dim=1), rtol=rtol, atol=atol * 50)


def test_text_permutation_and_positive_scaling_change_nothing():
    case = tie_free_case(tokens=40, keep=10, with_mask=True, separate_metric=True, seed=5)
    base = _prune(case)
    perm = torch.randperm(case.text.shape[1])
    scale_attn = torch.rand(2, 40, 1) * 10 + 0.1
    scale_text = torch.rand(2, case.text.shape[1], 1) * 10 + 0.1
    moved = reference.prune(case.hidden, case.attn * scale_attn, (case.text * scale_text)[:, perm],
                            case.saliency, case.keep, text_mask=case.text_mask[:, perm],
                            task_ratio=case.task_ratio, metric=case.metric)
    torch.testing.assert_close(moved.task_scores, base.task_scores, atol=1e-6, rtol=0)
    assert torch.equal(moved.indices, base.indices)
    assert torch.equal(moved.assignment, base.assignment)
    assert torch.equal(moved.tokens, base.tokens)


@pytest.mark.parametrize("merge", [True, False])
def test_batch_equals_images_one_by_one(merge):
    case = tie_free_case(batch=4, tokens=33, keep=5, with_mask=True, merge=merge, seed=7)
    case.text_mask[2] = False  # one image with no text at all
    whole = _prune(case)
    for b in range(4):
        one = reference.prune(case.hidden[b:b + 1], case.attn[b:b + 1], case.text[b:b + 1],
                              case.saliency[b:b + 1], case.keep, text_mask=case.text_mask[b:b + 1],
                              task_ratio=case.task_ratio, merge=merge)
        for got, expected in zip(whole, one):
            assert torch.equal(got[b:b + 1], expected)


@pytest.mark.parametrize("text_reduce", ["max", "mean"])
def test_all_masked_text_falls_back_to_saliency(text_reduce):
    case = tie_free_case(batch=2, tokens=20, keep=6, with_mask=True, text_reduce=text_reduce)
    case.text_mask[1] = False
    result = _prune(case)
    assert torch.isinf(result.task_scores[1]).all() and (result.task_scores[1] < 0).all()
    assert torch.isfinite(result.task_scores[0]).all()
    top_saliency = case.saliency[1].topk(6).indices.sort().values
    assert torch.equal(result.indices[1], top_saliency)


def test_mean_reduction_averages_valid_text_only():
    case = tie_free_case(tokens=12, keep=3, with_mask=True, text_reduce="mean")
    sim = reference.decoupled_similarity(case.attn, case.text)
    weights = case.text_mask[:, None, :].float()
    expected = (sim * weights).sum(-1) / weights.sum(-1)
    torch.testing.assert_close(_prune(case).task_scores, expected)


def test_saliency_ties_go_to_the_lower_index():
    saliency = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0]])
    hidden = torch.randn(1, 6, 4)
    result = reference.prune(hidden, hidden, hidden[:, :1], saliency, 2, task_ratio=0.0)
    assert result.indices.tolist() == [[1, 2]]


def test_negative_zero_ties_with_zero():
    saliency = torch.tensor([[-1.0, 0.0, -0.0, -2.0]])
    hidden = torch.randn(1, 4, 4)
    result = reference.prune(hidden, hidden, hidden[:, :1], saliency, 1, task_ratio=0.0)
    assert result.indices.tolist() == [[1]]
    saliency = torch.tensor([[-1.0, -0.0, 0.0, -2.0]])
    result = reference.prune(hidden, hidden, hidden[:, :1], saliency, 1, task_ratio=0.0)
    assert result.indices.tolist() == [[1]]


def test_nan_ranks_below_every_number():
    saliency = torch.tensor([[math.nan, -math.inf, math.nan, 3.0, -1e30]])
    hidden = torch.randn(1, 5, 4)
    ranks = reference.descending_rank(saliency)
    assert ranks.tolist() == [[3, 2, 4, 0, 1]]
    result = reference.prune(hidden, hidden, hidden[:, :1], saliency, 4, task_ratio=0.0)
    assert result.indices.tolist() == [[0, 1, 3, 4]]


def test_nan_task_scores_rank_last():
    attn = torch.tensor([[[1.0, 0.0], [math.nan, 1.0], [0.0, 1.0], [-1.0, 0.0]]])
    text = torch.tensor([[[1.0, 0.0]]])
    saliency = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # stage 1 takes token 3
    result = reference.prune(attn, attn, text, saliency, 3, task_ratio=0.67, merge=False)
    assert math.isnan(result.task_scores[0, 1])
    assert result.indices.tolist() == [[0, 2, 3]]


def test_nearest_ties_go_to_the_lower_kept_position():
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    saliency = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0]])
    result = reference.prune(metric, metric, metric[:, :1], saliency, 2, task_ratio=0.0)
    assert result.indices.tolist() == [[0, 1]]
    assert result.assignment.tolist() == [[0, 1, 0, 0, 1]]  # token 2 is equally near both


def test_nan_metric_rows_go_to_position_zero_and_stay_in_their_group():
    hidden = torch.randn(1, 6, 4)
    metric = hidden.clone()
    metric[0, 4] = math.nan
    hidden[0, 4] = math.nan
    saliency = torch.tensor([[0.0, 5.0, 4.0, 0.0, 0.0, 3.0]])
    result = reference.prune(hidden, hidden, hidden[:, :1], saliency, 3, task_ratio=0.0, metric=metric)
    assert result.assignment[0, 4] == 0
    assert torch.isnan(result.tokens[0, 0]).all()
    assert torch.isfinite(result.tokens[0, 1:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rerun_is_bitwise_identical(dtype):
    case = tie_free_case(batch=3, tokens=64, keep=11, dtype=dtype, with_mask=True)
    first, second = _prune(case), _prune(case)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_entry_point_agrees_with_reference(dtype):
    case = tie_free_case(tokens=31, keep=4, dtype=dtype, with_mask=True, separate_metric=True)
    for backend in ("auto", "reference"):
        result = desap_ops.prune(*case.args(), **case.options, backend=backend)
        assert isinstance(result, desap_ops.PruneResult)
        assert_matches_reference(result, case)


def test_reference_gradient_is_the_mean_adjoint():
    case = tie_free_case(tokens=20, keep=4, dtype=torch.float64)
    hidden = case.hidden.clone().requires_grad_(True)
    result = reference.prune(hidden, case.attn, case.text, case.saliency, 4)
    grad_out = torch.randn_like(result.tokens)
    (grad,) = torch.autograd.grad(result.tokens, hidden, grad_out)
    torch.testing.assert_close(grad, reference.prune_backward(grad_out, result.assignment))


def test_cosines_are_scale_free_for_any_finite_input():
    gen = torch.Generator().manual_seed(11)
    attn, text = torch.randn(2, 9, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    hidden = torch.randn(2, 9, 5, generator=gen)
    saliency = torch.rand(2, 9, generator=gen)
    base = reference.prune(hidden, attn, text, saliency, 3)
    for scale in (2.0**100, 2.0**-100, 1e30, 1e-30):  # 1e30 rounds the inputs: close, not equal
        scaled = reference.prune(hidden * scale, attn * scale, text * scale, saliency, 3)
        torch.testing.assert_close(scaled.task_scores, base.task_scores, atol=1e-6, rtol=0)
        assert torch.equal(scaled.indices, base.indices) and torch.equal(scaled.assignment, base.assignment)
    zeros = reference.unit_rows(torch.zeros(1, 3))
    assert torch.equal(zeros, torch.zeros(1, 3))           # a zero row: cosine 0 with everything
    inf_row = torch.tensor([[math.inf, 1.0, 0.0]])
    assert torch.isnan(reference.decoupled_similarity(inf_row[None], torch.ones(1, 1, 3))).all()
