"""Imports run one way through ``desap_ops.integrations``: ``common`` imports neither engine's tier,
``vllm`` never imports ``hf``, ``hf`` never imports ``vllm``, and inside ``hf`` the registry ->
family patchers -> shared modules. Read from the sources, every import (inside functions too)."""
import subprocess
import sys
from pathlib import Path

import pytest

import desap_ops.integrations
from import_graph import imported_modules

ROOT = Path(desap_ops.integrations.__file__).parent
PACKAGE = "desap_ops.integrations"
# the family patchers of the transformers tier; the Qwen families stand on their base, hf.qwen
PATCHERS = {"llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "video"}


def _tier(name: str) -> str:
    rest = name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else ""
    return rest.split(".")[0]


def _modules(tier: str) -> list[Path]:
    return sorted((ROOT / tier).glob("*.py"))


@pytest.mark.parametrize("tier, forbidden", [("common", {"hf", "vllm"}), ("vllm", {"hf"}), ("hf", {"vllm"})])
def test_a_tier_imports_no_tier_it_must_not(tier, forbidden):
    for path in _modules(tier):
        wrong = sorted(name for name in imported_modules(path) if _tier(name) in forbidden)
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"
    if tier == "common":   # and no engine either
        for path in _modules(tier):
            assert not {name.split(".")[0] for name in imported_modules(path)} & {"vllm"}, path


def test_in_the_transformers_tier_the_registry_imports_the_patchers_and_nothing_imports_back():
    for path in _modules("hf"):
        imported = {name.split(".")[3] for name in imported_modules(path)
                    if name.startswith(PACKAGE + ".hf.") and len(name.split(".")) > 3}
        if path.stem == "registry":
            assert PATCHERS <= imported
        elif path.stem in PATCHERS:
            allowed = {"qwen"} if path.stem.startswith("qwen") else set()
            assert not imported & (PATCHERS | {"registry"}) - allowed - {path.stem}, path.name
            assert imported & {"qwen", "serving"}, path.name   # a patcher stands on the shared machinery
        else:
            assert not imported & (PATCHERS | {"registry"}), f"the shared module {path.name} imports {imported}"


def test_importing_the_common_tier_and_the_plugins_pure_modules_loads_no_transformers_tier():
    code = ("import sys\n"
            "import desap_ops.integrations.common.pruning, desap_ops.integrations.common.layout\n"
            "import desap_ops.integrations.common.chat, desap_ops.integrations.common.prompt\n"
            "import desap_ops.integrations.vllm.options, desap_ops.integrations.vllm.processor\n"
            "import desap_ops.integrations.vllm.mrope, desap_ops.integrations.vllm.tower\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('desap_ops.integrations.hf'))\n"
            "assert not loaded, loaded\n"
            "from desap_ops.integrations import apply_desap\n"
            "assert 'desap_ops.integrations.hf.registry' in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT.parent.parent)
    assert run.returncode == 0, run.stderr
