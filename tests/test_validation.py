"""Scalars and limits: both entry points take the same scalars and refuse the same things, early."""
import numpy as np
import pytest
import torch

import desap_ops
from desap_ops.validation import check_options

from helpers import TRITON_DEVICE, tie_free_case


def _both_entry_points(case, keep, task_ratio, merge):
    public = desap_ops.prune(*case.args()[:4], keep, text_mask=case.text_mask, task_ratio=task_ratio, merge=merge)
    op = torch.ops.desap.prune(case.hidden, case.attn, case.text, case.text_mask, case.saliency, None, keep,
                               task_ratio, merge, "max")
    return public, op


@pytest.mark.parametrize("keep", [3, np.int64(3), np.int32(3), torch.tensor(3)], ids=["int", "np64", "np32", "tensor"])
@pytest.mark.parametrize("task_ratio", [0.5, np.float32(0.5), torch.tensor(0.5), 1], ids=["float", "np", "tensor", "int"])
@pytest.mark.parametrize("merge", [True, 1, np.bool_(True)], ids=["bool", "one", "np"])
def test_integer_like_and_real_like_scalars_agree_on_both_entry_points(keep, task_ratio, merge):
    case = tie_free_case(tokens=12, keep=3, task_ratio=float(task_ratio), seed=5)
    public, op = _both_entry_points(case, keep, task_ratio, merge)
    for got, expected in zip(public, op):
        assert torch.equal(got, expected)
    assert public.indices.shape == (2, 3)


@pytest.mark.parametrize("keep,error", [(True, TypeError), (3.0, TypeError), (torch.tensor(3.0), TypeError),
                                        (torch.tensor([3, 4]), TypeError), ("3", TypeError), (0, ValueError)])
def test_keep_refusals_agree_on_both_entry_points(keep, error):
    case = tie_free_case(tokens=12, keep=3, seed=5)
    with pytest.raises(error, match="keep"):
        desap_ops.prune(*case.args()[:4], keep)
    if type(keep) is int and keep == 0:  # the op's schema converts or refuses the others before any check of ours runs
        with pytest.raises(error, match="keep"):
            torch.ops.desap.prune(case.hidden, case.attn, case.text, None, case.saliency, None, keep, 0.5, True,
                                  "max")


@pytest.mark.parametrize("task_ratio,error", [(True, TypeError), ("half", TypeError), (float("nan"), ValueError),
                                              (1.5, ValueError), (torch.tensor([0.1, 0.2]), TypeError)])
def test_task_ratio_refusals(task_ratio, error):
    with pytest.raises(error, match="task_ratio"):
        check_options(3, task_ratio, True, "max")


@pytest.mark.parametrize("merge", [2, "yes", None, 1.0])
def test_merge_refusals(merge):
    with pytest.raises(TypeError, match="merge"):
        check_options(3, 0.5, merge, "max")


def test_tokens_above_the_kernel_limit_are_refused_before_any_launch(monkeypatch):
    from desap_ops.kernels import merge, selection, similarity

    launched = []
    for module in (similarity, selection, merge):
        monkeypatch.setattr(module, "launch", lambda *args, **kwargs: launched.append(args[0]))
    tokens = selection.MAX_TOKENS + 1
    hidden = torch.zeros(1, tokens, 1, device=TRITON_DEVICE)
    attn, text = torch.zeros(1, tokens, 1, device=TRITON_DEVICE), torch.ones(1, 1, 1, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match=f"N <= {selection.MAX_TOKENS}"):
        desap_ops.prune(hidden, attn, text, torch.zeros(1, tokens, device=TRITON_DEVICE), 1, backend="triton")
    assert launched == []


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_task_scores_carry_no_gradient_on_any_backend(backend):
    case = tie_free_case(tokens=14, keep=4).to(TRITON_DEVICE if backend == "triton" else "cpu")
    attn = case.attn.clone().requires_grad_(True)
    hidden = case.hidden.clone().requires_grad_(True)
    result = desap_ops.prune(hidden, attn, case.text, case.saliency, 4, backend=backend)
    assert result.tokens.requires_grad
    assert not result.task_scores.requires_grad and result.task_scores.grad_fn is None
