"""The plugin's table of hooked vLLM names (``integrations/vllm/hooks.py``) against the installed
vLLM, and what happens when one of them is missing or changed: one error naming the supported
vLLM versions and the name, never a hook skipped without a word."""
import importlib

import pytest
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.multimodal.processing.processor import BaseMultiModalProcessor

from desap_ops.integrations.vllm import SUPPORTED, hooks, register
from desap_ops.integrations.vllm.hooks import (HOOKS, REGISTRY, SUPPORTED_VLLM, V1_RUNNER, VllmVersionError,
                                              check_vllm_hooks, hook_problem, registered_class, required)

register()


def resolved(target: str) -> str:
    """A ``registry:Arch.name`` target as the installed vLLM's "module:Class.name"."""
    if not target.startswith(REGISTRY):
        return target
    architecture, _, name = target[len(REGISTRY):].partition(".")
    cls = registered_class(architecture)
    return f"{cls.__module__}:{cls.__qualname__}.{name}"


def desap_class(architecture: str):
    module, name = SUPPORTED[architecture][0].split(":")
    return getattr(importlib.import_module(f"desap_ops.integrations.vllm.{module}"), name)


def test_every_hooked_name_is_as_the_plugin_expects_in_the_installed_vllm():
    assert [hook_problem(hook) for group in required() for hook in group.hooks] == [None] * sum(
        len(group.hooks) for group in required())
    check_vllm_hooks()
    targets = {resolved(hook.target) for hook in HOOKS}
    for name in ("_get_prompt_updates", "apply", "_get_mm_hashes"):   # on each processor the plugin subclasses
        assert f"vllm.model_executor.models.llava_next:LlavaNextMultiModalProcessor.{name}" in targets
    assert any(target.endswith("Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions") for target in targets)
    assert V1_RUNNER in required()   # vLLM 0.32 still has its V1 runner: its hooks are required here


@pytest.mark.parametrize("architecture", sorted(SUPPORTED))
def test_each_desap_class_subclasses_the_class_vllms_registry_resolves(architecture):
    """So that ``desap`` never runs other language-model code than vLLM runs without it (vLLM 0.34
    moved Qwen3.5's classes to a new module)."""
    from vllm.model_executor.models.registry import ModelRegistry

    own = registered_class(architecture)
    assert own is ModelRegistry.models[architecture].load_model_cls()
    assert own in desap_class(architecture).__mro__
    assert own.__name__ == architecture


def test_a_release_without_the_v1_runner_needs_only_the_v2_hooks(monkeypatch):
    """vLLM 0.34 deleted the V1 model runner: its hooks are not required there, the V2 runner's are."""
    from vllm.v1.worker.gpu.model_states import default

    real = hooks.installed_has_module
    monkeypatch.setattr(hooks, "installed_has_module", lambda module: module != V1_RUNNER.where and real(module))
    real_installed = hooks.installed

    def installed(target):   # as in 0.34: the module is gone
        if target.startswith(V1_RUNNER.where):
            raise LookupError(target)
        return real_installed(target)

    monkeypatch.setattr(hooks, "installed", installed)
    assert V1_RUNNER not in required()
    check_vllm_hooks()   # every other group holds without the V1 runner's names

    def create(model_config, model, rope, encoder_cache):
        raise AssertionError("never called")

    monkeypatch.setattr(default, "maybe_create_mm_pruner", create)
    with pytest.raises(VllmVersionError, match=r"maybe_create_mm_pruner takes .*V2 model runner"):
        check_vllm_hooks()



def test_a_processor_vllm_no_longer_registers_for_the_architecture_is_refused(monkeypatch):
    from desap_ops.integrations.vllm.model import registered_with
    from desap_ops.integrations.vllm.qwen2_5_vl import DesapQwen2_5_VLProcessor

    import dataclasses

    model = registered_class("Qwen2_5_VLForConditionalGeneration")
    factories = model._processor_factory

    class Newer(factories.processor):
        pass

    monkeypatch.setattr(model, "_processor_factory", dataclasses.replace(factories, processor=Newer))
    with pytest.raises(VllmVersionError, match=r"0\.34\.0.*Qwen2_5_VLForConditionalGeneration registers the "
                                               r"processor .*Newer, not .*Qwen2_5_VLMultiModalProcessor"):
        registered_with(DesapQwen2_5_VLProcessor, "Qwen2_5_VLForConditionalGeneration")


def test_a_hooked_method_gone_is_refused_naming_the_supported_versions(monkeypatch):
    # the method where the plugin folds the prompt text into the image's cache key
    monkeypatch.delattr(BaseMultiModalProcessor, "_get_mm_hashes")
    with pytest.raises(VllmVersionError) as error:
        check_vllm_hooks()
    message = str(error.value)
    assert f"supports vLLM {', '.join(SUPPORTED_VLLM)}" in message
    assert "LlavaNextMultiModalProcessor._get_mm_hashes is missing" in message


def test_a_renamed_parameter_of_an_override_is_refused(monkeypatch):
    def recompute(self, input_ids, mm_embeddings, mrope_positions, num_computed_tokens):
        raise AssertionError("never called")

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "recompute_mrope_positions", recompute)
    with pytest.raises(VllmVersionError, match=r"0\.32\.0.*recompute_mrope_positions takes \(input_ids, "
                                               r"mm_embeddings, .*\), the plugin expects \(input_ids, "
                                               r"multimodal_embeddings, "):
        check_vllm_hooks()


def test_a_runner_flag_no_longer_read_is_refused(monkeypatch):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner   # V1: only where vLLM still has it (< 0.34)

    def gather(self, scheduler_output, shift_computed_tokens=0):
        return [], None

    monkeypatch.setattr(GPUModelRunner, "_gather_mm_embeddings", gather)
    with pytest.raises(VllmVersionError, match="_gather_mm_embeddings no longer uses is_multimodal_pruning_enabled"):
        check_vllm_hooks()


def test_register_fails_only_when_the_registry_lookups_it_wraps_changed(monkeypatch):
    from vllm.model_executor.models.registry import _ModelRegistry

    def resolve(self, architectures, config):
        raise AssertionError("never called")

    with monkeypatch.context() as patch:
        patch.setattr(_ModelRegistry, "resolve_model_cls", resolve)
        with pytest.raises(VllmVersionError, match=r"supports vLLM 0\.32\.0.*resolve_model_cls takes "
                                                   r"\(architectures, config\)"):
            register()   # without the wrapped lookups no desap config could be caught later
    monkeypatch.delattr(BaseMultiModalProcessor, "_get_mm_hashes")
    register()   # vLLM calls it in every process: another mismatch must not stop vLLM for other models


def test_on_a_mismatch_vllm_runs_its_own_models_and_a_desap_config_fails_with_the_versions(checkpoints,
                                                                                          monkeypatch):
    from vllm.config import ModelConfig

    monkeypatch.delattr(BaseMultiModalProcessor, "_get_mm_hashes")
    folder = str(checkpoints["llava"])
    ModelConfig(model=folder, max_model_len=512)   # vLLM's own LLaVA still starts
    with pytest.raises(VllmVersionError, match=r"supports vLLM 0\.32\.0.*_get_mm_hashes is missing"):
        ModelConfig(model=folder, hf_overrides={"desap": {"keep": 6}}, max_model_len=512)


def test_every_vllm_method_a_desap_class_overrides_is_in_the_table():
    # a later override left out of the table would again be skipped without a word on another vLLM
    import importlib
    import inspect

    from desap_ops.integrations.vllm import SUPPORTED

    targets = {resolved(hook.target) for hook in HOOKS}
    checked = 0
    for model_target, _ in SUPPORTED.values():
        module = importlib.import_module(f"desap_ops.integrations.vllm.{model_target.split(':')[0]}")
        for desap_class in vars(module).values():
            if not (inspect.isclass(desap_class) and desap_class.__module__ == module.__name__):
                continue
            vllm_class = next((c for c in desap_class.__mro__ if c.__module__.startswith("vllm.")), None)
            if vllm_class is None:
                continue
            overridden = {name for c in desap_class.__mro__ if c.__module__.startswith("desap_ops.")
                          for name, value in vars(c).items()
                          if inspect.isfunction(value) and (name == "__init__" or not name.startswith("__"))}
            for name in sorted(overridden):
                if hasattr(vllm_class, name):
                    assert f"{vllm_class.__module__}:{vllm_class.__name__}.{name}" in targets, name
                    checked += 1
    assert checked >= 3 * 7 + 3 * 2   # the processor overrides and each model's __init__ and embed_multimodal


def test_the_v2_runner_names_behind_qwen_positions_are_in_the_one_table(monkeypatch):
    from vllm.v1.worker.gpu.model_states import default

    targets = {hook.target for hook in HOOKS}
    assert "vllm.v1.worker.gpu.model_states.default:maybe_create_mm_pruner" in targets
    assert "vllm.v1.worker.gpu.model_states.mm_pruning:MultiModalPruner" in targets

    def create(model_config, model, rope, encoder_cache):
        raise AssertionError("never called")

    monkeypatch.setattr(default, "maybe_create_mm_pruner", create)
    with pytest.raises(VllmVersionError, match=r"maybe_create_mm_pruner takes \(model_config, model, rope, "):
        check_vllm_hooks()
