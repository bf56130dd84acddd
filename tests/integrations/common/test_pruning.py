"""The one pruning call of both engines (``integrations/common/pruning.py``): the options' method
on the signals it reads (DeSAP: the operator with the checked options), or under ``ideal`` each
image's first tokens; the options' defaults, which both engines read."""
import pytest
import torch

import desap_ops
from desap_ops.integrations.common.pruning import DEFAULTS, PruneOptions, prune_images
from desap_ops.integrations.common.signals import TowerSignals
from desap_ops.methods import BUILTIN, Signal


def _signals(seed=0, batch=2, tokens=9):
    gen = torch.Generator().manual_seed(seed)
    return TowerSignals(torch.randn(batch, tokens, 6, generator=gen), torch.randn(batch, tokens, 4, generator=gen),
                        torch.rand(batch, tokens, generator=gen), keys=torch.randn(batch, tokens, 3, generator=gen),
                        received=torch.rand(batch, tokens, generator=gen),
                        layer_received=torch.rand(batch, tokens, generator=gen))


def test_the_ideal_keeps_each_images_first_tokens_unmerged_in_order():
    hidden = torch.randn(2, 5, 3)
    ideal = PruneOptions.checked(3, 0.5, True, "max", "reference", None, ideal=True)
    assert (ideal.method, ideal.merge, ideal.reads) == ("first", False, frozenset())
    result = prune_images(TowerSignals(hidden), None, None, None, 3, ideal)
    assert torch.equal(result.tokens, hidden[:, :3])
    assert result.indices.tolist() == [[0, 1, 2]] * 2
    assert result.assignment.tolist() == [[0, 1, 2, -1, -1]] * 2
    assert result.task_keep is None and result.task_scores is None   # unscored: no task scores, not zeros


def test_the_ideal_never_maps_the_branch_and_the_rest_is_the_operator_with_the_options():
    signals, text = _signals(), torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, True, False], [True, True, True]])

    def unreachable(branch):
        raise AssertionError("the ideal reads no attention branch")

    ideal = PruneOptions.checked(4, "auto", True, "max", "reference", None, ideal=True)
    assert torch.equal(prune_images(signals, unreachable, text, mask, 4, ideal).tokens, signals.hidden[:, :4])
    options = PruneOptions.checked(4, "auto", True, "mean", "reference", 2)
    got = prune_images(signals, lambda branch: 2 * branch, text, mask, 4, options)
    expected = desap_ops.prune(signals.hidden, 2 * signals.attn, text, signals.saliency, 4, text_mask=mask,
                               task_ratio="auto", text_reduce="mean", backend="reference", text_budget=2)
    for name in ("tokens", "indices", "assignment", "task_scores", "task_keep"):
        assert torch.equal(getattr(got, name), getattr(expected, name))


def test_merge_left_at_none_is_the_methods_own_default_and_a_bool_overrides_it():
    for method in BUILTIN:
        default = PruneOptions.checked(4, 0.5, None, "max", "auto", None, method.name)
        assert default.merge is None and default.merges is method.merges
        for merge in (True, False, 1, 0):
            assert PruneOptions.checked(4, 0.5, merge, "max", "auto", None, method.name).merges is bool(merge)
    assert PruneOptions.checked(4, 0.5, None, "max", "auto", None, ideal=True).merges is False   # the ideal drops
    for bad in ("yes", 2, 0.5):
        with pytest.raises(TypeError, match=r"merge must be None \(the method's own default\), True or False, got"):
            PruneOptions.checked(4, 0.5, bad, "max", "auto", None)


def test_a_readers_projected_rows_are_read_as_they_are_and_a_clip_towers_are_projected_once():
    signals, options = _signals(seed=5), PruneOptions.checked(3, 0.5, None, "max", "reference", None, "divprune")
    given = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(6))

    def unreachable(rows):
        raise AssertionError("the reader gave the projected rows: nothing is projected again")

    from desap_ops.methods import MethodInputs, get_method, run_method
    from dataclasses import replace

    got = prune_images(replace(signals, projected=given), unreachable, None, None, 3, options)
    assert torch.equal(got.indices, run_method(get_method("divprune"), MethodInputs(signals.hidden, 3, projected=given),
                                               merge=False).indices)
    projected = prune_images(signals, lambda rows: rows.tanh() @ given[0, :6], None, None, 3, options)
    expected = run_method(get_method("divprune"), MethodInputs(signals.hidden, 3,
                                                               projected=signals.hidden.tanh() @ given[0, :6]), False)
    assert torch.equal(projected.indices, expected.indices)
    assert torch.equal(projected.tokens, signals.hidden.gather(1, expected.indices[..., None].expand(-1, -1, 6)))


def test_options_are_checked_and_the_ideal_never_merges():
    assert PruneOptions.checked(4, 0.5, True, "max", "auto", None).merge
    for merge in (True, False):
        ideal = PruneOptions.checked(4, 0.5, merge, "max", "auto", None, ideal=True)
        assert not ideal.merge and ideal.method == "first"
        assert ideal == PruneOptions.checked(4, 0.5, False, "max", "auto", None, "first")   # ideal is nothing more
    assert not PruneOptions.checked(4, 0.5, False, "max", "auto", None).merge
    with pytest.raises(TypeError, match="ideal must be True or False"):
        PruneOptions.checked(4, 0.5, True, "max", "auto", None, ideal=1)
    with pytest.raises(ValueError, match="task_ratio"):
        PruneOptions.checked(4, 1.5, True, "max", "auto", None)


def test_the_defaults_are_valid_options_and_both_engines_read_them():
    import inspect

    from desap_ops.integrations import apply_desap
    from desap_ops.integrations.vllm.options import DEFAULTS as ENGINE_DEFAULTS

    options = PruneOptions.checked(DEFAULTS.keep, DEFAULTS.task_ratio, DEFAULTS.merge, DEFAULTS.text_reduce,
                                   DEFAULTS.backend, DEFAULTS.text_budget, DEFAULTS.method, ideal=DEFAULTS.ideal)
    assert options.method == DEFAULTS.method and options.merge == DEFAULTS.merge
    signature = inspect.signature(apply_desap).parameters
    for name, value in vars(DEFAULTS).items():
        assert signature[name].default == value == ENGINE_DEFAULTS[name], name


def test_tower_signals_split_and_map_keep_their_rows_aligned():
    signals = TowerSignals(torch.arange(10.0).view(5, 2), torch.arange(5.0)[:, None], torch.arange(5.0),
                           (torch.arange(5.0) * 10,), torch.arange(5) + 100, torch.arange(5.0)[:, None] - 1)
    first, second = signals.split([2, 3])
    assert first.hidden.tolist() == [[0, 1], [2, 3]] and second.saliency.tolist() == [2, 3, 4]
    assert second.projected[:, 0].tolist() == [1, 2, 3] and signals.map(lambda t: t[[4]]).projected.tolist() == [[3]]
    assert first.seed.tolist() == [100, 101] and signals.map(lambda t: t[[3]]).seed.tolist() == [103]
    assert second.levels[0].tolist() == [20, 30, 40]
    picked = signals.map(lambda t: t[[4, 0]])
    assert picked.attn[:, 0].tolist() == [4, 0] == picked.saliency.tolist() and picked.levels[0].tolist() == [40, 0]


@pytest.mark.parametrize("merge", [None, True, False])
@pytest.mark.parametrize("name", [method.name for method in BUILTIN])
def test_each_method_gets_the_signals_it_reads_and_nothing_else(name, merge):
    from desap_ops.methods import MethodInputs, content_seeds, get_method, run_method

    reads = get_method(name).reads
    full = _signals(seed=3)
    content = torch.arange(18).view(2, 9) * 1000003
    # the signals a method does not read are absent: None, as an engine that skipped them gives them
    signals = TowerSignals(full.hidden, full.attn if Signal.ATTN in reads else None,
                           full.saliency if Signal.SALIENCY in reads else None,
                           seed=content if Signal.SEED in reads else None,
                           keys=full.keys if Signal.KEYS in reads else None,
                           received=full.received if Signal.RECEIVED in reads else None,
                           layer_received=full.layer_received if Signal.LAYER_RECEIVED in reads else None)
    text, mask = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4)), torch.ones(2, 3, dtype=torch.bool)

    def text_space(rows):   # the projector: on the attention branch, and on hidden for the projected rows
        assert reads & {Signal.ATTN, Signal.PROJECTED}, f"{name} reads neither the branch nor the projected rows"
        return 2 * rows

    options = PruneOptions.checked(4, 0.5, merge, "max", "reference", None, name)
    assert options.method == name and options.reads == reads
    reads_text = Signal.TEXT in reads
    got = prune_images(signals, text_space, text if reads_text else None, mask if reads_text else None, 4, options)
    expected = run_method(get_method(name), MethodInputs(
        hidden=full.hidden, keep=4, saliency=full.saliency, attn=2 * full.attn, text=text, text_mask=mask,
        seed=content_seeds(content), projected=2 * full.hidden, keys=full.keys, received=full.received,
        layer_received=full.layer_received, backend="reference"),
        merge=get_method(name).merges if merge is None else merge)
    assert options.merges == (get_method(name).merges if merge is None else merge)
    for field in ("tokens", "indices", "assignment", "task_scores", "task_keep"):
        want = getattr(expected, field)
        assert torch.equal(getattr(got, field), want) if want is not None else getattr(got, field) is None


def test_the_method_option_is_checked():
    with pytest.raises(ValueError, match=r"method 'nope' is not a registered pruning method; registered: \[.*'desap'"):
        PruneOptions.checked(4, 0.5, True, "max", "auto", None, "nope")
    with pytest.raises(ValueError, match=r"ideal is the method 'first' unmerged; it cannot be combined with "
                                         r"method='divprune'"):
        PruneOptions.checked(4, 0.5, True, "max", "auto", None, "divprune", ideal=True)
    assert PruneOptions.checked(4, 0.5, True, "max", "auto", None, "first", ideal=True).method == "first"
    assert PruneOptions.checked(4, 0.5, True, "max", "auto", None).method == "desap"


def test_a_tower_pass_reads_what_any_of_its_images_methods_reads():
    from desap_ops.integrations.common.pruning import tower_reads

    def options(method):
        return PruneOptions.checked(4, 0.5, True, "max", "auto", None, method)

    assert tower_reads([options("first"), options("divprune")]) == {Signal.PROJECTED}
    assert tower_reads([options("first"), options("random"), options("saliency")]) == {Signal.SEED, Signal.SALIENCY}
    assert tower_reads([options("similarity"), options("desap")]) == {Signal.SALIENCY, Signal.ATTN, Signal.TEXT}
