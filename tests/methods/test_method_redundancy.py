"""dart-input and cdpruner-lm (desap_ops.methods.redundancy) against naive float64 forms written
from their papers: DART's pivots and per-pivot least-similar tokens (Wen et al. 2025, arXiv
2502.11494), and CDPruner's conditional DPP (arXiv 2506.10967) by its definition, each step the
token of largest Schur complement of the kernel, solved directly (not Chen et al.'s incremental
Cholesky, which the method runs). Random rows, and rows with bit-identical twins."""
import dataclasses
import math

import pytest
import torch

from desap_ops.methods import MethodInputs, get_method, run_method
from desap_ops.methods.redundancy import ZERO_GAIN, dart_select
from helpers import DTYPES, TIE_MARGIN, naive_task_scores

# (images, tokens, width, keep): one token kept (fewer than DART's pivots), a quarter, a half with
# more tokens than the width (the DPP runs out of rank), all of them
SHAPES = [(1, 9, 8, 1), (2, 48, 16, 12), (1, 40, 6, 20), (3, 33, 5, 33)]


class NearTie(Exception):
    """A choice the naive form makes by less than TIE_MARGIN (but not by an exact tie)."""


def _ranked(scores: list, candidates) -> list:
    """``candidates`` by decreasing score, ties to the lower index, NaN last."""
    return sorted(candidates, key=lambda i: (1, 0.0, i) if math.isnan(scores[i]) else (0, -scores[i], i))


def _first(scores: list, candidates, count: int) -> list:
    """The ``count`` best of ``candidates``; NearTie when the count-th and the next differ by less than
    TIE_MARGIN without being equal (an exact tie is decided by the index)."""
    order = _ranked(scores, candidates)
    if 0 < count < len(order):
        gap = abs(scores[order[count - 1]] - scores[order[count]])
        if 0 < gap <= TIE_MARGIN:
            raise NearTie
    return order[:count]


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    nx, ny = math.sqrt(float((x * x).sum())), math.sqrt(float((y * y).sum()))
    return 0.0 if nx == 0 or ny == 0 else float((x * y).sum()) / (nx * ny)


def naive_dart(rows: torch.Tensor, keep: int, text=None, valid=None, image_pivots=4, text_pivots=4) -> list:
    """DART in float64, by hand: the image pivots are the tokens of largest L1 norm (DART ranks the
    keys' L1 norm; at the input, the rows'), the text pivots the prompt rows of largest L1 norm; each
    pivot in turn takes ceil(left / pivots left) of the budget left, the candidates least cosine-similar
    to it; pivots are kept, text pivots are not tokens."""
    n = rows.shape[0]
    l1 = [float(rows[i].double().abs().sum()) for i in range(n)]
    image = _first(l1, range(n), min(image_pivots, keep))
    pivots = [rows[i] for i in image]
    if text is not None:
        words = [l for l in range(text.shape[0]) if valid is None or bool(valid[l])]
        text_l1 = [float(text[l].double().abs().sum()) for l in range(text.shape[0])]
        pivots += [text[l] for l in _first(text_l1, words, min(text_pivots, len(words)))]
    kept, left = list(image), keep - len(image)
    for done, pivot in enumerate(pivots):
        if left == 0:
            break
        share = math.ceil(left / (len(pivots) - done))
        dissimilarity = [-_cos(pivot, rows[i]) for i in range(n)]
        kept += _first(dissimilarity, [i for i in range(n) if i not in kept], share)
        left -= share
    return sorted(kept)


def naive_relevance(attn, text, mask) -> list:
    """CDPruner's relevance, per image: the mean cosine of each token with the prompt's tokens,
    min-max normalised as (r - min + 1e-6) / (max - min); 1 everywhere for an image with no text."""
    out = []
    for scores in naive_task_scores(attn, text, mask, "mean").tolist():
        if all(math.isinf(s) for s in scores):
            out.append([1.0] * len(scores))
            continue
        low, high = min(scores), max(scores)
        out.append([(s - low + 1e-6) / (high - low) for s in scores])
    return out


def naive_dpp(rows: torch.Tensor, relevance: list, keep: int) -> list:
    """The greedy MAP of the DPP with kernel L_ij = r_i cos(x_i, x_j) r_j, in float64 by its
    definition: each step keeps the token j of largest gain L_jj - L_jY L_YY^-1 L_Yj over the tokens
    Y kept with a gain (ties to the lower index); a gain at most ZERO_GAIN times the largest L_jj is
    none, and such a token does not join Y."""
    n = rows.shape[0]
    r = torch.tensor(relevance, dtype=torch.float64)
    cos = torch.tensor([[_cos(rows[i], rows[j]) if i != j else float(bool(rows[i].any())) for j in range(n)]
                        for i in range(n)], dtype=torch.float64)   # cos(x, x) = 1, exactly
    kernel = r[:, None] * cos * r[None, :]
    zero = ZERO_GAIN * float(kernel.diagonal().max())
    basis, kept = [], []
    for _ in range(keep):
        gains = [0.0] * n
        for j in range(n):
            if j in kept:
                continue
            gain = float(kernel[j, j])
            if basis:
                block, cross = kernel[basis][:, basis], kernel[basis, j]
                gain -= float(cross @ torch.linalg.solve(block, cross))
            gains[j] = gain if gain > zero else 0.0
        best = _first(gains, [j for j in range(n) if j not in kept], 1)[0]
        kept.append(best)
        if gains[best] > 0:
            basis.append(best)
    return sorted(kept)


def _inputs(batch, tokens, width, keep, dtype=torch.float32, seed=0, mask=None, twins=()) -> MethodInputs:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, width, generator=gen).to(dtype)
    attn = torch.randn(batch, tokens, 6, generator=gen).to(dtype)
    for a, b in twins:   # bit-identical tokens: every signal of b is a's
        hidden[:, b], attn[:, b] = hidden[:, a], attn[:, a]
    # the rows the language model receives (the methods' rows) are hidden here; the prompt is in
    # their space for DART's text pivots and in the attention branch's for CDPruner's relevance
    text = torch.randn(batch, 5, 6, generator=gen).to(dtype)
    return MethodInputs(hidden=hidden, keep=keep, attn=attn, text=text, text_mask=mask, projected=hidden)


def _dart_inputs(inputs: MethodInputs, seed: int = 0) -> MethodInputs:
    """``inputs`` with a prompt in the projected rows' space (DART's text pivots)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    batch, _, width = inputs.projected.shape
    return dataclasses.replace(inputs, text=torch.randn(batch, 5, width, generator=gen).to(inputs.projected.dtype))


def _select(name: str, inputs: MethodInputs) -> list:
    return run_method(get_method(name), inputs, merge=False).indices.tolist()


def _expected(name: str, inputs: MethodInputs) -> list:
    if name == "dart-input":
        masks = inputs.text_mask if inputs.text_mask is not None else [None] * inputs.projected.shape[0]
        return [naive_dart(rows, inputs.keep, text, mask) for rows, text, mask in
                zip(inputs.projected, inputs.text, masks)]
    relevance = naive_relevance(inputs.attn, inputs.text, inputs.text_mask)
    return [naive_dpp(rows, r, inputs.keep) for rows, r in zip(inputs.projected, relevance)]


def _first_tie_free(name: str, shape, **options):
    """The first seed whose images the naive form decides with margins (a few tries at most)."""
    for seed in range(100):
        inputs = _inputs(*shape, seed=seed, **options)
        if name == "dart-input":
            inputs = _dart_inputs(inputs, seed)
        try:
            return inputs, _expected(name, inputs)
        except NearTie:
            continue
    raise AssertionError("no tie-free seed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["dart-input", "cdpruner-lm"])
def test_each_method_keeps_what_its_naive_form_keeps(name, shape, dtype):
    inputs, expected = _first_tie_free(name, shape, dtype=dtype)
    assert _select(name, inputs) == expected


@pytest.mark.parametrize("shape", SHAPES)
def test_cdpruner_lm_reads_only_the_valid_text_and_a_text_blind_image_runs_the_plain_dpp(shape):
    batch, _, _, keep = shape
    mask = torch.zeros(batch, 5, dtype=torch.bool)
    mask[0, :2] = True   # the first image reads two words; the others (if any) none
    inputs, expected = _first_tie_free("cdpruner-lm", shape, mask=mask)
    assert _select("cdpruner-lm", inputs) == expected
    # the condition matters: with all its words, the first image keeps other tokens
    unmasked = dataclasses.replace(inputs, text_mask=None)
    if 1 < keep < shape[1]:
        assert _select("cdpruner-lm", unmasked)[0] != expected[0]


@pytest.mark.parametrize("tokens, keep", [(24, 12), (40, 13), (17, 9)])
def test_dart_with_text_pivots_keeps_what_its_naive_form_keeps(tokens, keep):
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        rows, text = torch.randn(2, tokens, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
        mask = torch.tensor([[True] * 6, [True, False, True, False, False, False]])
        try:
            expected = [naive_dart(rows[b], keep, text[b], mask[b]) for b in range(2)]
            break
        except NearTie:
            continue
    assert dart_select(rows, keep, text, mask).tolist() == expected
    assert dart_select(rows, keep, text, mask).tolist() != dart_select(rows, keep).tolist()   # the text pivots count


# twins: (original, copy) pairs, at different row offsets; three of a kind (0); a copy before its original
TWINS = [(3, 7), (10, 11), (0, 29), (0, 30), (21, 5)]


@pytest.mark.parametrize("keep", [1, 4, 9, 20, 31])
@pytest.mark.parametrize("name", ["dart-input", "cdpruner-lm"])
def test_bit_identical_tokens_tie_exactly_and_go_to_the_lower_index(name, keep):
    inputs, expected = _first_tie_free(name, (2, 31, 7, keep), twins=TWINS)
    got = _select(name, inputs)
    assert got == expected
    if name == "cdpruner-lm" and keep <= 7:
        # within the kernel's rank (the width, 7) a copy adds nothing to what its original brings
        assert not any(a in row and b in row for row in got for a, b in TWINS)


def test_dart_keeps_only_pivots_when_the_budget_is_the_pivots():
    rows = torch.zeros(1, 10, 4)
    rows[0, :, 0] = torch.tensor([1.0, 5.0, 2.0, 5.0, 3.0, 0.5, 4.0, 0.0, 6.0, 1.5])   # L1 norms
    assert dart_select(rows, 4).tolist() == [[1, 3, 6, 8]]      # the four largest, 1 before its equal 3
    assert dart_select(rows, 2).tolist() == [[1, 8]]


@pytest.mark.parametrize("name", ["dart-input", "cdpruner-lm"])
def test_a_token_holding_nan_ranks_below_every_other(name):
    inputs = _inputs(1, 12, 16, 11, seed=3)
    inputs = _dart_inputs(inputs) if name == "dart-input" else inputs
    hidden = inputs.hidden.clone()
    hidden[0, 4, 2] = float("nan")
    assert _select(name, dataclasses.replace(inputs, hidden=hidden, projected=hidden)) == \
        [[i for i in range(12) if i != 4]]
