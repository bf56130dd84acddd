"""The one ``Hook`` type of both engines (``integrations/common/hooked.py``): ``params=None`` leaves
the parameters unchecked and a tuple names parameters that must be accepted, in transformers'
check (``hf.compat``) and vLLM's (``vllm.hooks``) alike."""
import pytest
from torch import nn

from desap_ops.integrations.common.hooked import Hook
from desap_ops.integrations.hf import compat
from desap_ops.integrations.vllm.hooks import Found, hook_problem


class _Model(nn.Module):
    def encode(self, pixels):
        return pixels


def _found(params):
    return lambda target: Found(params, lambda: None)


def test_none_leaves_the_parameters_unchecked_and_a_tuple_must_be_accepted_in_transformers():
    model = _Model()
    compat.check_hooks(model, [Hook("model.encode"), Hook("model.encode", ("pixels",)), Hook("model.encode", ())])
    with pytest.raises(RuntimeError, match="model.encode takes no sizes"):
        compat.check_hooks(model, [Hook("model.encode", ("pixels", "sizes"))])
    with pytest.raises(RuntimeError, match="model.decode is missing"):
        compat.check_hooks(model, [Hook("model.decode")])


def test_none_leaves_the_parameters_unchecked_and_a_tuple_must_be_accepted_in_vllm():
    assert hook_problem(Hook("m:f"), _found(("pixels",))) is None
    assert hook_problem(Hook("m:f", ("pixels",)), _found(("pixels", "sizes"))) is None
    assert "the plugin expects (pixels, sizes)" in hook_problem(Hook("m:f", ("pixels", "sizes")), _found(("pixels",)))
    assert hook_problem(Hook("m:f", ("pixels",), exact=True), _found(("pixels", "sizes"))) is not None


def test_a_hook_is_checked_when_built():
    with pytest.raises(TypeError, match="Hook.params must be a tuple of names"):
        Hook("model.encode", "pixels")   # a bare string would be read as its letters
    with pytest.raises(TypeError, match="Hook.reads must be a tuple of names"):
        Hook("m:f", reads="flag")
    with pytest.raises(ValueError, match="exact needs the params"):
        Hook("m:f", exact=True)
