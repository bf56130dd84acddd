"""The whole Triton path (desap_ops.triton_backend) against the reference; bitwise reruns."""

import pytest
import torch

import desap_ops

from helpers import DTYPES, assert_matches_reference, tie_free_case, triton_devices

DEVICES = triton_devices()



# --- the whole operator -------------------------------------------------------------------------

E2E = [  # (B, N, K, D, C, L, ratio, reduce, mask, metric, merge)
    (2, 40, 8, 32, 24, 5, 0.5, "max", False, False, True),
    (3, 77, 9, 20, 40, 3, 0.3, "mean", True, True, True),
    (1, 64, 64, 16, 16, 2, 0.5, "max", False, False, True),
    (2, 50, 1, 24, 16, 4, 0.5, "max", True, False, False),
    (2, 130, 17, 48, 70, 70, 1.0, "max", True, False, True),
    (1, 200, 21, 40, 32, 6, 0.0, "mean", False, True, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", E2E, ids=str)
def test_prune_triton_matches_reference_exactly(device, dtype, config):
    batch, tokens, keep, width, text_width, n_text, ratio, reduce, mask, metric, merge = config
    case = tie_free_case(batch=batch, tokens=tokens, keep=keep, width=width, text_width=text_width,
                         n_text=n_text, dtype=dtype, task_ratio=ratio, merge=merge, text_reduce=reduce,
                         with_mask=mask, separate_metric=metric, seed=tokens + keep).to(device)
    result = desap_ops.prune(*case.args(), **case.options, backend="triton")
    expected = desap_ops.prune(*case.args(), **case.options, backend="reference")
    assert torch.equal(result.indices, expected.indices)
    assert torch.equal(result.assignment, expected.assignment)
    assert_matches_reference(result, case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rerun_is_bitwise_identical(device, dtype):
    """On CUDA this is the determinism proof, at a size with many programs per launch. The
    interpreter runs programs one at a time and cannot show a race: there it only checks that
    reruns agree, on a smaller case."""
    size = dict(batch=3, tokens=150, keep=20, width=64) if device == "cuda" else dict(batch=2, tokens=48, keep=8)
    case = tie_free_case(**size, dtype=dtype, with_mask=True).to(device)
    runs = [desap_ops.prune(*case.args(), **case.options, backend="triton") for _ in range(3)]
    hidden = case.hidden.clone().requires_grad_(True)
    grads = []
    for _ in range(2):
        out = desap_ops.prune(hidden, *case.args()[1:], **case.options, backend="triton")
        (grad,) = torch.autograd.grad(out.tokens, hidden, torch.ones_like(out.tokens))
        grads.append(grad)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("device", DEVICES)
def test_keep_all_with_merge_returns_hidden(device):
    case = tie_free_case(tokens=33, keep=33).to(device)
    result = desap_ops.prune(*case.args(), backend="triton")
    assert torch.equal(result.tokens, case.hidden)
    assert torch.equal(result.assignment, torch.arange(33, device=device).expand(2, 33))
