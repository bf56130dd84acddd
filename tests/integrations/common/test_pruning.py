"""The one pruning call of both engines (``integrations/common/pruning.py``): the options' method
on the signals it reads (DeSAP: the operator with the checked options), or under ``ideal`` each
image's first tokens."""
import pytest
import torch

import desap_ops
from desap_ops.integrations.common.pruning import PruneOptions, prune_images
from desap_ops.integrations.common.signals import TowerSignals


def _signals(seed=0, batch=2, tokens=9):
    gen = torch.Generator().manual_seed(seed)
    return TowerSignals(torch.randn(batch, tokens, 6, generator=gen), torch.randn(batch, tokens, 4, generator=gen),
                        torch.rand(batch, tokens, generator=gen))


def test_the_ideal_keeps_each_images_first_tokens_unmerged_in_order():
    hidden = torch.randn(2, 5, 3)
    ideal = PruneOptions.checked(3, 0.5, True, "max", "reference", None, True)
    assert ideal.method == "first" and ideal.reads == frozenset()
    result = prune_images(TowerSignals(hidden), None, None, None, 3, ideal)
    assert torch.equal(result.tokens, hidden[:, :3])
    assert result.indices.tolist() == [[0, 1, 2]] * 2
    assert result.assignment.tolist() == [[0, 1, 2, -1, -1]] * 2
    assert result.task_keep.tolist() == [0, 0] and not result.task_scores.any()


def test_the_ideal_never_maps_the_branch_and_the_rest_is_the_operator_with_the_options():
    signals, text = _signals(), torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, True, False], [True, True, True]])

    def unreachable(branch):
        raise AssertionError("the ideal reads no attention branch")

    ideal = PruneOptions.checked(4, "auto", True, "max", "reference", None, True)
    assert torch.equal(prune_images(signals, unreachable, text, mask, 4, ideal).tokens, signals.hidden[:, :4])
    options = PruneOptions.checked(4, "auto", True, "mean", "reference", 2, False)
    got = prune_images(signals, lambda branch: 2 * branch, text, mask, 4, options)
    expected = desap_ops.prune(signals.hidden, 2 * signals.attn, text, signals.saliency, 4, text_mask=mask,
                               task_ratio="auto", text_reduce="mean", backend="reference", text_budget=2)
    for name in ("tokens", "indices", "assignment", "task_scores", "task_keep"):
        assert torch.equal(getattr(got, name), getattr(expected, name))


def test_options_are_checked_and_the_ideal_never_merges():
    assert PruneOptions.checked(4, 0.5, True, "max", "auto", None, False).merges
    assert not PruneOptions.checked(4, 0.5, True, "max", "auto", None, True).merges
    assert not PruneOptions.checked(4, 0.5, False, "max", "auto", None, False).merges
    with pytest.raises(TypeError, match="ideal must be True or False"):
        PruneOptions.checked(4, 0.5, True, "max", "auto", None, 1)
    with pytest.raises(ValueError, match="task_ratio"):
        PruneOptions.checked(4, 1.5, True, "max", "auto", None, False)


def test_tower_signals_split_and_map_keep_their_rows_aligned():
    signals = TowerSignals(torch.arange(10.0).view(5, 2), torch.arange(5.0)[:, None], torch.arange(5.0),
                           (torch.arange(5.0) * 10,), torch.arange(5) + 100)
    first, second = signals.split([2, 3])
    assert first.hidden.tolist() == [[0, 1], [2, 3]] and second.saliency.tolist() == [2, 3, 4]
    assert first.seed.tolist() == [100, 101] and signals.map(lambda t: t[[3]]).seed.tolist() == [103]
    assert second.levels[0].tolist() == [20, 30, 40]
    picked = signals.map(lambda t: t[[4, 0]])
    assert picked.attn[:, 0].tolist() == [4, 0] == picked.saliency.tolist() and picked.levels[0].tolist() == [40, 0]


@pytest.mark.parametrize("name", ["desap", "first", "random", "saliency", "similarity", "divprune"])
def test_each_method_gets_the_signals_it_reads_and_nothing_else(name):
    from desap_ops.methods import MethodInputs, content_seeds, get_method, run_method

    reads = get_method(name).reads
    full = _signals(seed=3)
    content = torch.arange(18).view(2, 9) * 1000003
    # the signals a method does not read are absent: None, as an engine that skipped them gives them
    signals = TowerSignals(full.hidden, full.attn if "attn" in reads else None,
                           full.saliency if "saliency" in reads else None,
                           seed=content if "seed" in reads else None)
    text, mask = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4)), torch.ones(2, 3, dtype=torch.bool)

    def text_space(branch):
        assert "attn" in reads, f"{name} reads no attention branch"
        return 2 * branch

    options = PruneOptions.checked(4, 0.5, True, "max", "reference", None, False, name)
    assert options.method == name and options.reads == reads
    got = prune_images(signals, text_space, text if "text" in reads else None, mask if "text" in reads else None, 4,
                       options)
    expected = run_method(get_method(name), MethodInputs(
        hidden=full.hidden, keep=4, saliency=full.saliency, attn=2 * full.attn, text=text, text_mask=mask,
        seed=content_seeds(content), backend="reference"), merge=True)
    for field in ("tokens", "indices", "assignment", "task_scores", "task_keep"):
        assert torch.equal(getattr(got, field), getattr(expected, field))


def test_the_method_option_is_checked():
    with pytest.raises(ValueError, match=r"method 'nope' is not a registered pruning method; registered: \['desap'"):
        PruneOptions.checked(4, 0.5, True, "max", "auto", None, False, "nope")
    with pytest.raises(ValueError, match=r"ideal is the method 'first' unmerged; it cannot be combined with "
                                         r"method='divprune'"):
        PruneOptions.checked(4, 0.5, True, "max", "auto", None, True, "divprune")
    assert PruneOptions.checked(4, 0.5, True, "max", "auto", None, True, "first").method == "first"
    assert PruneOptions.checked(4, 0.5, True, "max", "auto", None, False).method == "desap"


def test_a_tower_pass_reads_what_any_of_its_images_methods_reads():
    from desap_ops.integrations.common.pruning import tower_reads

    def options(method):
        return PruneOptions.checked(4, 0.5, True, "max", "auto", None, False, method)

    assert tower_reads([options("first"), options("divprune")]) == frozenset()
    assert tower_reads([options("first"), options("random"), options("saliency")]) == {"seed", "saliency"}
    assert tower_reads([options("similarity"), options("desap")]) == {"saliency", "attn", "text"}
