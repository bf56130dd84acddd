"""The vLLM plugin's start-up rules over releases' sources (``integrations/vllm/release_check.py``):
on a small made-up vLLM tree (how names, bases, registry entries and optional runner groups
resolve), on the plugin's own DeSAP classes (each over the registry's class of its architecture),
and, in the slow stage, on every supported release's real wheel. Runs without vLLM installed."""
import ast
import textwrap
from pathlib import Path

import pytest

from desap_ops.integrations.common.hooked import Hook
from desap_ops.integrations.vllm import SUPPORTED, hooks
from desap_ops.integrations.vllm.hooks import (GROUPS, SUPPORTED_VLLM, V1_RUNNER, V2_CPU_RUNNER, HookGroup,
                                              hook_problem, problems, required)
from desap_ops.integrations.vllm.release_check import ReleaseSources, check_release, main, release_sources

PLUGIN = Path(hooks.__file__).parent


def _tree(root: Path, files: dict) -> ReleaseSources:
    for name, text in {"vllm/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return ReleaseSources(root)


MADE_UP = {
    "vllm/platforms.py": "def is_cuda():\n    return True\n",
    "vllm/model_executor/__init__.py": "",
    "vllm/model_executor/models/__init__.py": "",
    "vllm/model_executor/models/registry.py": """
        _MULTIMODAL = {
            "OldArch": ("old", "OldModel"),
            "MovedArch": ("vllm.models.moved", "MovedModel"),
        }
        """,
    "vllm/model_executor/models/old.py": """
        from dataclasses import dataclass
        from typing import ClassVar

        class Base:
            def embed(self, *, pixels, **kwargs):
                return self.flag_read

        class Mixin:
            def embed(self, other):
                pass

        class OldModel(Base, Mixin):
            def __init__(self, *, vllm_config, prefix=""):
                pass

            @classmethod
            def build(cls, size):
                pass

        @dataclass
        class Fields:
            first: int
            kind: ClassVar[str] = "x"

        @dataclass
        class MoreFields(Fields):
            second: int = 0
        """,
    "vllm/models/__init__.py": "",
    "vllm/models/moved/__init__.py": """
        from vllm.platforms import is_cuda
        if is_cuda():
            from .cuda import MovedModel
        else:
            from vllm.model_executor.models.old import OldModel as MovedModel
        """,
    "vllm/models/moved/cuda.py": """
        from vllm.model_executor.models.old import OldModel

        class MovedModel(OldModel):
            def __init__(self, *, vllm_config, prefix="model"):
                self.visual_dim = 1
        """,
    "vllm/distributed/__init__.py": "from .ops import *\n",
    "vllm/distributed/ops.py": "def all_reduce(input_):\n    pass\n",
}


def test_names_resolve_as_python_would_with_the_cuda_branch_of_a_platform_switch(tmp_path):
    sources = _tree(tmp_path, MADE_UP)
    moved = sources.registered_class("MovedArch")
    assert (moved.module, moved.node.name) == ("vllm.models.moved.cuda", "MovedModel")   # first binding: CUDA
    assert sources.lookup("registry:MovedArch.__init__").params == ("vllm_config", "prefix")
    assert "visual_dim" in sources.lookup("registry:MovedArch.__init__").source()
    # inherited through two levels of bases, in C3 order (Base before Mixin)
    assert sources.lookup("registry:MovedArch.embed").params == ("pixels", "**kwargs")
    assert sources.lookup("registry:OldArch.build").params == ("size",)   # a classmethod drops cls
    assert sources.lookup("vllm.distributed:all_reduce").params == ("input_",)   # through a star import
    # a dataclass's fields along its bases, without ClassVars
    assert sources.lookup("vllm.model_executor.models.old:MoreFields").params == ("first", "second")
    for target in ("registry:NoArch.embed", "registry:OldArch.gone", "vllm.nowhere:X", "vllm.distributed:gone"):
        with pytest.raises(LookupError):
            sources.lookup(target)


def test_the_start_up_rules_read_the_same_from_sources(tmp_path):
    sources = _tree(tmp_path, MADE_UP)
    assert hook_problem(Hook("registry:MovedArch.__init__", ("vllm_config", "prefix"), exact=True,
                             reads=("visual_dim",)), sources.lookup) is None
    assert hook_problem(Hook("registry:MovedArch.embed", ("pixels", "mask")), sources.lookup) == (
        "registry:MovedArch.embed takes (pixels, **kwargs), the plugin expects (pixels, mask)")
    assert hook_problem(Hook("registry:OldArch.embed", reads=("flag_read", "flag_gone")), sources.lookup) == (
        "registry:OldArch.embed no longer uses flag_gone")
    # a group tied to a module binds only where the release has it; a group without one always
    runner = HookGroup("a runner", (Hook("vllm.v1.runner:Runner.step"),), where="vllm.v1.runner")
    always = HookGroup("always", (Hook("vllm.v1.other:Runner.step"),))
    assert problems([runner, always], sources.lookup, sources.has_module) == [
        "vllm.v1.other:Runner.step is missing (always)"]


def test_each_desap_class_subclasses_the_registry_class_of_its_own_architecture():
    """The rule that keeps DeSAP on the code vLLM runs without it: every DeSAP class's vLLM base
    is ``registered_class(its architecture)`` and its processor is registered for the same one."""
    seen = set()
    for path in sorted(PLUGIN.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.ClassDef) and node.name.startswith("Desap")
                    and node.name.endswith("ForConditionalGeneration")):
                continue
            architecture = node.name.removeprefix("Desap")
            calls = [b for b in node.bases if isinstance(b, ast.Call) and getattr(b.func, "id", "") == "registered_class"]
            assert [ast.literal_eval(c.args[0]) for c in calls] == [architecture], (path.name, node.name)
            decorators = [d for d in node.decorator_list if getattr(d.func, "id", "") == "registered_with"]
            assert [ast.literal_eval(d.args[1]) for d in decorators] == [architecture], (path.name, node.name)
            seen.add(architecture)
    assert seen == set(SUPPORTED) == set(hooks.PROCESSORS)


@pytest.mark.slow
@pytest.mark.parametrize("version", SUPPORTED_VLLM)
def test_every_supported_release_holds_every_rule(version):
    """Downloads the release's wheel once (``pip download --no-deps``) and reads its sources."""
    assert check_release(release_sources(version)) == []


@pytest.mark.slow
def test_vllm_0_34_without_v1_and_with_qwen3_5_moved(capsys):
    """What 0.34 changed, seen by the check: the V1 runner's hooks are gone (so binding them
    unconditionally, as the plugin did up to 0.32, is refused), and the registry resolves Qwen3.5
    to the new ``vllm.models.qwen3_5`` (its CUDA classes), which the hooks are checked on."""
    sources = ReleaseSources(release_sources("0.34.0"))
    forced = HookGroup(V1_RUNNER.serves, V1_RUNNER.hooks)
    assert problems([forced], sources.lookup, sources.has_module) == [
        f"{hook.target} is missing ({V1_RUNNER.serves})" for hook in V1_RUNNER.hooks]
    assert problems([V1_RUNNER], sources.lookup, sources.has_module) == []
    for architecture in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        assert sources.registered_class(architecture).module == "vllm.models.qwen3_5.nvidia.model"
    older = ReleaseSources(release_sources("0.32.0"))   # still has V1, and no V2 runner of its own on the CPU
    assert V1_RUNNER in required(GROUPS, older.has_module) and V2_CPU_RUNNER not in required(GROUPS, older.has_module)
    assert V2_CPU_RUNNER in required(GROUPS, sources.has_module)
    assert main(["0.34.0"]) == 0 and "vLLM 0.34.0: every hook holds" in capsys.readouterr().out
