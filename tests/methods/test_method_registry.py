"""The method registry (desap_ops.methods.registry): registering, looking up, the entry-point group
loaded through a real entry point, and the check of what a method gives back (each failure a
MethodFailure naming the method)."""
import pytest
import torch

import desap_ops
from desap_ops.methods import (DEFAULT_METHOD, ENTRY_POINT_GROUP, SIGNALS, Method, MethodFailure, MethodInputs,
                               Selection, available_methods, get_method, method_by_code, method_code, register_method,
                               run_method, unregister_method)
from integrations.common.method_plugin import entry_points_on_path

BUILTIN = ["desap", "divprune", "first", "random", "saliency", "similarity"]


@pytest.fixture
def registered():
    """Names registered by a test, unregistered after it."""
    names = []
    yield names
    for name in names:
        unregister_method(name)


def test_the_builtins_are_registered_with_the_signals_they_read():
    assert set(BUILTIN) <= set(available_methods()) and DEFAULT_METHOD == "desap"
    reads = {name: get_method(name).reads for name in BUILTIN}
    assert reads == {"desap": {"saliency", "attn", "text"}, "divprune": set(), "first": set(), "random": {"seed"},
                     "saliency": {"saliency"}, "similarity": {"attn", "text"}}
    assert SIGNALS == {"saliency", "attn", "text", "seed"}
    for name in BUILTIN:
        assert method_by_code(method_code(name)).name == name and get_method(name).code == method_code(name)
        assert float(method_code(name)) == method_code(name) < 2**32   # exact in vLLM's float64 option tensor
    assert desap_ops.register_method is register_method and desap_ops.available_methods is available_methods
    assert desap_ops.MethodInputs is MethodInputs and desap_ops.Selection is Selection


def test_register_a_function_or_with_the_decorator_and_unregister(registered):
    def keep_last(inputs: MethodInputs) -> torch.Tensor:
        batch, tokens = inputs.hidden.shape[:2]
        return torch.arange(tokens - inputs.keep, tokens).expand(batch, -1)

    assert register_method("test-last", keep_last, reads=()) is keep_last
    registered.append("test-last")

    @register_method("test.last_2", reads={"seed"})
    def decorated(inputs):
        return keep_last(inputs)

    registered.append("test.last_2")
    assert callable(decorated) and get_method("test.last_2").reads == {"seed"}
    assert get_method("test-last") == Method("test-last", keep_last, frozenset())
    assert {"test-last", "test.last_2"} <= set(available_methods())
    result = run_method(get_method("test-last"), MethodInputs(hidden=torch.randn(2, 6, 3), keep=2), merge=False)
    assert result.indices.tolist() == [[4, 5]] * 2
    unregister_method("test-last")
    registered.remove("test-last")
    assert "test-last" not in available_methods()
    # reads defaults to every signal but the seed
    register_method("test-default-reads", keep_last)
    registered.append("test-default-reads")
    assert get_method("test-default-reads").reads == {"saliency", "attn", "text"}


@pytest.mark.parametrize("name, reads, error, message", [
    ("Upper", (), ValueError, r"method name must be 1 to 63 lower-case letters.*got 'Upper'"),
    ("", (), ValueError, r"got ''"),
    ("-dash-first", (), ValueError, r"got '-dash-first'"),
    ("x" * 64, (), ValueError, r"method name must be 1 to 63"),
    (7, (), ValueError, r"got 7"),
    ("test-pixels", ("pixels",), ValueError, r"method 'test-pixels' reads unknown signal\(s\) \['pixels'\]; "
                                             r"the signals are \['attn', 'saliency', 'seed', 'text'\]"),
    ("test-string", "text", TypeError, r"method 'test-string': reads must be a collection of signal names"),
    ("test-none", None, TypeError, r"method 'test-none': reads must be a collection"),
])
def test_a_bad_name_or_reads_is_refused_naming_it(name, reads, error, message):
    with pytest.raises(error, match=message):
        register_method(name, lambda inputs: None, reads=reads)
    assert name not in available_methods()


def test_a_name_registered_twice_a_builtin_and_a_code_clash_are_refused(registered):
    register_method("test-twice", lambda inputs: None, reads=())
    registered.append("test-twice")
    with pytest.raises(ValueError, match="a pruning method named 'test-twice' is already registered"):
        register_method("test-twice", lambda inputs: None, reads=())
    with pytest.raises(ValueError, match="a pruning method named 'first' is already registered"):
        register_method("first", lambda inputs: None, reads=())
    with pytest.raises(ValueError, match="'random' is a built-in method and stays registered"):
        unregister_method("random")
    # "plumless" and "buckeroo" share their CRC-32: two methods must travel as two codes
    assert method_code("plumless") == method_code("buckeroo")
    register_method("plumless", lambda inputs: None, reads=())
    registered.append("plumless")
    with pytest.raises(ValueError, match="method name 'buckeroo' has the same code as 'plumless'"):
        register_method("buckeroo", lambda inputs: None, reads=())
    with pytest.raises(TypeError, match="method 'test-callable': select must be callable, got int"):
        register_method("test-callable", 3, reads=())


def test_an_unknown_method_is_a_value_error_naming_it_and_the_registered_ones():
    with pytest.raises(ValueError, match=r"method 'nope' is not a registered pruning method; registered: "
                                         r"\['desap', 'divprune', 'first'.*'similarity'"):
        get_method("nope")
    with pytest.raises(TypeError, match="method must be a method name"):
        get_method(None)
    with pytest.raises(ValueError, match=r"no registered pruning method has code 12; registered: \['desap'"):
        method_by_code(12)


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
def test_a_wrong_selection_is_a_method_failure_naming_the_method(registered, returned, message):
    register_method("test-wrong", lambda inputs: returned, reads=())
    registered.append("test-wrong")
    inputs = MethodInputs(hidden=torch.randn(B, N, 4), keep=K)
    for merge in (True, False):
        with pytest.raises(MethodFailure, match=r"pruning method 'test-wrong' " + message):
            run_method(get_method("test-wrong"), inputs, merge=merge)


def test_a_right_selection_passes_in_any_accepted_form(registered):
    inputs = MethodInputs(hidden=torch.randn(B, N, 4), keep=K)
    own = [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 1]]
    for returned in (GOOD, GOOD.int(), Selection(GOOD), _own(own), Selection(GOOD, torch.tensor(own).int())):
        name = f"test-right-{len(registered)}"
        register_method(name, lambda inputs, returned=returned: returned, reads=())
        registered.append(name)
        result = run_method(get_method(name), inputs, merge=True)
        assert result.indices.dtype == torch.int64 and torch.equal(result.indices, GOOD)


def test_a_method_that_raises_is_a_method_failure_naming_it(registered):
    def broken(inputs):
        raise KeyError("no such signal")

    register_method("test-raises", broken, reads=())
    registered.append("test-raises")
    message = r"pruning method 'test-raises' raised KeyError\('no such signal'\)"
    with pytest.raises(MethodFailure, match=message) as caught:
        run_method(get_method("test-raises"), MethodInputs(hidden=torch.randn(1, 4, 2), keep=2), merge=True)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value.__cause__, KeyError)


# --- the entry-point group ---------------------------------------------------------------------------

def test_a_plugin_package_is_found_through_its_entry_points(tmp_path):
    before = available_methods()
    with entry_points_on_path(tmp_path):
        method = get_method("largest-norm")
        assert method.reads == frozenset() and "broken-order" in available_methods()
        assert set(BUILTIN) <= set(available_methods())
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
        assert method.reads == {"saliency", "attn", "text"}   # a function reads every signal but the seed
        assert ENTRY_POINT_GROUP == "desap_ops.methods"
