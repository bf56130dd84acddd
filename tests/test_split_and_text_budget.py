"""task_ratio="auto" and text_budget (contract, steps 0 and 2) on every backend.

Inputs are built so that the deciding values are far from ties: copied rows have cosine 1 with
their originals, unrelated rows are independent draws in 64 dimensions.
"""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import desap_ops
from desap_ops import reference
from desap_ops.validation import check_options, check_text_budget

from helpers import TRITON_DEVICE

BACKENDS = [("reference", "cpu"), ("auto", "cpu"), ("triton", TRITON_DEVICE)]


def _image(seed, batch=2, tokens=96, width=16, text_width=64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, width, generator=gen), torch.randn(batch, tokens, text_width, generator=gen),
            torch.rand(batch, tokens, generator=gen), gen)


def _run_everywhere(hidden, attn, text, saliency, keep, **options):
    """The result of every backend, checked to agree exactly on the split, the indices and the groups."""
    results = []
    for backend, device in BACKENDS:
        args = [t.to(device) for t in (hidden, attn, text, saliency)]
        mask = options.get("text_mask")
        extra = dict(options, text_mask=None if mask is None else mask.to(device))
        results.append(type(r := desap_ops.prune(*args, keep, backend=backend, **extra))(*(t.cpu() for t in r)))
    for other in results[1:]:
        assert torch.equal(other.task_keep, results[0].task_keep)
        assert torch.equal(other.indices, results[0].indices)
        assert torch.equal(other.assignment, results[0].assignment)
    return results[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_gives_a_pointed_prompt_at_least_half_the_budget_and_its_tokens(seed):
    hidden, attn, saliency, gen = _image(seed)
    targets = torch.stack([torch.randperm(96, generator=gen)[:4] for _ in range(2)])   # (B, 4)
    text = torch.randn(2, 6, 64, generator=gen)
    text[:, :4] = attn.gather(1, targets[:, :, None].expand(-1, -1, 64))            # the prompt names them
    result = _run_everywhere(hidden, attn, text, saliency, 16, task_ratio="auto")
    assert (result.task_keep >= 8).all(), result.task_keep
    for b in range(2):
        assert set(targets[b].tolist()) <= set(result.indices[b].tolist())


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_auto_gives_unrelated_text_at_most_a_quarter(seed):
    hidden, attn, saliency, gen = _image(seed)
    text = torch.randn(2, 8, 64, generator=gen)                                      # independent of the image
    result = _run_everywhere(hidden, attn, text, saliency, 16, task_ratio="auto")
    assert (result.task_keep <= 4).all(), result.task_keep


def test_auto_without_valid_text_gives_nothing_to_task():
    hidden, attn, saliency, gen = _image(7)
    text = attn[:, :3].clone()
    mask = torch.tensor([[False, False, False], [True, True, True]])
    result = _run_everywhere(hidden, attn, text, saliency, 16, task_ratio="auto", text_mask=mask)
    assert result.task_keep[0] == 0 and result.task_keep[1] > 0


@pytest.mark.parametrize("keep,ratio", [(16, 0.5), (5, 0.5), (5, 0.3), (7, 1.0), (7, 0.0)])
def test_a_fixed_ratio_reports_its_split(keep, ratio):
    hidden, attn, saliency, gen = _image(8)
    text = torch.randn(2, 4, 64, generator=gen)
    mask = torch.tensor([[True, False, True, True], [False] * 4])
    result = _run_everywhere(hidden, attn, text, saliency, keep, task_ratio=ratio, text_mask=mask)
    assert result.task_keep.tolist() == [math.floor(ratio * keep + 0.5), 0]


def test_the_kernels_take_the_auto_constants_from_the_reference(monkeypatch):
    """The auto split's constants are written once, in the reference: with other values there, the
    Triton path's split follows them (a kernel that typed its own would keep the old split)."""
    gen = torch.Generator().manual_seed(21)
    attn = torch.randn(8, 64, 32, generator=gen)
    mix = torch.linspace(0.1, 0.9, 8)[:, None]                       # g from about 2 to 6
    text = (mix * attn[:, 0] + (1 - mix) * torch.randn(8, 32, generator=gen))[:, None]
    hidden, saliency = torch.randn(8, 64, 16, generator=gen), torch.rand(8, 64, generator=gen)
    args = [t.to(TRITON_DEVICE) for t in (hidden, attn, text, saliency)]
    has_text = torch.ones(8, dtype=torch.bool)
    shipped = desap_ops.prune(*args, 16, task_ratio="auto", backend="triton")
    # dyadic values: each product and quotient of the rule is then exact, whoever rounds it
    for name, value in (("AUTO_LOW", 2.5), ("AUTO_HIGH", 6.5), ("AUTO_MAX_SHARE", 0.625), ("MAD_TO_SIGMA", 1.5)):
        monkeypatch.setattr(reference, name, value)
    moved = desap_ops.prune(*args, 16, task_ratio="auto", backend="triton")
    expected = reference.task_budget(moved.task_scores.cpu(), 16, "auto", has_text)
    assert torch.equal(moved.task_keep.cpu(), expected)
    assert not torch.equal(expected, shipped.task_keep.cpu()), "the new constants must change some split"


def test_guidance_ignores_any_affine_map_of_the_scores():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(9))
    scores[:, 7] = 4.0
    base = reference.guidance(scores)
    for scale in (2.0, 0.125):                       # powers of two: exact
        assert torch.equal(reference.guidance(scores * scale), base)
    for scale, shift in ((3.0, 0.25), (0.7, -1.0)):   # the shift rounds the scores: close
        torch.testing.assert_close(reference.guidance(scores * scale + shift), base, rtol=1e-4, atol=0)


def test_a_budget_at_least_the_prompt_changes_nothing():
    hidden, attn, saliency, gen = _image(10)
    text = torch.randn(2, 12, 64, generator=gen)
    text[:, 3] = text[:, 1]                                                           # repeats stay, too
    mask = torch.rand(2, 12, generator=gen) > 0.3
    for backend, device in BACKENDS:
        args = [t.to(device) for t in (hidden, attn, text, saliency)]
        plain = desap_ops.prune(*args, 8, text_mask=mask.to(device), backend=backend)
        for budget in (12, 13, 1000):
            budgeted = desap_ops.prune(*args, 8, text_mask=mask.to(device), backend=backend, text_budget=budget)
            for got, expected in zip(budgeted, plain):
                assert torch.equal(got, expected)


def _long_prompt(seed, length=2048, templates=6, copies=8, tokens=128):
    """A long prompt: a few template rows repeated all through it, and 8 rows that copy 8 visual
    tokens' attention rows, at scattered places."""
    hidden, attn, saliency, gen = _image(seed, tokens=tokens)
    template = torch.randn(2, templates, 64, generator=gen)
    text = template[:, torch.arange(length) % templates].clone()
    targets = torch.stack([torch.randperm(tokens, generator=gen)[:copies] for _ in range(2)])
    places = torch.stack([torch.randperm(length, generator=gen)[:copies] for _ in range(2)])
    for b in range(2):
        text[b, places[b]] = attn[b, targets[b]]
    return hidden, attn, text, saliency, targets


def test_a_long_templated_prompt_within_budget_still_finds_its_tokens():
    hidden, attn, text, saliency, targets = _long_prompt(11)
    result = _run_everywhere(hidden, attn, text, saliency, 8, task_ratio=1.0, text_budget=64)
    for b in range(2):
        assert sorted(result.indices[b].tolist()) == sorted(targets[b].tolist())


def test_the_budget_keeps_distinct_relevant_rows_first():
    hidden, attn, text, saliency, targets = _long_prompt(12, length=300, templates=100)
    budgeted, mask = reference.budget_text(attn, text, None, 16)
    assert budgeted.shape == (2, 16, 64) and mask.all()
    for b in range(2):                      # the 8 copies are the most relevant distinct rows
        copies = attn[b, targets[b]]
        assert all((budgeted[b] == row).all(dim=-1).any() for row in copies)
        distinct = torch.unique(budgeted[b], dim=0)
        assert distinct.shape[0] == 16, "a repeated row took two places"


def test_first_occurrences_marks_exact_repeats_only():
    text = torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(13))
    text[0, 4] = text[0, 1]
    text[0, 5] = text[0, 1]
    text[0, 3] = text[0, 2] + 1e-6                                                    # close is not equal
    assert reference.first_occurrences(text).tolist() == [[True, True, True, True, False, False]]


def test_the_budget_cuts_the_counted_flops_several_times():
    batch, tokens, width, text_width, length = 1, 576, 1024, 4096, 2048
    hidden = torch.empty(batch, tokens, width, device="meta")
    attn = torch.empty(batch, tokens, text_width, device="meta")
    text = torch.empty(batch, length, text_width, device="meta")
    saliency = torch.empty(batch, tokens, device="meta")

    def counted(budget):
        with FlopCounterMode(display=False) as counter:
            torch.ops.desap.prune(hidden, attn, text, None, saliency, None, 64, 0.5, True, "max", budget)
        return counter.get_total_flops()

    assert counted(None) / counted(64) > 5


def test_options_take_auto_and_refuse_bad_budgets():
    assert check_options(4, "auto", True, "max")[1] == "auto"
    with pytest.raises(TypeError, match="task_ratio"):
        check_options(4, "automatic", True, "max")
    assert check_text_budget(None) is None and check_text_budget(torch.tensor(64)) == 64
    with pytest.raises(ValueError, match="text_budget"):
        check_text_budget(0)
    with pytest.raises(TypeError, match="text_budget"):
        check_text_budget(True)


@pytest.mark.slow
def test_auto_and_budget_under_torch_compile():
    # fullgraph tracing through dynamo and AOTAutograd is the check (the rank, sketch and sort steps
    # must all trace); four copies, all kept, so no two deciding scores are near-equal
    hidden, attn, text, saliency, _ = _long_prompt(14, length=256, copies=4)
    torch._dynamo.reset()
    for backend in ("reference", "auto"):
        def run(h, a, t, s):
            r = desap_ops.prune(h, a, t, s, 8, task_ratio="auto", text_budget=32, backend=backend)
            return r.indices, r.task_keep

        got = torch.compile(run, fullgraph=True, backend="aot_eager")(hidden, attn, text, saliency)
        expected = run(hidden, attn, text, saliency)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
