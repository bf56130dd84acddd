"""Exact ties in the built-in methods (contract, "Exact ties"): tokens whose rows are bit-identical
(twins) tie exactly, and the tie goes to the lower index, in what each method keeps and in the
merge's nearest kept token. Each method against a naive float64 form, a token (or a pair) at a
time, where twins compute the same and ties go by index by construction."""
import math

import pytest
import torch

from desap_ops.methods import BUILTIN, MethodInputs, Signal, get_method, run_method
from helpers import DTYPES, TIE_MARGIN, assert_twins_settled, naive_assignment, naive_task_scores, twin_case

# the signals these inputs hold (the projected rows are the hidden ones)
FILLED = {Signal.SALIENCY, Signal.ATTN, Signal.TEXT, Signal.SEED, Signal.PROJECTED}
# every built-in that reads no more than these, and keeps a twin only with its first twin
# (random draws: a twin may be kept alone); the redundancy methods (dart-input, cdpruner-lm) read a
# prompt in the rows' space and have their twin tests beside their naive forms (test_method_redundancy)
OWN_TWIN_TESTS = {"random", "dart-input", "cdpruner-lm"}
SCORED = [m.name for m in BUILTIN if m.reads <= FILLED and m.name not in OWN_TWIN_TESTS]


def _inputs(dtype, seed, tokens=30, groups=10, keep=11) -> MethodInputs:
    case = twin_case(batch=2, tokens=tokens, groups=groups, keep=keep, dtype=dtype, seed=seed)
    return MethodInputs(hidden=case.hidden, keep=keep, saliency=case.saliency.float(), attn=case.attn,
                        text=case.text, text_mask=None, seed=torch.tensor([seed, seed + 1]), backend="reference",
                        projected=case.hidden)


def _top_by_index(values: list, keep: int) -> list:
    """The ``keep`` largest (ties to the lower index), ascending; None if two unequal values
    within TIE_MARGIN decide."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    if keep < len(values):
        edge, after = values[order[keep - 1]], values[order[keep]]
        if edge != after and edge - after <= TIE_MARGIN:
            return None
    return sorted(order[:keep])


def naive_twin_divprune(hidden: torch.Tensor, keep: int):
    """DivPrune (Algorithm 1) in float64 a pair at a time: d(i, j) = 1 - cos(x_i, x_j), and 0 for
    bit-identical rows (their cosine is 1 exactly); the first token is the one whose nearest other
    token is farthest, each next one the farthest from its nearest chosen token; equal scores go
    to the lower index. None where two unequal scores within TIE_MARGIN decide."""
    rows = hidden.double()
    n = rows.shape[0]
    bits = hidden.contiguous().view(torch.uint8)
    same = [[torch.equal(bits[i], bits[j]) for j in range(n)] for i in range(n)]
    norm = [math.sqrt(float(rows[i] @ rows[i])) for i in range(n)]
    d = [[0.0 if same[i][j] else 1 - float(rows[i] @ rows[j]) / (norm[i] * norm[j]) for j in range(n)] for i in range(n)]
    score = [min(d[i][j] for j in range(n) if j != i) for i in range(n)]
    picked = []
    while len(picked) < keep:
        left = sorted((i for i in range(n) if i not in picked), key=lambda i: (-score[i], i))
        if len(left) > 1 and score[left[0]] != score[left[1]] and score[left[0]] - score[left[1]] <= TIE_MARGIN:
            return None
        picked.append(left[0])
        score = [min(score[i], d[i][left[0]]) if len(picked) > 1 else d[i][left[0]] for i in range(n)]
    return sorted(picked)


def _naive(name: str, inputs: MethodInputs):
    """Per image, the kept indices by the naive form, or None on a near-tie."""
    keep = inputs.keep
    if name == "first":
        return [list(range(keep))] * inputs.hidden.shape[0]
    if name == "saliency":
        return [_top_by_index(row, keep) for row in inputs.saliency.double().tolist()]
    if name == "similarity":
        return [_top_by_index(row, keep) for row in naive_task_scores(inputs.attn, inputs.text).tolist()]
    if name == "divprune":
        return [naive_twin_divprune(hidden, keep) for hidden in inputs.hidden]
    raise AssertionError(f"no naive form of {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [n for n in SCORED if n != "desap"])
def test_each_method_keeps_and_merges_twins_as_its_naive_form_with_ties_to_the_lower_index(name, dtype):
    for seed in range(40):   # the first seed free of near-ties between different tokens
        inputs = _inputs(dtype, seed)
        expected = _naive(name, inputs)
        if None not in expected:
            break
    result = run_method(get_method(name), inputs, merge=True)
    assert result.indices.tolist() == expected
    assignment, _ = naive_assignment(inputs.hidden, result.indices, merge=True)
    assert torch.equal(result.assignment, assignment)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SCORED)
def test_a_twin_is_kept_only_with_its_first_twin_and_dropped_twins_merge_together(name, dtype):
    inputs = _inputs(dtype, seed=3, tokens=36, groups=9, keep=14)
    result = run_method(get_method(name), inputs, merge=True)
    assert_twins_settled(inputs.hidden, result.indices, result.assignment)
