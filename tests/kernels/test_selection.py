"""Launch 2 (kernels/selection.py) against the reference: selection with ties and NaN, assignment."""
import math

import pytest
import torch

from desap_ops import reference, triton_backend

from helpers import DTYPES, tie_free_case, triton_devices

DEVICES = triton_devices()



# --- launch 2: selection and assignment ---------------------------------------------------------

def _select(kernels, saliency, scores, mask, metric, keep, ratio, merge):
    """The kernel's (indices, assignment), after checking the split it reports."""
    k_task = None if ratio == "auto" else reference.split_budget(keep, ratio)[1]
    indices, assignment, task_keep = kernels[1].select_and_assign(saliency, scores, mask, metric, keep, k_task,
                                                                  merge, auto_split=triton_backend.auto_split())
    has_text = reference.has_valid_text(mask, saliency.shape[0], saliency.device)
    assert torch.equal(task_keep, reference.task_budget(scores, keep, ratio, has_text))
    return indices, assignment


def _reference_select(saliency, scores, mask, metric, keep, ratio, merge):
    has_text = reference.has_valid_text(mask, saliency.shape[0], saliency.device)
    indices = reference.select_tokens(saliency, scores, keep, reference.task_budget(scores, keep, ratio, has_text))
    return indices, reference.assign_tokens(indices, metric, merge)


# the 1025-token image is the slowest under the interpreter: the slow stage of .ci/run runs it
SELECTION_SHAPES = [(1, 1, 1), (3, 10, 1), (2, 10, 10), (2, 37, 5), (1, 100, 33), (2, 300, 64),
                    pytest.param((1, 1025, 70), marks=pytest.mark.slow)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SELECTION_SHAPES, ids=str)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0, "auto"])
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
