"""Each Triton kernel against the reference: interpreted on CPU (CI), compiled on CUDA when present."""
import math

import pytest
import torch

import desap_ops
from desap_ops import reference
from desap_ops.validation import split_budget

from helpers import DTYPES, SCORE_ATOL, TOKEN_TOL, assert_matches_reference, tie_free_case, triton_devices

DEVICES = triton_devices()


@pytest.fixture(scope="module")
def kernels():
    from desap_ops.kernels import merge, selection, similarity

    return similarity, selection, merge


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


# --- launch 2: selection and assignment ---------------------------------------------------------

def _select(kernels, saliency, scores, mask, metric, keep, ratio, merge):
    _, k_task = split_budget(keep, ratio)
    return kernels[1].select_and_assign(saliency, scores, mask, metric, keep, k_task, merge)


def _reference_select(saliency, scores, mask, metric, keep, ratio, merge):
    has_text = reference.has_valid_text(mask, saliency.shape[0], saliency.device)
    indices = reference.select_tokens(saliency, scores, keep, ratio, has_text)
    return indices, reference.assign_tokens(indices, metric, merge)


SELECTION_SHAPES = [(1, 1, 1), (3, 10, 1), (2, 10, 10), (2, 37, 5), (1, 100, 33), (2, 300, 64), (1, 1025, 70)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SELECTION_SHAPES, ids=str)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_selection_with_ties_nan_and_no_text(kernels, device, shape, ratio):
    """Saliency and scores drawn from a few values, so exact ties abound; NaN, +-0 and +-inf too."""
    batch, tokens, keep = shape
    gen = torch.Generator().manual_seed(tokens * 7 + keep)
    palette = torch.tensor([math.nan, -math.inf, -1.0, -0.0, 0.0, 0.5, 1.0, math.inf])
    saliency = palette[torch.randint(0, 8, (batch, tokens), generator=gen)].to(device)
    scores = palette[torch.randint(1, 8, (batch, tokens), generator=gen)]
    scores[:, ::7] = math.nan
    scores = scores.to(device)
    mask = torch.ones(batch, 3, dtype=torch.bool, device=device)
    mask[-1] = False  # the last image has no text: K_task = 0 there
    metric = torch.randn(batch, tokens, 8, generator=gen).to(device)
    got = _select(kernels, saliency, scores, mask, metric, keep, ratio, merge=False)
    expected = _reference_select(saliency, scores, mask, metric, keep, ratio, merge=False)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 40, 8, 16), (1, 150, 70, 40), (2, 33, 33, 24), (1, 5, 1, 16)], ids=str)
def test_assignment_is_exact_on_tie_free_inputs(kernels, device, dtype, shape):
    batch, tokens, keep, width = shape
    case = tie_free_case(batch=batch, tokens=tokens, keep=keep, width=width, dtype=dtype,
                         separate_metric=True, seed=tokens).to(device)
    scores = reference.task_scores(case.attn, case.text, None, "max")
    got = _select(kernels, case.saliency, scores, None, case.metric, keep, 0.5, merge=True)
    expected = _reference_select(case.saliency, scores, None, case.metric, keep, 0.5, merge=True)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("device", DEVICES)
def test_assignment_picks_a_nearest_kept_token_on_random_inputs(kernels, device):
    """Without a margin, the chosen kept token must still be nearest within float32 rounding."""
    gen = torch.Generator().manual_seed(11)
    metric = torch.randn(2, 90, 20, generator=gen).to(device)
    saliency = torch.rand(2, 90, generator=gen).to(device)
    scores = torch.rand(2, 90, generator=gen).to(device)
    indices, assignment = _select(kernels, saliency, scores, None, metric, 12, 0.5, merge=True)
    unit = reference.unit_rows(metric)
    kept = unit.gather(1, indices[:, :, None].expand(-1, -1, 20))
    sim = torch.bmm(unit, kept.transpose(1, 2))
    chosen = sim.gather(2, assignment[:, :, None]).squeeze(2)
    assert (chosen >= sim.max(dim=2).values - 1e-6).all()


@pytest.mark.parametrize("device", DEVICES)
def test_assignment_ties_nan_and_duplicates(kernels, device):
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [math.nan, 1.0],
                            [0.0, 1.0], [0.0, 0.0]]], device=device)
    saliency = torch.tensor([[9.0, 8.0, 0.0, 7.0, 0.0, 0.0, 0.0]], device=device)
    scores = torch.zeros(1, 7, device=device)
    got = _select(kernels, saliency, scores, None, metric, 3, 0.0, merge=True)
    expected = _reference_select(saliency, scores, None, metric, 3, 0.0, merge=True)
    assert got[0].tolist() == [[0, 1, 3]]
    # 2 is equally near 0 and 1 -> position 0; 4 (NaN) -> 0; 6 (zero row, cos 0 to all) -> 0
    assert got[1].tolist() == expected[1].tolist() == [[0, 1, 0, 2, 0, 1, 0]]


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
@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 50, 7, 24), (1, 130, 64, 600), (3, 65, 65, 8)], ids=str)
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
    """On CUDA this is the determinism proof (the interpreter cannot show a race)."""
    case = tie_free_case(batch=3, tokens=150, keep=20, width=64, dtype=dtype, with_mask=True).to(device)
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
