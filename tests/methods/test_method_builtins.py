"""The built-in pruning methods (desap_ops.methods.builtin) against their definitions, each checked by
an independent naive implementation, and merging, the same for every method (``run_method``)."""
import math

import pytest
import torch

import desap_ops
from desap_ops import reference
from desap_ops.methods import (BUILTIN, Method, MethodInputs, Selection, content_rows, content_seeds, get_method,
                               TokenGrid, order_rows, run_method)
from helpers import DTYPES, TIE_MARGIN, TOKEN_TOL, naive_task_scores

SELECTING = [method.name for method in BUILTIN if method.select is not None]   # every built-in but DeSAP
# (images, tokens, width, keep): one token kept, a quarter, all of them
SHAPES = [(1, 9, 8, 1), (2, 48, 16, 12), (3, 33, 5, 33)]


def _inputs(batch, tokens, width, keep, dtype=torch.float32, seed=0, text_mask=None, **options) -> MethodInputs:
    gen = torch.Generator().manual_seed(seed)
    return MethodInputs(hidden=torch.randn(batch, tokens, width, generator=gen).to(dtype), keep=keep,
                        saliency=torch.rand(batch, tokens, generator=gen),
                        attn=torch.randn(batch, tokens, 6, generator=gen).to(dtype),
                        text=torch.randn(batch, 4, 6, generator=gen).to(dtype), text_mask=text_mask,
                        seed=torch.randint(0, 2**62, (batch,), generator=gen),
                        projected=torch.randn(batch, tokens, width + 3, generator=gen).to(dtype), 
                        received=torch.rand(batch, tokens, generator=gen),
                        layer_received=torch.rand(batch, tokens, generator=gen),
                        grid=TokenGrid(((1, 1, tokens),)), **options)


def _select(name: str, inputs: MethodInputs) -> torch.Tensor:
    return run_method(get_method(name), inputs, merge=False).indices


def _top(values: list, keep: int) -> list:
    """The ``keep`` largest of ``values`` (NaN last, ties to the lower index), ascending: by hand."""
    order = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i] if not math.isnan(values[i])
                                                      else 0.0, i))
    return sorted(order[:keep])


def _margin(values: list, keep: int) -> float:
    ranked = sorted(values, reverse=True)
    return math.inf if keep >= len(values) else ranked[keep - 1] - ranked[keep]


def naive_divprune(hidden: torch.Tensor, keep: int) -> list:
    """DivPrune's greedy max-min diversity (Alvar et al., CVPR 2025, Algorithm 1) in float64, by
    hand: distance d(i, j) = 1 - cos(x_i, x_j); the first token is the one whose nearest other
    token is farthest; each next one maximises its distance to the nearest token chosen so far.
    None where a choice wins by less than TIE_MARGIN (inputs with a near-tie)."""
    x = hidden.double()
    x = x / x.norm(dim=1, keepdim=True)
    d = (1 - x @ x.T).tolist()
    n = len(d)
    score = [min(d[i][j] for j in range(n) if j != i) if n > 1 else 0.0 for i in range(n)]
    picked = []
    while len(picked) < keep:
        candidates = sorted((i for i in range(n) if i not in picked), key=lambda i: -score[i])
        if len(candidates) > 1 and score[candidates[0]] - score[candidates[1]] <= TIE_MARGIN:
            return None
        best = candidates[0]
        picked.append(best)
        score = [d[i][best] if len(picked) == 1 else min(score[i], d[i][best]) for i in range(n)]
    return sorted(picked)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_first_keeps_the_first_k_in_order(shape, dtype):
    inputs = _inputs(*shape, dtype=dtype)
    assert _select("first", inputs).tolist() == [list(range(shape[3]))] * shape[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_saliency_keeps_the_k_most_salient_with_ties_to_the_lower_index(shape, dtype):
    inputs = _inputs(*shape, dtype=dtype, seed=1)
    got = _select("saliency", inputs)
    for row, values in zip(got.tolist(), inputs.saliency.tolist()):
        assert _margin(values, shape[3]) > TIE_MARGIN
        assert row == _top(values, shape[3])
    # ties: equal saliency goes to the lower index, NaN ranks below every number (-inf included)
    tied = torch.tensor([[0.5, 0.2, 0.5, float("nan"), 0.5, float("-inf"), 0.9, 0.2]])
    inputs = MethodInputs(hidden=torch.randn(1, 8, 4), keep=5, saliency=tied)
    assert _select("saliency", inputs).tolist() == [[0, 1, 2, 4, 6]] == [_top(tied[0].tolist(), 5)]
    assert _select("saliency", MethodInputs(hidden=torch.randn(1, 8, 4), keep=7, saliency=tied)).tolist() == \
        [[0, 1, 2, 4, 5, 6, 7]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("shape", SHAPES)
def test_similarity_keeps_the_k_highest_task_scores_and_a_text_blind_image_its_first_k(shape, reduce, dtype):
    batch, tokens, _, keep = shape
    mask = torch.ones(batch, 4, dtype=torch.bool)
    mask[0, 1:] = False   # the first image reads one text token
    mask[-1, :] = batch == 1   # the last (of several) reads none: text-blind
    inputs = _inputs(*shape, dtype=dtype, seed=2, text_mask=mask, text_reduce=reduce)
    got = _select("similarity", inputs).tolist()
    for b, scores in enumerate(naive_task_scores(inputs.attn, inputs.text, mask, reduce).tolist()):
        if not mask[b].any():
            assert got[b] == list(range(keep))
            continue
        assert _margin(scores, keep) > TIE_MARGIN
        assert got[b] == _top(scores, keep)
    # the contract's task score by the operator: DeSAP choosing its whole budget by task score
    # (task_ratio 1) keeps the same tokens wherever an image has text
    desap = desap_ops.prune(inputs.hidden, inputs.attn, inputs.text, inputs.saliency, keep, text_mask=mask,
                            task_ratio=1.0, text_reduce=reduce, backend="reference")
    for b in range(batch):
        if mask[b].any():
            assert got[b] == desap.indices[b].tolist()


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_similarity_reads_the_text_budget_as_the_operator_does(reduce):
    gen = torch.Generator().manual_seed(3)
    attn, text = torch.randn(2, 40, 8, generator=gen), torch.randn(2, 9, 8, generator=gen)
    text[:, 5] = text[:, 1]   # a repeat: counts once under the budget
    inputs = MethodInputs(hidden=torch.randn(2, 40, 4, generator=gen), keep=10, attn=attn, text=text,
                          text_mask=None, text_reduce=reduce, text_budget=3)
    got = _select("similarity", inputs)
    budgeted, budget_mask = reference.budget_text(attn, text, None, 3)
    scores = reference.task_scores(attn, budgeted, budget_mask, reduce)
    whole = reference.task_scores(attn, text, None, reduce)
    for row, values, all_text in zip(got.tolist(), scores.tolist(), whole.tolist()):
        assert _margin(values, 10) > TIE_MARGIN and row == _top(values, 10)
    assert got.tolist() != [_top(values, 10) for values in whole.tolist()]   # the budget mattered
    desap = desap_ops.prune(inputs.hidden, attn, text, torch.zeros(2, 40), 10, task_ratio=1.0, text_reduce=reduce,
                            text_budget=3, backend="reference")
    assert torch.equal(got, desap.indices)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_divprune_is_greedy_max_min_cosine_diversity(shape, dtype):
    # the first seed whose images are free of near-ties (a few tries at most)
    for seed in range(4, 100):
        inputs = _inputs(*shape, dtype=dtype, seed=seed)
        expected = [naive_divprune(projected.float(), shape[3]) for projected in inputs.projected]
        if None not in expected:
            break
    assert _select("divprune", inputs).tolist() == expected


def test_divprune_selects_on_the_projected_rows_not_on_hidden():
    # DivPrune's code selects on the rows the language model receives (after the projector): a
    # projector that is not a similarity (a random linear map and a GELU) changes which tokens it keeps
    gen = torch.Generator().manual_seed(12)
    hidden = torch.randn(2, 40, 8, generator=gen)
    projected = torch.nn.functional.gelu(hidden @ torch.randn(8, 12, generator=gen))
    got = _select("divprune", MethodInputs(hidden=hidden, keep=10, projected=projected)).tolist()
    expected = [naive_divprune(rows, 10) for rows in projected]
    on_hidden = [naive_divprune(rows, 10) for rows in hidden]
    assert None not in expected and None not in on_hidden   # no near-ties in either
    assert got == expected and expected != on_hidden


def test_divprune_forms_its_distances_in_blocks_alike(monkeypatch):
    from desap_ops.methods import builtin

    inputs = _inputs(2, 40, 6, 9, seed=5)
    whole = _select("divprune", inputs)
    monkeypatch.setattr(builtin, "DIVPRUNE_BLOCK_BYTES", 4 * 2 * 40 * 7)   # 40 rows in blocks of 7: the last one short
    assert torch.equal(_select("divprune", inputs), whole)


def test_divprune_is_scale_free_and_spreads_over_clusters():
    # three tight clusters of directions: the first three tokens kept come one from each
    gen = torch.Generator().manual_seed(6)
    centres = torch.eye(3, 8)
    hidden = (centres.repeat_interleave(5, 0) + 0.01 * torch.randn(15, 8, generator=gen))[None]
    scale = torch.logspace(-20, 20, 15)[None, :, None]
    for features in (hidden, hidden * scale):
        kept = _select("divprune", MethodInputs(hidden=torch.randn(1, 15, 4), keep=3, projected=features))
        assert sorted(i // 5 for i in kept[0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("shape", SHAPES)
def test_random_is_reproducible_from_its_seed_and_independent_of_the_batch(shape):
    batch, tokens, width, keep = shape
    inputs = _inputs(*shape, seed=7)
    first = _select("random", inputs)
    assert torch.equal(first, _select("random", inputs))
    assert bool((first[:, 1:] > first[:, :-1]).all()) and int(first.max()) < tokens
    for b in range(batch):   # an image alone draws what it draws in a batch
        alone = MethodInputs(hidden=inputs.hidden[b:b + 1], keep=keep, seed=inputs.seed[b:b + 1])
        assert torch.equal(_select("random", alone), first[b:b + 1])
    if keep < tokens:   # other seeds draw other tokens (C(N, K) >= 9 here)
        others = {tuple(_select("random", MethodInputs(hidden=inputs.hidden[:1], keep=keep,
                                                       seed=torch.tensor([seed])))[0].tolist())
                  for seed in range(20)}
        assert len(others) > 1


def test_random_draws_every_token_alike():
    # over many seeds each token is kept about K / N of the time (binomial: 2000 draws, p = 1/4)
    hidden = torch.zeros(1, 12, 2)
    counts = torch.zeros(12)
    for seed in range(2000):
        counts[_select("random", MethodInputs(hidden=hidden, keep=3, seed=torch.tensor([seed * 7919])))[0]] += 1
    assert float((counts / 2000 - 0.25).abs().max()) < 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_content_hash_follows_the_pixels_as_the_tower_reads_them(dtype):
    gen = torch.Generator().manual_seed(8)
    pixels = torch.randn(3, 3, 8, 8, generator=gen)
    rows = content_rows(pixels, dtype)
    assert rows.dtype == torch.int64 and rows.shape == (3,)
    assert torch.equal(rows, content_rows(pixels.clone(), dtype))
    assert len(set(rows.tolist())) == 3
    changed = pixels.clone()
    changed[1, 2, 7, 7] += 1.0
    assert content_rows(changed, dtype).tolist() == [rows[0], content_rows(changed, dtype)[1], rows[2]]
    assert content_rows(changed, dtype)[1] != rows[1]
    swapped = pixels.clone()
    swapped[0, 0, 0, :2] = pixels[0, 0, 0, :2].flip(0)   # the same values elsewhere: another hash
    assert content_rows(swapped, dtype)[0] != rows[0]
    # the hash is of the values the tower is fed: the same in any dtype they reach it in
    assert torch.equal(content_rows(pixels.to(dtype), dtype), rows)
    seeds = content_seeds(rows[:, None].expand(-1, 5))
    assert seeds.device.type == "cpu" and bool((seeds >= 0).all()) and len(set(seeds.tolist())) == 3
    # token order counts: the same tokens in another order seed another draw
    tokens = torch.stack([rows, rows.flip(0)])
    assert content_seeds(tokens)[0] != content_seeds(tokens)[1]


# the Qwen processors' means and deviations (Qwen2.5-VL: OpenAI CLIP's; the Qwen3 generation: 0.5), rescaled by 1/255
QWEN_NORMALIZATIONS = {"qwen2.5-vl": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
                       "qwen3": ([0.5] * 3, [0.5] * 3)}


def _normalized(levels: torch.Tensor, mean, std, formula: str) -> torch.Tensor:
    """(C, L) float32 ``levels`` (0..255) normalized per channel: as transformers' processor
    writes it ((x / 255 - mean) / std) or as vLLM's fused device normalization computes it (x * w + b,
    w = (1/255) / std and b = -mean / std, each held in float32)."""
    mean, std = torch.tensor(mean).view(-1, 1), torch.tensor(std).view(-1, 1)
    x = levels.float()
    if formula == "processor":
        return (x * (1 / 255) - mean) / std
    return x * ((1 / 255) / std) + (-mean / std)


@pytest.mark.parametrize("family", QWEN_NORMALIZATIONS)
def test_normalization_keeps_the_256_levels_of_every_channel_apart_and_in_order(family):
    """What makes the order hash of raw and normalized pixels equal: over all 256 levels of each
    channel, both engines' float32 normalizations are strictly increasing (float16 too); bfloat16 is
    not (CLIP's statistics merge neighbouring levels at the top), so pixels cast to bfloat16 before
    the model may seed otherwise than vLLM."""
    mean, std = QWEN_NORMALIZATIONS[family]
    levels = torch.arange(256).expand(3, -1)
    for formula in ("processor", "device"):
        x = _normalized(levels, mean, std, formula)
        assert bool((x.diff(dim=1) > 0).all())
        assert bool((x.half().diff(dim=1) > 0).all())
        merged = int((x.bfloat16().diff(dim=1) == 0).sum())
        assert merged > 0 if family == "qwen2.5-vl" else merged == 0


@pytest.mark.parametrize("family", QWEN_NORMALIZATIONS)
def test_the_order_hash_of_raw_and_normalized_patch_rows_is_the_same(family):
    mean, std = QWEN_NORMALIZATIONS[family]
    gen = torch.Generator().manual_seed(11)
    raw = torch.randint(0, 256, (40, 3, 2 * 14 * 14), generator=gen, dtype=torch.uint8)   # Qwen patch rows
    raw[0] = (torch.arange(2 * 14 * 14) % 256).expand(3, -1)                           # every level in a row
    rows = order_rows(raw.reshape(40, -1), 3)
    assert rows.dtype == torch.int64 and rows.shape == (40,) and len(set(rows.tolist())) == 40
    for formula in ("processor", "device"):
        normalized = torch.stack([_normalized(row, mean, std, formula) for row in raw])
        assert torch.equal(order_rows(normalized.reshape(40, -1), 3), rows)
        assert torch.equal(order_rows(normalized.half().reshape(40, -1), 3), rows)
    # each row on its own: another row beside it does not change its hash
    assert torch.equal(order_rows(raw[5:7].reshape(2, -1), 3), rows[5:7])
    # the order within a channel counts, and so does which channel a value lies in
    swapped = raw.clone()
    first, second = swapped[1, 0, 0].item(), swapped[1, 0, 1].item()
    swapped[1, 0, 0], swapped[1, 0, 1] = (second, first) if first != second else (first, (first + 1) % 256)
    assert order_rows(swapped.reshape(40, -1), 3)[1] != rows[1]
    assert order_rows(raw[:, [1, 0, 2]].reshape(40, -1), 3)[2] != rows[2]
    # a value's distance to its neighbours does not count, only the order
    stretched = raw.long() * 3 + torch.tensor([0, 1000, -50]).view(1, 3, 1)
    assert torch.equal(order_rows(stretched.reshape(40, -1), 3), rows)


def _nearest_kept_by_hand(hidden: torch.Tensor, indices: list) -> list:
    """Each token's output position: its own if kept, else the kept token of highest cosine."""
    x = hidden.double()
    x = x / x.norm(dim=1, keepdim=True)
    cos = x @ x[indices].T
    return [indices.index(j) if j in indices else int(cos[j].argmax()) for j in range(hidden.shape[0])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SELECTING)
def test_every_method_merges_into_the_nearest_kept_token_or_gathers(name, dtype):
    inputs = _inputs(2, 30, 8, 7, dtype=dtype, seed=9, text_mask=torch.ones(2, 4, dtype=torch.bool))
    method = get_method(name)
    plain, merged = run_method(method, inputs, merge=False), run_method(method, inputs, merge=True)
    assert torch.equal(plain.indices, merged.indices)
    rtol, atol = TOKEN_TOL[dtype]
    for b in range(2):
        indices = plain.indices[b].tolist()
        assert torch.equal(plain.tokens[b], inputs.hidden[b, indices])   # unmerged: a plain gather
        assert plain.assignment[b].tolist() == [indices.index(j) if j in indices else -1 for j in range(30)]
        assignment = _nearest_kept_by_hand(inputs.hidden[b].float(), indices)
        assert merged.assignment[b].tolist() == assignment
        groups = torch.stack([inputs.hidden[b].float()[torch.tensor(assignment) == i].mean(dim=0) for i in range(7)])
        torch.testing.assert_close(merged.tokens[b], groups.to(dtype), rtol=rtol, atol=atol)
    for result in (plain, merged):   # every method but DeSAP scores no task: None, not zeros
        assert result.task_scores is None and result.task_keep is None
        assert result.tokens.dtype == dtype


def test_desap_runs_as_the_operator_itself():
    inputs = _inputs(2, 30, 8, 7, seed=10, task_ratio="auto", text_reduce="mean", text_budget=2, backend="reference")
    for merge in (True, False):
        got = run_method(get_method("desap"), inputs, merge=merge)
        expected = desap_ops.prune(inputs.hidden, inputs.attn, inputs.text, inputs.saliency, 7, task_ratio="auto",
                                   merge=merge, text_reduce="mean", text_budget=2, backend="reference")
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_a_methods_own_assignment_merges_and_unmerged_it_is_ignored():
    def every_dropped_into_the_first(inputs: MethodInputs) -> Selection:
        batch, tokens = inputs.hidden.shape[:2]
        indices = torch.tensor([[1, 4, 6]] * batch)
        assignment = torch.zeros(batch, tokens, dtype=torch.long)
        assignment[:, indices[0]] = torch.arange(3)
        return Selection(indices, assignment)

    method = Method("test-own-assignment", every_dropped_into_the_first, reads=())
    hidden = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(11))
    inputs = MethodInputs(hidden=hidden, keep=3)
    merged = run_method(method, inputs, merge=True)
    assert merged.assignment.tolist() == [[0, 0, 0, 0, 1, 0, 2, 0]] * 2
    dropped_and_first = [0, 1, 2, 3, 5, 7]
    torch.testing.assert_close(merged.tokens[:, 0], hidden[:, dropped_and_first].mean(dim=1))
    torch.testing.assert_close(merged.tokens[:, 1:], hidden[:, [4, 6]])
    plain = run_method(method, inputs, merge=False)
    assert torch.equal(plain.tokens, hidden[:, [1, 4, 6]])
    assert plain.assignment.tolist() == [[-1, 0, -1, -1, 1, -1, 2, -1]] * 2


def test_tokens_keep_their_gradient_through_any_method():
    hidden = torch.randn(1, 10, 4, requires_grad=True)
    result = run_method(get_method("divprune"), MethodInputs(hidden=hidden, keep=3, projected=hidden.detach()),
                        merge=True)
    result.tokens.sum().backward()
    counts = torch.bincount(result.assignment[0], minlength=3).float()
    torch.testing.assert_close(hidden.grad[0, :, 0], 1 / counts[result.assignment[0]])
