"""The built-in ``visionzip`` against a naive VisionZip written from the paper (Yang et al., CVPR
2025, arXiv 2412.04467) and its authors' code, in float64 with loops: dominant tokens by saliency,
targets every ``R // C``-th among the rest, each other token to its target of highest key cosine,
a contextual token = its target + the mean of the tokens sent to it."""
from fractions import Fraction

import pytest
import torch

from desap_ops.methods import MethodInputs, Signal, get_method, run_method
from desap_ops.methods.visionzip import contextual_count
from helpers import DTYPES, TOKEN_TOL

# (images, tokens, keep): one kept, a few, a quarter, all; LLaVA-1.5's 576 at the paper's 64
SHAPES = [(1, 9, 1), (2, 20, 7), (2, 48, 12), (3, 33, 33), (1, 576, 64)]


def naive_split(keep: int) -> tuple[int, int]:
    """(dominant, contextual): the paper's 5.4 : 1 (54 : 10 of 64, 108 : 20 of 128, 162 : 30 of
    192), C = floor(K / 6.4) exactly, and at least one contextual token."""
    contextual = max(1, int(Fraction(keep) / Fraction(32, 5)))
    return keep - contextual, contextual


def naive_visionzip(hidden, saliency, keys, keep: int, merge: bool):
    """One image: (kept indices ascending, assignment, tokens) in float64, by hand."""
    tokens = len(hidden)
    dominant_count, contextual_count_ = naive_split(keep)
    ranked = sorted(range(tokens), key=lambda i: (-float(saliency[i]), i))   # ties to the lower index
    dominant = sorted(ranked[:dominant_count])
    rest = [i for i in range(tokens) if i not in dominant]
    step = max(1, len(rest) // contextual_count_)
    targets = [rest[j * step] for j in range(contextual_count_)]
    kept = sorted(dominant + targets)
    position = {index: slot for slot, index in enumerate(kept)}
    assignment = [position.get(i, -1) for i in range(tokens)]
    out = [hidden[i].clone() for i in kept]
    if not merge:
        return kept, assignment, torch.stack(out)

    def unit(v):
        return v / v.norm()

    groups = {t: [] for t in targets}
    for i in rest:
        if i in targets:
            continue
        best, best_cos = None, None
        for t in targets:                                   # the first of equal cosines: the lower index
            cos = float(unit(keys[i]) @ unit(keys[t]))
            if best is None or cos > best_cos:
                best, best_cos = t, cos
        groups[best].append(i)
        assignment[i] = position[best]
    for t, members in groups.items():
        if members:
            out[position[t]] = hidden[t] + torch.stack([hidden[i] for i in members]).mean(dim=0)
    return kept, assignment, torch.stack(out)


def _inputs(batch, tokens, keep, dtype=torch.float32, seed=0, width=8, key_width=5) -> MethodInputs:
    gen = torch.Generator().manual_seed(seed)
    return MethodInputs(hidden=torch.randn(batch, tokens, width, generator=gen).to(dtype), keep=keep,
                        saliency=torch.rand(batch, tokens, generator=gen),
                        keys=torch.randn(batch, tokens, key_width, generator=gen).to(dtype))


def _check(inputs: MethodInputs, merge: bool):
    result = run_method(get_method("visionzip"), inputs, merge)
    assert result.tokens.dtype == inputs.hidden.dtype and result.task_scores is None
    for b in range(inputs.hidden.shape[0]):
        kept, assignment, tokens = naive_visionzip(inputs.hidden[b].double(), inputs.saliency[b].double(),
                                                   inputs.keys[b].double(), inputs.keep, merge)
        assert result.indices[b].tolist() == kept
        assert result.assignment[b].tolist() == assignment
        rtol, atol = TOKEN_TOL[inputs.hidden.dtype]
        torch.testing.assert_close(result.tokens[b].double(), tokens.to(inputs.hidden.dtype).double(),
                                   rtol=rtol, atol=atol)
    return result


def test_the_split_is_the_papers():
    assert [(k - contextual_count(k), contextual_count(k)) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert [naive_split(k) for k in (1, 6, 7, 160)] == [(0, 1), (5, 1), (6, 1), (135, 25)]
    assert all(naive_split(k) == (k - contextual_count(k), contextual_count(k)) for k in range(1, 700))


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_visionzip_is_the_naive_form_on_random_inputs(shape, dtype, merge):
    batch, tokens, keep = shape
    _check(_inputs(batch, tokens, keep, dtype, seed=tokens + keep), merge)


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("shape", [(2, 24, 6), (1, 40, 13), (2, 64, 20)])
def test_twin_rows_go_to_the_lower_index(shape, merge):
    """Bit-identical rows (equal saliency, keys and features) tie exactly: the dominant tokens and
    the target a token goes to are the lower index's, as the naive form decides them."""
    batch, tokens, keep = shape
    gen = torch.Generator().manual_seed(tokens)
    base = _inputs(batch, tokens // 4, keep)
    twins = torch.randint(0, tokens // 4, (tokens,), generator=gen)   # every row a copy of one of a few
    twins[:tokens // 4] = torch.arange(tokens // 4)
    inputs = MethodInputs(hidden=base.hidden[:, twins], keep=keep, saliency=base.saliency[:, twins],
                          keys=base.keys[:, twins])
    _check(inputs, merge)


def test_a_target_twin_of_another_keeps_its_own_row_and_takes_nothing():
    """Two targets with the same key: every token as close to both goes to the first one."""
    keys = torch.tensor([[[1.0, 0.0]] * 8])                                 # all alike
    hidden = torch.arange(8.0)[None, :, None].expand(1, 8, 2).contiguous()
    inputs = MethodInputs(hidden=hidden, keep=3, saliency=torch.linspace(1, 0, 8)[None], keys=keys)
    result = run_method(get_method("visionzip"), inputs, merge=True)
    # C = 1 of K = 3: dominant 0, 1; one target, 2, which takes 3..7 (mean 5)
    assert result.indices.tolist() == [[0, 1, 2]]
    assert result.assignment.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2]]
    assert result.tokens[0, :, 0].tolist() == [0.0, 1.0, 2.0 + 5.0]


def test_keeping_every_token_returns_hidden_as_it_is():
    inputs = _inputs(2, 17, 17, torch.bfloat16)
    for merge in (True, False):
        result = run_method(get_method("visionzip"), inputs, merge)
        assert torch.equal(result.tokens, inputs.hidden)
        assert result.indices.tolist() == [list(range(17))] * 2


def test_visionzip_reads_saliency_and_keys_and_tokens_carry_their_gradient():
    assert get_method("visionzip").reads == frozenset({Signal.SALIENCY, Signal.KEYS})
    inputs = _inputs(2, 30, 8)
    hidden = inputs.hidden.clone().requires_grad_(True)
    result = run_method(get_method("visionzip"), MethodInputs(hidden=hidden, keep=8, saliency=inputs.saliency,
                                                              keys=inputs.keys), merge=True)
    result.tokens.sum().backward()
    # a dominant row or a lone target: weight 1; a target: 1; a token sent to a target of c members: 1 / c
    dropped = result.assignment.clone().scatter_(1, result.indices, -1)
    for b in range(2):
        for i in range(30):
            slot = int(dropped[b, i])
            expected = 1.0 if slot < 0 else 1.0 / int((dropped[b] == slot).sum())
            assert torch.allclose(hidden.grad[b, i], torch.full((8,), expected))
