"""The vLLM plugin's options (``integrations/vllm/options.py``): the engine's ``hf_overrides``
entry, a request's ``mm_processor_kwargs`` entry over it, and their per-item encoding; the model
side's runs of equal options (``integrations/vllm/model.py``). Pure Python and torch: runs without vLLM."""
import math

import pytest
import torch

from desap_ops.integrations.vllm.options import (REQUEST_OPTIONS, decode_request, encode_request, read_options,
                                                 request_options)
from desap_ops.methods import BUILTIN, Signal, available_methods, method_code, register_method, unregister_method


class Config:
    def __init__(self, desap):
        self.desap = desap


def engine(**desap):
    return read_options(Config({"keep": 8, **desap}))


def test_the_engine_sets_the_defaults_and_max_keep_defaults_to_keep():
    options = engine()
    assert (options.keep, options.max_keep, options.ideal, options.task_ratio) == (8, 8, False, 0.5)
    assert engine(max_keep=32, ideal=True).max_keep == 32 and engine(ideal=True).ideal is True
    assert read_options(Config(None)) is None


@pytest.mark.parametrize("desap, error, message", [
    ({"max_keep": 4}, ValueError, r'\["max_keep"\] \(4\) must be at least the engine\'s keep \(8\)'),
    ({"max_keep": 0}, ValueError, r'\["max_keep"\]: keep must lie in \[1, N\], got 0'),
    ({"max_keep": 9.5}, TypeError, r'\["max_keep"\]: keep must be an integer'),
    ({"ideal": "yes"}, TypeError, r'\["ideal"\] must be true or false'),
    ({"ratio": 0.5}, ValueError, r"unknown option\(s\) \['ratio'\]"),
])
def test_bad_engine_options_are_refused_by_name(desap, error, message):
    with pytest.raises(error, match=message):
        engine(**desap)


def test_a_request_overrides_what_a_request_may_set_and_keeps_the_rest():
    base = engine(max_keep=32, backend="reference", exclude_token_ids=[3], chat=True)
    assert request_options(base, None) is base
    options = request_options(base, {"keep": 32, "task_ratio": "auto", "merge": False, "text_reduce": "mean",
                                     "text_budget": 4})
    assert (options.keep, options.task_ratio, options.merge, options.text_reduce, options.text_budget) == \
        (32, "auto", False, "mean", 4)
    assert (options.backend, options.exclude_token_ids, options.chat, options.max_keep) == ("reference", (3,), True, 32)
    assert request_options(base, {"keep": 16}) == options.__class__(**{**vars(base), "keep": 16})
    assert repr(request_options(base, {"keep": 16})) != repr(base)   # the hash folds in the request's options


@pytest.mark.parametrize("raw, message", [
    ({"keep": 9}, r'\["keep"\] is 9, above the most this engine allows, hf_overrides\["desap"\]\["max_keep"\] = 8'),
    ({"keep": 0}, r"keep must lie in \[1, N\], got 0"),
    ({"keep": "8"}, r"keep must be an integer"),
    ({"keep": True}, r"keep must be an integer, got a bool"),
    ({"task_ratio": 1.5}, r"task_ratio must lie in \[0, 1\], got 1.5"),
    ({"task_ratio": "half"}, r"task_ratio must be a real number or 'auto'"),
    ({"merge": "no"}, r"merge must be None \(the method's own default\), True or False, got str 'no'"),
    ({"text_reduce": "sum"}, r"text_reduce must be one of \('max', 'mean'\), got 'sum'"),
    ({"text_budget": 0}, r"text_budget must be at least 1"),
    ({"ratio": 0.5}, r"unknown option\(s\) \['ratio'\]; a request may set \['keep'"),
    ({"ideal": True}, r"sets \['ideal'\], which only the engine sets"),
    ({"backend": "triton", "max_keep": 64}, r"sets \['backend', 'max_keep'\], which only the engine sets"),
    ([8], r'mm_processor_kwargs\["desap"\] must be a dict of DeSAP options, got list'),
])
def test_a_bad_request_option_is_a_value_error_naming_it(raw, message):
    # a ValueError, whatever the kind of mistake: vLLM's server answers it with a 400
    with pytest.raises(ValueError, match=r'mm_processor_kwargs\["desap"\]') as caught:
        request_options(engine(), raw)
    assert caught.match(message)


@pytest.mark.parametrize("ideal", [True, False])
@pytest.mark.parametrize("raw", [{}, {"keep": 3, "task_ratio": "auto", "text_budget": 7},
                                 {"task_ratio": 0.1 + 0.2, "merge": False, "text_reduce": "mean"},
                                 {"merge": True}, {"merge": None}])
def test_the_per_item_encoding_gives_back_the_same_options_exactly(raw, ideal):
    base = engine(max_keep=16, ideal=ideal, backend="reference")
    options = request_options(base, raw)
    encoded = encode_request(options)
    assert encoded.shape == (len(REQUEST_OPTIONS),) and encoded.dtype == torch.float64
    assert decode_request(base, encoded) == options
    assert decode_request(base, encoded[None]) == options   # a stacked (1, 6) row too
    assert math.isnan(encoded[1]) == (options.task_ratio == "auto")


def test_images_sharing_options_prune_in_runs():
    from desap_ops.integrations.vllm.model import equal_runs

    assert equal_runs([]) == []
    assert equal_runs(["a", "a", "b", "a"]) == [range(0, 2), range(2, 3), range(3, 4)]


def test_the_engines_options_are_the_prunes_options_by_the_same_names():
    from desap_ops.integrations.common.pruning import PruneOptions

    options = engine(task_ratio="auto", text_budget=3, ideal=True)
    assert isinstance(options, PruneOptions) and options.ideal is True
    assert (options.task_ratio, options.merge, options.text_reduce, options.backend, options.text_budget,
            options.method) == ("auto", False, "max", "auto", 3, "first")   # the ideal: "first", unmerged


@pytest.mark.parametrize("engine_merge, raw, merge", [
    (None, {}, None), (None, {"merge": True}, True), (True, {}, True), (True, {"merge": None}, None),
    (False, {"method": "desap"}, False), (None, {"method": "desap"}, None), (None, {"method": "divprune"}, None),
])
def test_merge_is_the_methods_own_default_unless_the_engine_or_the_request_sets_it(engine_merge, raw, merge):
    from desap_ops.methods import get_method

    base = engine(merge=engine_merge, method="saliency")
    assert engine().merge is None   # the default: each method's own
    options = request_options(base, raw)
    assert options.merge is merge
    assert options.merges is (get_method(options.method).merges if merge is None else merge)
    assert decode_request(base, encode_request(options)) == options   # None travels with the image as NaN


def test_the_ideal_engine_never_merges_whatever_a_request_asks():
    base = engine(ideal=True, max_keep=16)
    for raw in ({"merge": True}, {"merge": True, "keep": 12, "method": "first"}, {}, {"merge": None}):
        options = request_options(base, raw)
        assert (options.method, options.merge) == ("first", False)
        assert decode_request(base, encode_request(options)) == options


# --- the pruning method ---------------------------------------------------------------------------------

REGISTERED = r"registered: \[" + ", ".join(repr(name) for name in sorted(available_methods()))


def test_the_engine_sets_a_method_and_may_limit_what_requests_ask_for():
    assert engine().method == "desap" and engine().methods is None
    options = engine(method="divprune", methods=["random", "divprune", "random"])
    assert (options.method, options.methods, options.reads) == ("divprune", ("divprune", "random"), {Signal.PROJECTED})
    assert engine(method="random").reads == {Signal.SEED}
    assert engine(method="similarity").reads == {Signal.ATTN, Signal.TEXT}
    assert engine(ideal=True, method="first").method == "first"


@pytest.mark.parametrize("desap, error, message", [
    ({"method": "nope"}, ValueError, r"hf_overrides\[\"desap\"\]: method 'nope' is not a registered pruning method; "
                                     + REGISTERED),
    ({"method": 3}, TypeError, r"hf_overrides\[\"desap\"\]: method must be a method name"),
    ({"ideal": True, "method": "random"}, ValueError, r"ideal is the method 'first' unmerged"),
    ({"methods": ["random", "nope"]}, ValueError, r"\[\"methods\"\]: method 'nope' is not a registered"),
    ({"methods": "random"}, TypeError, r"\[\"methods\"\] must be a list of method names, got 'random'"),
    ({"methods": ["random"]}, ValueError, r"\[\"methods\"\] = \['random'\] leaves out the engine's own method 'desap'"),
])
def test_a_bad_engine_method_is_refused_naming_it(desap, error, message):
    with pytest.raises(error, match=message):
        engine(**desap)


def test_a_request_picks_a_method_and_a_wrong_one_is_a_value_error_naming_it():
    base = engine(methods=["desap", "first", "saliency"])
    options = request_options(base, {"method": "saliency"})
    assert options.method == "saliency" and options.reads == {Signal.SALIENCY}
    assert repr(options) != repr(base)   # the image's cache key folds in the method
    assert request_options(engine(), {"method": "divprune"}).method == "divprune"   # no list: any registered one
    for raw, message in [
        ({"method": "random"}, r'\["method"\] is \'random\', which this engine does not allow; '
                               r'hf_overrides\["desap"\]\["methods"\] = \[\'desap\', \'first\', \'saliency\'\]'),
        ({"method": "nope"}, r"method 'nope' is not a registered pruning method; " + REGISTERED),
        ({"method": ["first"]}, r"method must be a method name"),
    ]:
        with pytest.raises(ValueError, match=r'mm_processor_kwargs\["desap"\]') as caught:
            request_options(base, raw)
        assert caught.match(message)
    with pytest.raises(ValueError, match=r'\["method"\] is \'divprune\', but this engine runs the ideal '
                                         r'\(hf_overrides\["desap"\]\["ideal"\]\), which is the method \'first\''):
        request_options(engine(ideal=True), {"method": "divprune"})
    assert request_options(engine(ideal=True), {"method": "first"}).method == "first"


def test_the_method_travels_as_its_code_and_comes_back_by_name():
    register_method("test-travels", lambda inputs: None, reads=())
    try:
        base = engine(max_keep=16)
        for method in [builtin.name for builtin in BUILTIN] + ["test-travels"]:
            options = request_options(base, {"method": method, "keep": 12})
            encoded = encode_request(options)
            assert encoded.shape == (6,) and encoded[5] == method_code(method)
            assert decode_request(base, encoded) == options and decode_request(base, encoded).method == method
    finally:
        unregister_method("test-travels")
