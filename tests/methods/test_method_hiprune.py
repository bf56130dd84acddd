"""HiPrune (``desap_ops.methods.builtin.hiprune``) against a naive float64 form written from the paper
(Liu et al., arXiv 2508.00553, Section 3): anchors by the attention tokens receive at the middle
block, their spatial neighbours as buffers, registers by the attention received at the deep block
among the rest."""
import math

import pytest
import torch

from desap_ops.methods import MethodFailure, MethodInputs, TokenGrid, get_method, run_method

# (blocks, what they stand for): LLaVA-1.5's 24 x 24 patches; with [CLS] kept (a 1 x 1 block first);
# a non-square Qwen image; LLaVA-NeXT's base and unpadded AnyRes grid; a clip of 3 frames; a small
# square, too few tokens for an anchor at most budgets
GRIDS = [((1, 24, 24),), ((1, 1, 1), (1, 12, 12)), ((1, 7, 11),), ((1, 6, 6), (1, 9, 13)), ((3, 5, 8),),
         ((1, 3, 3),)]


def naive_hiprune(middle: list, deep: list, blocks, keep: int) -> list:
    """HiPrune by hand: ``round(K * 0.1 / 5)`` anchors of highest ``middle`` saliency; every
    neighbour above, below, left and right of an anchor in its block and frame; then the tokens of
    highest ``deep`` saliency among the rest up to K. Higher first, ties to the lower index, NaN last."""
    def ranked(values, among):
        return sorted(among, key=lambda i: (math.isnan(values[i]), 0.0 if math.isnan(values[i]) else -values[i], i))

    where, start = [], 0   # each token's (block, frame, row, column)
    for block, (frames, rows, cols) in enumerate(blocks):
        where += [(block, f, r, c) for f in range(frames) for r in range(rows) for c in range(cols)]
    index = {w: i for i, w in enumerate(where)}
    anchors = ranked(middle, range(len(middle)))[:round(keep * 0.1 / 5)]
    chosen = set(anchors)
    for a in anchors:
        block, f, r, c = where[a]
        for neighbour in ((block, f, r - 1, c), (block, f, r + 1, c), (block, f, r, c - 1), (block, f, r, c + 1)):
            if neighbour in index:
                chosen.add(index[neighbour])
    rest = [i for i in range(len(deep)) if i not in chosen]
    chosen |= set(ranked(deep, rest)[:keep - len(chosen)])
    return sorted(chosen)


def _select(middle: torch.Tensor, deep: torch.Tensor, blocks, keep: int) -> torch.Tensor:
    inputs = MethodInputs(hidden=torch.zeros(*deep.shape, 3), keep=keep, received=deep, layer_received=middle,
                          grid=TokenGrid(tuple(blocks)))
    return run_method(get_method("hiprune"), inputs, merge=False).indices


def _check(middle: torch.Tensor, deep: torch.Tensor, blocks, keep: int) -> None:
    got = _select(middle, deep, blocks, keep)
    for b in range(deep.shape[0]):
        expected = naive_hiprune(middle[b].double().tolist(), deep[b].double().tolist(), blocks, keep)
        assert got[b].tolist() == expected, (blocks, keep, b)


def _budgets(tokens: int) -> list[int]:
    """No anchor (K <= 25), one (26), two (75: 1.5 rounds up), two (125: 2.5 rounds to even), 3, all."""
    return sorted({k for k in (1, 7, 25, 26, 75, 125, 128, tokens) if k <= tokens})


@pytest.mark.parametrize("blocks", GRIDS)
def test_hiprune_equals_its_naive_form_on_random_saliency(blocks):
    tokens = TokenGrid(blocks).tokens
    gen = torch.Generator().manual_seed(tokens)
    middle, deep = torch.rand(3, tokens, generator=gen), torch.rand(3, tokens, generator=gen)
    for keep in _budgets(tokens):
        _check(middle, deep, blocks, keep)


@pytest.mark.parametrize("blocks", GRIDS)
def test_hiprune_breaks_exact_ties_to_the_lower_index_and_ranks_nan_last(blocks):
    # twin values: four levels, so most tokens tie exactly at both blocks; a few NaN; -0.0 beside +0.0
    tokens = TokenGrid(blocks).tokens
    gen = torch.Generator().manual_seed(7 + tokens)
    middle = torch.randint(0, 4, (3, tokens), generator=gen).float() / 4
    deep = torch.randint(0, 4, (3, tokens), generator=gen).float() / 4
    deep[:, ::5] = float("nan")
    middle[:, 1::7] = float("nan")
    deep[:, 2::9], middle[:, 3::11] = -0.0, -0.0
    middle[1] = middle[0]          # a twin image: the same tokens kept
    deep[1] = deep[0]
    for keep in _budgets(tokens):
        _check(middle, deep, blocks, keep)
        got = _select(middle, deep, blocks, keep)
        assert torch.equal(got[0], got[1])


def test_buffers_are_spatial_neighbours_never_wrapping_a_row_edge():
    # one anchor (K = 26) at the top-right corner of a 6 x 6 grid: its buffers are its left neighbour
    # and the one below; token 6 (the next row's first: index + 1 in the flat order) is not one
    middle = torch.zeros(1, 36)
    middle[0, 5] = 1.0
    deep = torch.linspace(1, 0, 36)[None]   # registers: the lowest indices first, 6 last of all
    deep[0, 6] = -1.0
    kept = _select(middle, deep, ((1, 6, 6),), 26)[0].tolist()
    assert {5, 4, 11} <= set(kept) and 6 not in kept and len(kept) == 26


def test_buffers_stay_within_their_frame_and_block():
    # one anchor (K = 26) on frame 0's last row of a 2 x (4 x 4) clip: (3, 1) = 13; its neighbour
    # "below" in the flat order, 17, is frame 1's (0, 1), not a buffer
    middle = torch.zeros(1, 32)
    middle[0, 13] = 1.0
    deep = torch.zeros(1, 32)
    deep[0, 17] = -1.0                     # the lowest: kept only as a buffer
    kept = _select(middle, deep, ((2, 4, 4),), 26)[0].tolist()
    assert {13, 9, 12, 14} <= set(kept) and 17 not in kept
    # and across blocks: LLaVA-NeXT's base (4 x 4) then its AnyRes grid (2 x 8); anchor at the base's (3, 1)
    kept = _select(middle, deep, ((1, 4, 4), (1, 2, 8)), 26)[0].tolist()
    assert {13, 9, 12, 14} <= set(kept) and 17 not in kept


def test_grid_must_hold_the_tokens_and_none_means_one_square():
    deep = torch.rand(1, 36)
    square = run_method(get_method("hiprune"), MethodInputs(hidden=torch.zeros(1, 36, 2), keep=30, received=deep,
                                                            layer_received=deep), merge=False).indices
    assert torch.equal(square, _select(deep, deep, ((1, 6, 6),), 30))
    with pytest.raises(MethodFailure, match="holds 35 tokens"):
        _select(deep, deep, ((1, 5, 7),), 30)
    with pytest.raises(MethodFailure, match="no square"):
        run_method(get_method("hiprune"), MethodInputs(hidden=torch.zeros(1, 35, 2), keep=3, received=deep[:, :35],
                                                       layer_received=deep[:, :35]), merge=False)
