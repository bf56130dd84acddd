"""Exact ties (contract, "Exact ties"): bit-identical tokens (twins) tie exactly and the tie goes to
the lower index, in the task scores, the selection and the merge's nearest kept token, in the
reference and in the Triton path alike (under the interpreter without a GPU)."""
import pytest
import torch

import desap_ops
from desap_ops import reference

from helpers import DTYPES, naive_assignment, naive_select, naive_task_scores, triton_devices, twin_case, twin_groups

BACKENDS = ["reference"] + [f"triton-{device}" for device in triton_devices()]
# (tokens, groups, keep, task_ratio, separate metric): the boundary of either stage inside a group
CASES = [(30, 10, 11, 0.5, False), (40, 8, 13, 0.3, True), (24, 12, 7, 1.0, False), (36, 9, 20, 0.0, False)]


def _run(case, backend):
    name, _, device = backend.partition("-")
    case = case.to(device or "cpu")
    return desap_ops.prune(*case.args(), **case.options, backend=name)


def _cover_the_rule(case, indices):
    """The case exercises both rules: a group cut by the budget (kept and dropped copies), and a
    group with two kept copies (a twin as merge target)."""
    kept = [set(row.tolist()) for row in indices]
    groups = [(b, g) for b, image in enumerate(twin_groups(case.hidden)) for g in image]
    assert any(g[0] in kept[b] and any(n not in kept[b] for n in g) for b, g in groups)
    assert any(len(kept[b] & set(g)) >= 2 for b, g in groups)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CASES, ids=str)
def test_twins_tie_exactly_and_go_to_the_lower_index(backend, dtype, config):
    tokens, groups, keep, ratio, separate = config
    case = twin_case(tokens=tokens, groups=groups, keep=keep, dtype=dtype, task_ratio=ratio,
                     separate_metric=separate, seed=tokens + keep)
    result = _run(case, backend)
    # the float64 contract, a token at a time: twins compute the same, so ties go by index
    scores = naive_task_scores(case.attn, case.text)
    has_text = torch.ones(case.hidden.shape[0], dtype=torch.bool)
    expected = naive_select(case.saliency, scores, keep, ratio, has_text)
    assert torch.equal(result.indices.cpu(), expected)
    metric = case.hidden if case.metric is None else case.metric
    assignment, _ = naive_assignment(metric, expected, merge=True)
    assert torch.equal(result.assignment.cpu(), assignment)
    _cover_the_rule(case, expected)
    # twins' task scores are bitwise equal
    for image, groups_of_image in enumerate(twin_groups(case.attn)):
        for group in groups_of_image:
            assert len(set(result.task_scores[image, group].cpu().tolist())) == 1


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_equals_the_reference_on_twins_with_auto_split(backend, dtype):
    case = twin_case(tokens=48, groups=12, keep=16, dtype=dtype, task_ratio="auto", seed=5)
    result, expected = _run(case, backend), _run(case, "reference")
    assert torch.equal(result.indices.cpu(), expected.indices)
    assert torch.equal(result.assignment.cpu(), expected.assignment)
    assert torch.equal(result.task_keep.cpu(), expected.task_keep)


def test_first_twin_finds_bit_identical_rows_only():
    rows = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [-0.0, 1.0], [0.0, 1.0], [3.0, 4.0], [1.0, 2.0]],
                         [[5.0, 5.0], [5.0, 5.0], [5.0, 6.0], [5.0, 5.0], [6.0, 5.0], [5.0, 6.0], [7.0, 7.0]]])
    # -0.0 and +0.0 are equal numbers but different bits: not twins
    assert reference.first_twin(rows).tolist() == [[0, 1, 0, 3, 4, 1, 0], [0, 0, 2, 0, 4, 2, 6]]
    assert reference.first_twin(rows.double()).tolist() == reference.first_twin(rows).tolist()
    nan = torch.tensor([[[float("nan")], [1.0], [float("nan")]]])
    assert reference.first_twin(nan).tolist() == [[0, 1, 0]]
    assert reference.first_twin(torch.zeros(2, 1, 3)).tolist() == [[0], [0]]


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
def test_first_twin_equals_the_groups_by_hand_on_random_copies(dtype):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 7, 5, generator=gen).to(dtype)
    src = torch.randint(0, 7, (3, 40), generator=gen)
    rows = base.gather(1, src[:, :, None].expand(-1, -1, 5))
    expected = torch.empty(3, 40, dtype=torch.int64)
    for image, groups in enumerate(twin_groups(rows)):
        for group in groups:
            expected[image, group] = group[0]
    assert torch.equal(reference.first_twin(rows), expected)


def test_tie_exact_gives_each_token_its_first_twins_score():
    rows = torch.tensor([[[1.0], [2.0], [1.0], [2.0]]])
    scores = torch.tensor([[0.5, 0.25, 0.5000001, 0.2500001]])
    assert reference.tie_exact(scores, rows).tolist() == [[0.5, 0.25, 0.5, 0.25]]


def test_a_kept_twin_of_higher_position_never_takes_a_dropped_token():
    """Two kept copies of one token: whatever the rounding of their cosines, every dropped token
    that would merge into either goes to the lower position, and a dropped copy goes to its kept
    twin. The raw nearest positions are forced onto the higher twin here, as rounding might."""
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.0]]])
    indices = torch.tensor([[0, 3, 4]])
    raw = torch.tensor([[2, 2, 2, 1, 2]])           # the copy of token 0 at position 2 "won" everywhere
    assert reference.settle_twins(raw, indices, metric).tolist() == [[0, 0, 0, 1, 0]]   # (kept tokens: not read)


def _rounding_by_place(unit_rows):
    """``unit_rows`` whose last bit depends on where a row sits, as a tiled product's rounding
    may: twins' cosines then differ in their last bits, as they do between the engines."""
    def noisy(x):
        rows = unit_rows(x)
        place = torch.arange(rows.shape[-2], device=rows.device)[:, None]
        return rows * (1 + ((place * 5) % 3 - 1).to(rows.dtype) * 2.0 ** -23)
    return noisy


@pytest.mark.parametrize("config", CASES, ids=str)
def test_twins_are_decided_by_index_whatever_the_rounding_of_their_cosines(config, monkeypatch):
    tokens, groups, keep, ratio, separate = config
    case = twin_case(tokens=tokens, groups=groups, keep=keep, task_ratio=ratio, separate_metric=separate,
                     seed=tokens + keep)
    exact = desap_ops.prune(*case.args(), **case.options, backend="reference")
    monkeypatch.setattr(reference, "unit_rows", _rounding_by_place(reference.unit_rows))
    noisy = desap_ops.prune(*case.args(), **case.options, backend="reference")
    assert torch.equal(noisy.indices, exact.indices)
    assert torch.equal(noisy.assignment, exact.assignment)
    for image, groups_of_image in enumerate(twin_groups(case.attn)):
        for group in groups_of_image:
            assert len(set(noisy.task_scores[image, group].tolist())) == 1


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_the_triton_path_settles_twins_whatever_its_kernels_rounding(backend, monkeypatch):
    """The launcher applies the rule to what its kernels give: task scores whose last bit depends on
    a token's place, and a nearest kept token moved onto the highest kept copy of the one chosen
    (as rounding may do) still give the reference's exact result."""
    from desap_ops import triton_backend

    case = twin_case(tokens=30, groups=10, keep=11, seed=41)
    exact = _run(case, "reference")
    scores_of, select = triton_backend.similarity.task_scores, triton_backend.selection.select_and_assign
    moved = []

    def noisy_scores(*args):
        scores = scores_of(*args)
        place = torch.arange(scores.shape[-1], device=scores.device)
        return scores * (1 + ((place * 5) % 3 - 1).float() * 2.0 ** -23)

    def onto_the_last_copy(saliency, scores, text_mask, metric, *args, **kwargs):
        indices, assignment, task_keep = select(saliency, scores, text_mask, metric, *args, **kwargs)
        copies = reference.first_twin(metric).gather(1, indices)                       # (B, K)
        same = copies[:, :, None] == copies[:, None, :]
        last = torch.where(same, torch.arange(indices.shape[1], device=indices.device), -1).amax(dim=-1)
        dropped = reference.output_positions(indices, metric.shape[1]) < 0
        shifted = torch.where(dropped, last.gather(1, assignment.clamp_min(0)), assignment)
        moved.append(bool((shifted != assignment).any()))
        return indices, shifted, task_keep

    monkeypatch.setattr(triton_backend.similarity, "task_scores", noisy_scores)
    monkeypatch.setattr(triton_backend.selection, "select_and_assign", onto_the_last_copy)
    result = _run(case, backend)
    assert moved == [True]
    assert torch.equal(result.indices.cpu(), exact.indices)
    assert torch.equal(result.assignment.cpu(), exact.assignment)
    for image, groups_of_image in enumerate(twin_groups(case.attn)):
        for group in groups_of_image:
            assert len(set(result.task_scores[image, group].cpu().tolist())) == 1
