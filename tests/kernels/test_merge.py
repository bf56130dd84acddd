"""Launch 3 (kernels/merge.py) against the reference: the mean merge and its backward."""
import math

import pytest
import torch

from desap_ops import reference

from helpers import DTYPES, TOKEN_TOL, triton_devices

DEVICES = triton_devices()



# --- launch 3: merge and its backward -----------------------------------------------------------

def _random_groups(batch, tokens, keep, merge, gen):
    indices = torch.stack([torch.randperm(tokens, generator=gen)[:keep].sort().values for _ in range(batch)])
    positions = reference.output_positions(indices, tokens)
    if merge:
        other = torch.randint(0, keep, (batch, tokens), generator=gen)
        return indices, torch.where(positions >= 0, positions, other)
    return indices, positions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 50, 7, 24), pytest.param((1, 130, 64, 600), marks=pytest.mark.slow),
                                   (3, 65, 65, 8)], ids=str)
@pytest.mark.parametrize("merge", [True, False])
def test_merge_tokens(kernels, device, dtype, shape, merge):
    batch, tokens, keep, width = shape
    gen = torch.Generator().manual_seed(tokens + keep)
    hidden = torch.randn(batch, tokens, width, generator=gen).to(dtype).to(device)
    indices, assignment = (t.to(device) for t in _random_groups(batch, tokens, keep, merge, gen))
    got = kernels[2].merge_tokens(hidden, indices, assignment, merge)
    expected = reference.merge_tokens(hidden, indices, assignment, merge)
    rtol, atol = TOKEN_TOL[dtype]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_keeps_nan_and_inf_inside_their_group(kernels, device):
    hidden = torch.randn(1, 8, 16, device=device)
    hidden[0, 5, 2] = math.nan
    hidden[0, 6, 3] = math.inf
    indices = torch.tensor([[0, 1, 2]], device=device)
    assignment = torch.tensor([[0, 1, 2, 0, 1, 2, 1, 0]], device=device)
    got = kernels[2].merge_tokens(hidden, indices, assignment, True)
    expected = reference.merge_tokens(hidden, indices, assignment, True)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert torch.isfinite(got[0, 0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merge", [True, False])
def test_merge_backward(kernels, device, dtype, merge):
    gen = torch.Generator().manual_seed(5)
    indices, assignment = (t.to(device) for t in _random_groups(2, 70, 9, merge, gen))
    grad = torch.randn(2, 12, 9, generator=gen).transpose(1, 2).to(dtype).to(device)  # strided
    got = kernels[2].unmerge_grad(grad, assignment)
    expected = reference.prune_backward(grad, assignment)
    rtol, atol = TOKEN_TOL[dtype]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
