"""The method registry (desap_ops.methods.registry): registering, looking up, a fresh registry per
test, the entry-point group loaded through a real entry point, the two kinds of method, and the
check of what a method gives back (each failure a MethodFailure naming the method)."""
import sys

import pytest
import torch

import desap_ops
from desap_ops.methods import (BUILTIN, DEFAULT_METHOD, ENTRY_POINT_GROUP, SIGNALS, Method, MethodFailure, MethodInputs,
                               MethodRegistry, Selection, Signal, available_methods, get_method, method_by_code,
                               method_code, register_method, run_method, unregister_method)
from desap_ops import reference
from desap_ops.reference import PruneResult
from methods.method_plugin import entry_points_on_path

BUILTIN_NAMES = sorted(method.name for method in BUILTIN)


@pytest.fixture
def registry():
    """A registry of its own for the test: what it registers is seen nowhere else."""
    return MethodRegistry()


def test_the_builtins_are_registered_with_the_signals_they_read(registry):
    assert registry.names() == BUILTIN_NAMES and DEFAULT_METHOD in BUILTIN_NAMES
    assert set(BUILTIN_NAMES) <= set(available_methods())
    assert SIGNALS == set(Signal) and {s.value for s in Signal} == {"saliency", "attn", "text", "seed", "projected",
                                                                   "keys", "received", "layer_received"}
    for method in BUILTIN:
        assert registry.get(method.name) is method and method.reads <= SIGNALS
        assert all(type(signal) is Signal for signal in method.reads)
        assert registry.by_code(method_code(method.name)) is method and method.code == method_code(method.name)
        assert float(method.code) == method.code < 2**32   # exact in vLLM's float64 option tensor
    assert desap_ops.register_method is register_method and desap_ops.available_methods is available_methods
    assert desap_ops.MethodInputs is MethodInputs and desap_ops.Selection is Selection


def test_each_builtin_merges_by_default_as_its_paper_does_and_a_registered_method_merges(registry):
    # DeSAP merges its dropped tokens (its step 4); FasterVLM, DivPrune and the plain baselines drop them
    assert {method.name: method.merges for method in BUILTIN} == {
        "desap": True, "first": False, "random": False, "saliency": False, "similarity": False, "divprune": False,
        "dart-input": False, "cdpruner-lm": False, "visionzip": True, "hiprune": False}
    assert registry.register("test-merging", lambda inputs: None, reads=()) and registry.get("test-merging").merges
    registry.register("test-dropping", lambda inputs: None, reads=(), merges=False)
    assert registry.get("test-dropping").merges is False

    @registry.register("test-decorated-dropping", reads=(), merges=False)
    def decorated(inputs):
        return None

    assert registry.get("test-decorated-dropping").merges is False


def test_a_fresh_registry_is_isolated_from_the_default_and_from_another(registry):
    registry.register("test-isolated", lambda inputs: None, reads=())
    assert "test-isolated" in registry.names()
    assert "test-isolated" not in available_methods() and "test-isolated" not in MethodRegistry().names()
    with pytest.raises(ValueError, match="method 'test-isolated' is not a registered pruning method"):
        get_method("test-isolated")
    registry.unregister("test-isolated")
    assert registry.names() == BUILTIN_NAMES


def test_the_module_functions_use_the_default_registry():
    def keep_last(inputs: MethodInputs) -> torch.Tensor:
        return torch.arange(inputs.hidden.shape[1] - inputs.keep, inputs.hidden.shape[1]).expand(len(inputs.hidden), -1)

    assert register_method("test-default", keep_last, reads=()) is keep_last
    try:
        assert get_method("test-default").select is keep_last and "test-default" in available_methods()
        assert method_by_code(method_code("test-default")).name == "test-default"
    finally:
        unregister_method("test-default")
    assert "test-default" not in available_methods()


def test_register_a_function_or_with_the_decorator_and_unregister(registry):
    def keep_last(inputs: MethodInputs) -> torch.Tensor:
        batch, tokens = inputs.hidden.shape[:2]
        return torch.arange(tokens - inputs.keep, tokens).expand(batch, -1)

    assert registry.register("test-last", keep_last, reads=()) is keep_last

    @registry.register("test.last_2", reads={"seed"})
    def decorated(inputs):
        return keep_last(inputs)

    assert callable(decorated) and registry.get("test.last_2").reads == {Signal.SEED}
    assert registry.get("test-last") == Method("test-last", keep_last, frozenset())
    assert {"test-last", "test.last_2"} <= set(registry.names())
    result = run_method(registry.get("test-last"), MethodInputs(hidden=torch.randn(2, 6, 3), keep=2), merge=False)
    assert result.indices.tolist() == [[4, 5]] * 2
    registry.unregister("test-last")
    assert "test-last" not in registry.names()
    # reads defaults to every signal but the seed; Signals and their names alike
    registry.register("test-default-reads", keep_last)
    assert registry.get("test-default-reads").reads == {Signal.SALIENCY, Signal.ATTN, Signal.TEXT}
    registry.register("test-signal-reads", keep_last, reads={Signal.TEXT, "seed"})
    assert registry.get("test-signal-reads").reads == {Signal.TEXT, Signal.SEED}


@pytest.mark.parametrize("name, reads, error, message", [
    ("Upper", (), ValueError, r"method name must be 1 to 63 lower-case letters.*got 'Upper'"),
    ("", (), ValueError, r"got ''"),
    ("-dash-first", (), ValueError, r"got '-dash-first'"),
    ("x" * 64, (), ValueError, r"method name must be 1 to 63"),
    (7, (), ValueError, r"got 7"),
    ("test-pixels", ("pixels",), ValueError, r"method 'test-pixels' reads unknown signal\(s\) \['pixels'\]; "
                                             r"the signals are \['attn', 'keys', 'layer_received', 'projected', 'received', 'saliency', 'seed', 'text'\]"),
    ("test-string", "text", TypeError, r"method 'test-string': reads must be a collection of signal names"),
    ("test-none", None, TypeError, r"method 'test-none': reads must be a collection"),
])
def test_a_bad_name_or_reads_is_refused_naming_it(registry, name, reads, error, message):
    with pytest.raises(error, match=message):
        registry.register(name, lambda inputs: None, reads=reads)
    with pytest.raises(error, match=message):
        Method(name, lambda inputs: None, reads=reads)
    assert registry.names() == BUILTIN_NAMES


def test_a_name_registered_twice_a_builtin_and_a_code_clash_are_refused(registry):
    registry.register("test-twice", lambda inputs: None, reads=())
    with pytest.raises(ValueError, match="a pruning method named 'test-twice' is already registered"):
        registry.register("test-twice", lambda inputs: None, reads=())
    with pytest.raises(ValueError, match="a pruning method named 'first' is already registered"):
        registry.register("first", lambda inputs: None, reads=())
    with pytest.raises(ValueError, match="'random' is a built-in method and stays registered"):
        registry.unregister("random")
    # "plumless" and "buckeroo" share their CRC-32: two methods must travel as two codes
    assert method_code("plumless") == method_code("buckeroo")
    registry.register("plumless", lambda inputs: None, reads=())
    with pytest.raises(ValueError, match="method name 'buckeroo' has the same code as 'plumless'"):
        registry.register("buckeroo", lambda inputs: None, reads=())
    with pytest.raises(TypeError, match="method 'test-callable': select must be callable, got int"):
        registry.register("test-callable", 3, reads=())
    with pytest.raises(TypeError, match="method 'test-callable': prune must be callable, got str"):
        registry.register("test-callable", prune="fn", reads=())
    with pytest.raises(TypeError, match="must be a desap_ops.methods.Method, got str"):
        registry.add("first")
    assert "test-callable" not in registry.names()


def test_a_method_has_exactly_one_of_select_and_prune(registry):
    def select(inputs):
        return None

    def prune(inputs, merge):
        return None

    with pytest.raises(TypeError, match="method 'test-both' must have exactly one of select .* and prune .*got both"):
        Method("test-both", select, prune=prune)
    with pytest.raises(TypeError, match="method 'test-neither' must have exactly one .*got neither"):
        Method("test-neither")
    with pytest.raises(TypeError, match="method 'test-both' must have exactly one"):
        registry.register("test-both", select, prune=prune)
    with pytest.raises(TypeError, match="checked must be True or False, and False only for a prune method"):
        Method("test-unchecked", select, checked=False)
    with pytest.raises(TypeError, match=r"method 'test-merges': merges must be True or False .*got 1"):
        Method("test-merges", select, merges=1)
    assert {"test-both", "test-neither"}.isdisjoint(registry.names())
    assert registry.register("test-prune", prune=prune, reads=()) is prune
    assert registry.get("test-prune").prune is prune and registry.get("test-prune").select is None


def test_an_unknown_method_is_a_value_error_naming_it_and_the_registered_ones(registry):
    registered = ", ".join(repr(name) for name in BUILTIN_NAMES)
    with pytest.raises(ValueError, match=rf"method 'nope' is not a registered pruning method; registered: "
                                         rf"\[{registered}\]"):
        registry.get("nope")
    with pytest.raises(TypeError, match="method must be a method name"):
        registry.get(None)
    with pytest.raises(ValueError, match=rf"no registered pruning method has code 12; registered: \[{registered}\]"):
        registry.by_code(12)


# --- what a method gives back ----------------------------------------------------------------------

B, N, K = 2, 6, 3
GOOD = torch.tensor([[0, 2, 5], [1, 3, 4]])


def _own(assignment_rows):
    return Selection(GOOD, torch.tensor(assignment_rows))


@pytest.mark.parametrize("returned, message", [
    ([[0, 2, 5], [1, 3, 4]], r"returned list, not a tensor of indices \(or a Selection\)"),
    ((GOOD, None), r"returned tuple, not a tensor"),
    (GOOD.float(), r"returned indices of dtype torch.float32; they must be int64"),
    (GOOD.bool(), r"returned indices of dtype torch.bool"),
    (GOOD[:, :2], r"returned indices of shape \(2, 2\); expected \(images, keep\) = \(2, 3\)"),
    (GOOD[:1], r"returned indices of shape \(1, 3\)"),
    (GOOD[0], r"returned indices of shape \(3,\)"),
    (torch.tensor([[0, 2, 6], [1, 3, 4]]), r"returned indices outside \[0, 6\)"),
    (torch.tensor([[-1, 2, 5], [1, 3, 4]]), r"returned indices outside \[0, 6\)"),
    (torch.tensor([[0, 5, 2], [1, 3, 4]]), r"returned indices that are not strictly ascending \(sorted and distinct\)"),
    (torch.tensor([[0, 2, 2], [1, 3, 4]]), r"returned .*not strictly ascending"),
    (Selection(GOOD, torch.zeros(2, 5, dtype=torch.long)), r"returned an assignment that is not a \(2, 6\) tensor"),
    (Selection(GOOD, [[0] * 6] * 2), r"returned an assignment that is not a \(2, 6\) tensor"),
    (Selection(GOOD, torch.zeros(2, 6)), r"returned an assignment of dtype torch.float32"),
    (_own([[0, 0, 2, 0, 0, 2], [0, 0, 1, 1, 2, 1]]), r"returned an assignment that does not send each kept token "
                                                      r"to its own position and every token to one in \[0, 3\)"),
    (_own([[0, 0, 1, 0, 3, 2], [0, 0, 1, 1, 2, 1]]), r"returned .*does not send each kept token"),
    (_own([[0, -1, 1, 0, 0, 2], [0, 0, 1, 1, 2, 1]]), r"returned .*does not send each kept token"),
])
def test_a_wrong_selection_is_a_method_failure_naming_the_method(registry, returned, message):
    registry.register("test-wrong", lambda inputs: returned, reads=())
    inputs = MethodInputs(hidden=torch.randn(B, N, 4), keep=K)
    for merge in (True, False):
        with pytest.raises(MethodFailure, match=r"pruning method 'test-wrong' " + message):
            run_method(registry.get("test-wrong"), inputs, merge=merge)


def test_a_right_selection_passes_in_any_accepted_form():
    inputs = MethodInputs(hidden=torch.randn(B, N, 4), keep=K)
    own = [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 1]]
    for returned in (GOOD, GOOD.int(), Selection(GOOD), _own(own), Selection(GOOD, torch.tensor(own).int())):
        result = run_method(Method("test-right", lambda inputs, returned=returned: returned, reads=()), inputs,
                            merge=True)
        assert result.indices.dtype == torch.int64 and torch.equal(result.indices, GOOD)
        assert result.task_scores is None and result.task_keep is None   # a selecting method scores no task


def test_a_method_that_raises_is_a_method_failure_naming_it():
    def broken(inputs, merge=None):
        raise KeyError("no such signal")

    inputs = MethodInputs(hidden=torch.randn(1, 4, 2), keep=2)
    for method in (Method("test-raises", broken, reads=()), Method("test-raises", prune=broken, reads=())):
        message = r"pruning method 'test-raises' raised KeyError\('no such signal'\)"
        with pytest.raises(MethodFailure, match=message) as caught:
            run_method(method, inputs, merge=True)
        assert isinstance(caught.value, ValueError) and isinstance(caught.value.__cause__, KeyError)


# --- a method that prunes the whole step itself --------------------------------------------------------

def largest_norm(inputs: MethodInputs) -> torch.Tensor:
    return inputs.hidden.float().norm(dim=-1).topk(inputs.keep, dim=-1).indices.sort(dim=-1).values


def fused_largest_norm(inputs: MethodInputs, merge: bool) -> PruneResult:
    """The largest-norm tokens, gathered or merged by the method itself (as a fused kernel would)."""
    indices = largest_norm(inputs)
    assignment = reference.assign_tokens(indices, inputs.hidden.detach(), merge)
    return PruneResult(reference.merge_tokens(inputs.hidden, indices, assignment, merge), indices, assignment,
                       None, None)


def test_a_prune_method_runs_through_run_method_as_a_select_method_of_the_same_choice(registry):
    registry.register("test-fused", prune=fused_largest_norm, reads=())
    registry.register("test-selects", largest_norm, reads=())
    hidden = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    inputs = MethodInputs(hidden=hidden, keep=4)
    for merge in (True, False):
        fused = run_method(registry.get("test-fused"), inputs, merge=merge)
        selected = run_method(registry.get("test-selects"), inputs, merge=merge)
        for got, want in zip(fused, selected):
            assert (got is None and want is None) or torch.equal(got, want)
    fused.tokens.sum().backward()   # the method's tokens keep their gradient to hidden
    assert hidden.grad is not None and int((hidden.grad != 0).any(dim=-1).sum()) == 3 * 4


def test_a_prune_methods_own_task_scores_are_kept(registry):
    def scored(inputs, merge):
        result = fused_largest_norm(inputs, merge)
        batch, tokens = inputs.hidden.shape[:2]
        return result._replace(task_scores=torch.rand(batch, tokens), task_keep=torch.full((batch,), 2))

    registry.register("test-scored", prune=scored, reads=())
    result = run_method(registry.get("test-scored"), MethodInputs(hidden=torch.randn(2, 7, 3), keep=3), merge=True)
    assert result.task_scores.shape == (2, 7) and result.task_keep.tolist() == [2, 2]


def _wrong(field, value):
    """A prune function whose result has ``field`` replaced by ``value(result, merge)`` (None: the
    whole result)."""
    def prune(inputs, merge):
        result = fused_largest_norm(inputs, merge)
        return value(result, merge) if field is None else result._replace(**{field: value(result, merge)})
    return prune


def _dropped_to(target):
    """An assignment that sends every dropped token to ``target``, the kept ones to their own places."""
    def value(result, merge):
        assignment = result.assignment.clone()
        kept = torch.zeros_like(assignment, dtype=torch.bool).scatter_(1, result.indices, True)
        assignment[~kept] = target
        return assignment
    return value


@pytest.mark.parametrize("prune, merges, message", [
    (_wrong(None, lambda r, m: tuple(r)), (True, False), r"returned tuple, not a PruneResult"),
    (_wrong("tokens", lambda r, m: r.tokens[:, :2]), (True, False), r"returned tokens that are not a \(B, K, D\) = "
                                                                     r"\(2, 3, 4\) tensor"),
    (_wrong("tokens", lambda r, m: r.tokens.double()), (True, False), r"returned tokens of dtype torch.float64; "
                                                                       r"they must be hidden's, torch.float32"),
    (_wrong("indices", lambda r, m: r.indices.flip(-1)), (True, False), r"returned indices that are not strictly "
                                                                         r"ascending"),
    (_wrong("indices", lambda r, m: r.indices.float()), (True, False), r"returned indices of dtype torch.float32"),
    (_wrong("assignment", lambda r, m: r.assignment[:, :5]), (True, False), r"returned an assignment that is not a "
                                                                             r"\(2, 8\) int64"),
    (_wrong("assignment", lambda r, m: r.assignment.roll(1, dims=1)), (True, False),
     r"returned an assignment that does not send each kept token to its own position"),
    (_wrong("assignment", _dropped_to(-1)), (True,), r"returned an assignment .*every dropped token into \[0, 3\)"),
    (_wrong("assignment", _dropped_to(0)), (False,), r"returned an assignment .*every dropped token to -1 "
                                                     r"\(merge=False\)"),
    (_wrong("task_scores", lambda r, m: torch.zeros(2)), (True, False), r"returned task_scores that are neither None "
                                                                         r"nor a \(2, 8\) tensor"),
    (_wrong("task_keep", lambda r, m: [0, 0]), (True, False), r"returned task_keep that are neither None nor a"),
])
def test_a_wrong_prune_result_is_a_method_failure_naming_the_method(registry, prune, merges, message):
    registry.register("test-wrong-prune", prune=prune, reads=())
    inputs = MethodInputs(hidden=torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(2)), keep=3)
    for merge in merges:
        with pytest.raises(MethodFailure, match=r"pruning method 'test-wrong-prune' " + message):
            run_method(registry.get("test-wrong-prune"), inputs, merge=merge)


def test_desap_is_a_prune_method_whose_argument_errors_surface_as_they_are():
    desap = get_method("desap")
    assert desap.select is None and callable(desap.prune) and desap.checked is False
    gen = torch.Generator().manual_seed(3)
    inputs = MethodInputs(hidden=torch.randn(2, 9, 4, generator=gen), keep=3, saliency=torch.rand(2, 8, generator=gen),
                          attn=torch.randn(2, 9, 5, generator=gen), text=torch.randn(2, 2, 5, generator=gen))
    with pytest.raises(ValueError, match=r"saliency must have shape \(B, N\) = \(2, 9\), got \(2, 8\)") as caught:
        run_method(desap, inputs, merge=True)
    assert type(caught.value) is ValueError   # the caller's mistake, not a MethodFailure an engine falls back on

# --- the entry-point group ---------------------------------------------------------------------------

def test_a_plugin_package_is_found_through_its_entry_points(tmp_path):
    before = available_methods()
    with entry_points_on_path(tmp_path):
        method = get_method("largest-norm")
        assert method.reads == frozenset() and "broken-order" in available_methods()
        assert set(BUILTIN_NAMES) <= set(available_methods())
        hidden = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(0))
        result = run_method(method, MethodInputs(hidden=hidden, keep=3), merge=False)
        norms = hidden.norm(dim=-1)
        assert result.indices.tolist() == [sorted(row.topk(3).indices.tolist()) for row in norms]
        with pytest.raises(MethodFailure, match="pruning method 'broken-order' returned indices that are not "
                                                "strictly ascending"):
            run_method(get_method("broken-order"), MethodInputs(hidden=hidden, keep=3), merge=True)
    assert available_methods() == before   # all restored


@pytest.mark.parametrize("points, message", [
    ({"missing": "desap_method_plugin:NOT_THERE"}, r"pruning method 'missing' \(desap_method_plugin:NOT_THERE, "
                                                   r"entry point group 'desap_ops.methods'\) failed to load: "
                                                   r"AttributeError"),
    ({"no-module": "no_such_module_here:X"}, r"pruning method 'no-module' .*failed to load: ModuleNotFoundError"),
    ({"other-name": "desap_method_plugin:LARGEST_NORM"}, r"pruning method 'other-name' .*the entry point names "
                                                         r"the method 'largest-norm'"),
    ({"first": "desap_method_plugin:largest_norm"}, r"pruning method 'first' .*already registered"),
    ({"Bad": "desap_method_plugin:largest_norm"}, r"pruning method 'Bad' .*method name must be"),
])
def test_an_entry_point_that_fails_is_a_runtime_error_naming_it_on_every_lookup(tmp_path, points, message):
    with entry_points_on_path(tmp_path, {"largest-norm": "desap_method_plugin:LARGEST_NORM", **points}):
        for _ in range(2):   # never a process running on with a method silently missing
            with pytest.raises(RuntimeError, match=message):
                get_method("first")
    assert get_method("first").name == "first"


def test_an_entry_point_may_name_a_bare_select_function(tmp_path):
    with entry_points_on_path(tmp_path, {"bare-norm": "desap_method_plugin:largest_norm"}):
        method = get_method("bare-norm")
        assert method.reads == {Signal.SALIENCY, Signal.ATTN, Signal.TEXT}   # every signal but the seed
        assert ENTRY_POINT_GROUP == "desap_ops.methods"


def test_an_entry_point_may_name_a_prune_method(tmp_path):
    (tmp_path / "fused_plugin.py").write_text(
        "from desap_ops import reference\n"
        "from desap_ops.methods import Method\n"
        "from desap_ops.reference import PruneResult\n\n\n"
        "def fused_norm(inputs, merge):\n"
        "    indices = inputs.hidden.norm(dim=-1).topk(inputs.keep, dim=-1).indices.sort(dim=-1).values\n"
        "    assignment = reference.assign_tokens(indices, inputs.hidden, merge)\n"
        "    tokens = reference.merge_tokens(inputs.hidden, indices, assignment, merge)\n"
        "    return PruneResult(tokens, indices, assignment, None, None)\n\n\n"
        "FUSED = Method('fused-norm', prune=fused_norm, reads=frozenset())\n")
    with entry_points_on_path(tmp_path, {"fused-norm": "fused_plugin:FUSED"}) as registry:
        method = get_method("fused-norm")
        assert registry.get("fused-norm") is method and method.prune is sys.modules["fused_plugin"].fused_norm
        hidden = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(4))
        result = run_method(method, MethodInputs(hidden=hidden, keep=3), merge=False)
        assert result.indices.tolist() == [sorted(row.topk(3).indices.tolist()) for row in hidden.norm(dim=-1)]
        assert result.task_scores is None and result.task_keep is None
    sys.modules.pop("fused_plugin", None)
    assert "fused-norm" not in available_methods()
