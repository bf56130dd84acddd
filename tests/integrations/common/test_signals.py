"""The one tower-capture helper and the one reader skeleton (``integrations/common/signals.py``),
on a tiny CLIP tower."""
import pytest
import torch

from desap_ops.integrations.common.signals import LayerTap, Taps, TowerSignals, capture, tower_pass
from desap_ops.integrations.hf.clip_tower import encoder_layers
from desap_ops.methods import SIGNALS, Signal
from desap_ops.testing.tiny import tiny_llava

from ..prompts import llava_pixels


def _hooked(*modules) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _attention():
    return encoder_layers(tiny_llava().model.vision_tower)[0].self_attn


def test_capture_reads_each_tapped_module_once_and_removes_its_hooks():
    attention = _attention()
    x = torch.randn(2, 5, attention.embed_dim)
    with capture(Taps(attention=attention, query=attention.q_proj, key=attention.k_proj, inputs=attention)) as got:
        assert _hooked(attention, attention.q_proj, attention.k_proj)
        out = attention(hidden_states=x)[0]
    assert not _hooked(attention, attention.q_proj, attention.k_proj)
    assert torch.equal(got.attention, out)
    assert torch.equal(got.query, attention.q_proj(x)) and torch.equal(got.key, attention.k_proj(x))
    assert got.qkv is None   # not tapped
    assert got.inputs["hidden_states"] is x   # the keyword arguments of the module's call


def test_capture_removes_its_hooks_when_the_pass_raises():
    attention = _attention()
    with pytest.raises(RuntimeError, match="the pass failed"):
        with capture(Taps(attention=attention, qkv=attention.q_proj, inputs=attention.k_proj)):
            raise RuntimeError("the pass failed")
    assert not _hooked(attention, attention.q_proj, attention.k_proj)


def test_capture_refuses_what_is_not_taps():
    with pytest.raises(TypeError, match="Taps"):
        with capture(_attention()):
            pass


def test_tower_pass_captures_only_when_the_method_reads_attention():
    """The skeleton runs the tower once; under capture only where the method reads saliency or the
    attention branch; the seed only where it reads it."""
    tower = tiny_llava().model.vision_tower
    attention = encoder_layers(tower)[0].self_attn
    pixels = llava_pixels()
    seen = []

    def read(outputs, captured):
        seen.append(captured)
        assert not _hooked(attention)   # the hooks are gone before the signals are read
        return TowerSignals(outputs.last_hidden_state, None if captured is None else captured.attention)

    def content(signals):
        return torch.arange(signals.hidden.shape[1]).expand(signals.hidden.shape[:2])

    with torch.no_grad():
        for reads, captured, seeded in ((frozenset(), False, False), (frozenset({Signal.SEED}), False, True),
                                        (frozenset({Signal.SALIENCY}), True, False),
                                        (SIGNALS - {Signal.LAYER_RECEIVED}, True, True)):
            signals, outputs = tower_pass(reads, lambda: tower(pixels), lambda: Taps(attention=attention), read,
                                          content)
            assert (seen.pop() is not None) == captured and (signals.attn is not None) == captured
            assert (signals.seed is not None) == seeded
            assert torch.equal(signals.hidden, outputs.last_hidden_state)
    assert not _hooked(attention)


def test_tower_pass_reads_a_middle_block_only_for_layer_received_and_only_where_the_reader_names_one():
    """HiPrune's middle block: a second capture in the same pass, its hooks gone after; a reader
    that names no middle block refuses the signal rather than give None."""
    tower = tiny_llava().model.vision_tower
    first, second = encoder_layers(tower)[0].self_attn, encoder_layers(tower)[1].self_attn
    pixels = llava_pixels()
    runs = []

    def run():
        runs.append(1)
        return tower(pixels)

    def read(outputs, captured):
        return TowerSignals(outputs.last_hidden_state, None if captured is None else captured.attention)

    def content(signals):
        return torch.zeros(signals.hidden.shape[:2], dtype=torch.int64)

    layer = LayerTap(lambda: Taps(attention=first), lambda captured: captured.attention.sum(dim=-1))
    with torch.no_grad():
        with capture(Taps(attention=first)) as alone:
            tower(pixels)
        expected = alone.attention.sum(dim=-1)
        for reads in (frozenset({Signal.LAYER_RECEIVED}), frozenset({Signal.LAYER_RECEIVED, Signal.ATTN})):
            signals, _ = tower_pass(reads, run, lambda: Taps(attention=second), read, content, layer)
            torch.testing.assert_close(signals.layer_received, expected, rtol=0, atol=0)
            assert (signals.attn is not None) == (Signal.ATTN in reads)
            assert not _hooked(first, second)
        plain, _ = tower_pass(frozenset({Signal.SALIENCY}), run, lambda: Taps(attention=second), read, content, layer)
        assert plain.layer_received is None
        with pytest.raises(ValueError, match="layer_received"):
            tower_pass(frozenset({Signal.LAYER_RECEIVED}), run, lambda: Taps(attention=second), read, content)
    assert len(runs) == 3   # one tower run per pass; the refused one never ran
