"""Which model runners ``mrope.recompute_after_encoder`` turns the M-RoPE step on in: the V2 CPU
runner's pruner only on the CPU platform, so a GPU worker never imports the CPU build's modules.
A stand-in ``vllm.platforms`` gives the platform; runs without vLLM."""
import sys
from types import ModuleType, SimpleNamespace

import pytest

from desap_ops.integrations.vllm import hooks, mrope
from desap_ops.integrations.vllm.hooks import V1_RUNNER, V2_CPU_PRUNER, V2_GPU_PRUNER


@pytest.fixture
def runners(monkeypatch):
    """Set the platform (``runners(is_cpu)``), run ``recompute_after_encoder`` on a release with
    every runner (0.34's CPU one included); what it built and which modules it looked up."""
    def run(is_cpu: bool):
        vllm, platforms = ModuleType("vllm"), ModuleType("vllm.platforms")
        platforms.current_platform = SimpleNamespace(is_cpu=lambda: is_cpu)
        vllm.platforms = platforms
        monkeypatch.setitem(sys.modules, "vllm", vllm)
        monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
        built, looked_up = [], []
        monkeypatch.setattr(mrope, "_build_v2_pruner", lambda *modules: built.append(modules))
        monkeypatch.setattr(mrope, "_turn_on_v1_step", lambda: built.append("v1"))
        monkeypatch.setattr(hooks, "installed_has_module", lambda module: looked_up.append(module) or True)
        mrope.recompute_after_encoder()
        return built, looked_up
    return run


def test_the_cpu_runners_pruner_is_built_on_the_cpu_platform(runners):
    built, looked_up = runners(is_cpu=True)
    assert built == ["v1", V2_GPU_PRUNER, V2_CPU_PRUNER]
    assert looked_up == [V1_RUNNER.where, V2_CPU_PRUNER[0]]


def test_a_gpu_platform_never_touches_the_cpu_runners_modules(runners):
    built, looked_up = runners(is_cpu=False)
    assert built == ["v1", V2_GPU_PRUNER]
    assert looked_up == [V1_RUNNER.where]   # not even looked up: that imports vllm.v1.worker.cpu's packages
