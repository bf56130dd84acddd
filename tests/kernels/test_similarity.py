"""Launch 1 (kernels/similarity.py) against the reference: task scores, scale-free cosines."""
import math

import pytest
import torch

import desap_ops
from desap_ops import reference

from helpers import DTYPES, SCORE_ATOL, tie_free_case, triton_devices

DEVICES = triton_devices()



# --- launch 1: task scores ----------------------------------------------------------------------

SIMILARITY_SHAPES = [  # (B, N, C, L): single tiles, several tiles on every axis, odd sizes
    (1, 1, 16, 1),
    (2, 37, 24, 5),
    (1, 70, 130, 3),
    (2, 20, 40, 70),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SIMILARITY_SHAPES, ids=str)
@pytest.mark.parametrize("text_reduce", ["max", "mean"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_task_scores(kernels, device, dtype, shape, text_reduce, with_mask):
    batch, tokens, width, n_text = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    attn = torch.randn(batch, tokens, width, generator=gen).to(dtype).to(device)
    text = torch.randn(batch, n_text, width, generator=gen).to(dtype).to(device)
    mask = None
    if with_mask:
        mask = (torch.rand(batch, n_text, generator=gen) > 0.5).to(device)
        mask[0] = False  # an image with no valid text
    got = kernels[0].task_scores(attn, text, mask, text_reduce)
    expected = reference.task_scores(attn, text, mask, text_reduce)
    torch.testing.assert_close(got, expected, atol=SCORE_ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_task_scores_mixed_dtypes_and_strides(kernels, device):
    attn = torch.randn(2, 40, 33, device=device, dtype=torch.float16)
    text = torch.randn(2, 33, 6, device=device).transpose(1, 2)  # float32, not contiguous
    mask = torch.tensor([[True, False] * 3, [False] * 5 + [True]], device=device)
    torch.testing.assert_close(kernels[0].task_scores(attn, text, mask, "max"),
                               reference.task_scores(attn, text, mask, "max"), atol=SCORE_ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_task_scores_nan_and_zero_rows(kernels, device):
    attn = torch.randn(1, 6, 16, device=device)
    attn[0, 1, 3] = math.nan
    attn[0, 2] = 0.0  # a zero row: norm clamped, cosine 0
    text = torch.randn(1, 4, 16, device=device)
    text[0, 2, 0] = math.nan
    mask = torch.tensor([[True, True, False, True]], device=device)  # the NaN text row is masked
    for reduce in ("max", "mean"):
        got = kernels[0].task_scores(attn, text, mask, reduce)
        expected = reference.task_scores(attn, text, mask, reduce)
        torch.testing.assert_close(got, expected, atol=SCORE_ATOL, rtol=0, equal_nan=True)
        assert math.isnan(got[0, 1]) and got[0, 2] == 0


# --- scale-free cosines (contract, steps 1 and 4) -----------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.float32, 1e-30), (torch.bfloat16, 2.0**113),
                                         (torch.float16, 2.0**-20)], ids=str)
def test_huge_and_tiny_rows_give_the_unscaled_answer(device, dtype, scale):
    """Power-of-two scales keep the inputs exact, so scaling every row must change nothing at all
    beyond rounding: not the scores, not the kept tokens, not the groups."""
    case = tie_free_case(tokens=40, keep=8, dtype=dtype, with_mask=True, seed=7)
    if dtype == torch.float16:  # float16 has no room below 2**-24: only scale up there
        scale = 2.0**10
    base = desap_ops.prune(*case.args(), **case.options, backend="reference")
    scaled = [t * scale for t in (case.hidden, case.attn, case.text)]
    for backend, dev in (("reference", "cpu"), ("triton", device)):
        args = [t.to(dev) for t in scaled] + [case.saliency.to(dev)]
        mask = case.text_mask.to(dev)
        result = desap_ops.prune(*args, case.keep, text_mask=mask, backend=backend)
        torch.testing.assert_close(result.task_scores.cpu(), base.task_scores, atol=SCORE_ATOL, rtol=0)
        assert torch.equal(result.indices.cpu(), base.indices), backend
        assert torch.equal(result.assignment.cpu(), base.assignment), backend


@pytest.mark.parametrize("device", DEVICES)
def test_rows_far_apart_in_scale_share_one_tile(kernels, device):
    """A row at 1e30 next to a row at 1e-30 in the same tile, and a row whose largest entry sits in
    the last feature tile: each is scaled by its own power of two."""
    attn = torch.randn(1, 4, 70)
    attn[0, 0] *= 1e30
    attn[0, 1] *= 1e-30
    attn[0, 2, :64] *= 1e-20  # its largest magnitude only appears in the second tile
    text = torch.randn(1, 3, 70)
    text[0, 0] *= 1e25
    expected = reference.task_scores(attn / attn.abs().amax(-1, keepdim=True),
                                     text / text.abs().amax(-1, keepdim=True))
    for got in (kernels[0].task_scores(attn.to(device), text.to(device), None, "max").cpu(),
                reference.task_scores(attn, text)):
        torch.testing.assert_close(got, expected, atol=SCORE_ATOL, rtol=0)
        assert torch.isfinite(got).all()
