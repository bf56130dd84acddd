"""Packaging: a plain install (setup.py's ``install_requires``) is what the operator, ``apply_desap``
and the vLLM plugin need, and no more; the demo's and the plots' packages come with the ``demo``
extra, which a serving image does without."""
import ast
import importlib.metadata
import json
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from desap_ops.cli import demo

ROOT = Path(__file__).resolve().parents[1]
# the command line and the benchmarks may import the demo extra's packages (lazily); the rest of the
# package (the operator, the methods, the integrations, desap_ops.testing) and the kernels may not
APP_FOLDERS = ("desap_ops/cli/", "desap_ops/benchmarks/")
ENGINE = "vllm"   # the vLLM plugin runs inside vLLM: an import of it, never a requirement


@pytest.fixture(scope="module")
def setup_arguments() -> dict:
    """The keyword arguments setup.py hands setuptools.setup, read by running it."""
    with mock.patch.object(setuptools, "setup") as setup, pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)   # setup.py reads README.md and compat.py relative to the root
        runpy.run_path(str(ROOT / "setup.py"))
    return setup.call_args.kwargs


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(text).name) for text in requirements}


def _distributions(module: str) -> set[str]:
    """The installed distributions that provide the top-level ``module``."""
    return {canonicalize_name(name) for name in importlib.metadata.packages_distributions().get(module, [])}


def _third_party_imports(app: bool) -> dict[str, set[str]]:
    """{top-level module: files importing it} over the app's files (``app``) or the core's, function
    bodies included (lazy imports count: they run when the function does)."""
    files = {path.resolve(): path for path in [*(ROOT / "desap_ops").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]}
    found: dict[str, set[str]] = {}
    for path in files.values():
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(APP_FOLDERS) != app:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ("desap_ops", "__future__"):
                    found.setdefault(top, set()).add(relative)
    return found


def test_core_code_imports_only_what_a_plain_install_brings(setup_arguments):
    required = _names(setup_arguments["install_requires"])
    for module, files in sorted(_third_party_imports(app=False).items()):
        if module != ENGINE:
            assert _distributions(module) & required, f"{module} (imported by {sorted(files)}) is not in install_requires"


def test_every_core_requirement_is_imported_by_core_code(setup_arguments):
    """A requirement no core file imports (matplotlib back in install_requires, say) makes every
    serving image pay for it."""
    provided = set().union(*(_distributions(module) for module in _third_party_imports(app=False)))
    unused = _names(setup_arguments["install_requires"]) - provided
    assert not unused, f"install_requires holds {sorted(unused)}, which no core module imports"


def test_the_command_line_needs_only_the_demo_extra_beyond_a_plain_install(setup_arguments):
    demo_extra = _names(setup_arguments["extras_require"]["demo"])
    allowed = _names(setup_arguments["install_requires"]) | demo_extra
    for module, files in sorted(_third_party_imports(app=True).items()):
        if module != ENGINE:
            assert _distributions(module) & allowed, f"{module} (imported by {sorted(files)}) is in no requirement"
    # what `desap demo` refuses to start without is that extra, module by module
    assert {canonicalize_name(name) for name in demo.DEMO_PACKAGES.values()} == demo_extra
    for module, distribution in demo.DEMO_PACKAGES.items():
        assert canonicalize_name(distribution) in _distributions(module)
    assert demo_extra <= _names(setup_arguments["extras_require"]["test"]), "the tests draw pictures and plots"


def test_setup_installs_every_package_of_desap_ops(setup_arguments):
    folders = {path.parent for path in (ROOT / "desap_ops").rglob("*.py")} | {ROOT / "desap_ops" / "kernels"}
    packages = {".".join(folder.relative_to(ROOT).parts) for folder in folders if "__pycache__" not in folder.parts}
    assert set(setup_arguments["packages"]) == packages


# Run in a fresh interpreter after BLOCK, which makes the modules given as JSON in sys.argv[1]
# unimportable, as in a serving image without the demo extra. CORE: the operator's op, apply_desap
# on a tiny LLaVA, and every module of the vLLM plugin that loads without vLLM itself; prints what
# it found as JSON.
BLOCK = textwrap.dedent("""
    import importlib, json, pkgutil, sys

    # None in sys.modules: `import PIL` raises ModuleNotFoundError and importlib.util.find_spec("PIL")
    # answers None, as where the package is not installed (torch and transformers probe with find_spec)
    BLOCKED = set(json.loads(sys.argv[1]))
    sys.modules.update(dict.fromkeys(BLOCKED))
""")
CORE = textwrap.dedent("""
    import torch
    import desap_ops
    from desap_ops.integrations import apply_desap, last_prune
    from desap_ops.testing.tiny import BOS, IMAGE_TOKEN_ID, tiny_llava

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"   # without a GPU the Triton kernels run interpreted
    hidden, attn, text = torch.randn(1, 16, 8), torch.randn(1, 16, 6), torch.randn(1, 3, 6)
    inputs = [x.to(device) for x in (hidden, attn, text, torch.rand(1, 16))]
    for backend in ("reference", "triton"):
        assert desap_ops.prune(*inputs, 4, backend=backend).indices.shape == (1, 4)
    assert torch.ops.desap.prune.default is not None
    model = apply_desap(tiny_llava(), keep=4)
    with torch.no_grad():
        model(input_ids=torch.tensor([[BOS] + [IMAGE_TOKEN_ID] * 16 + [5, 6]]), pixel_values=torch.randn(1, 3, 56, 56))

    import desap_ops.integrations.vllm as plugin
    modules, need_vllm = list(pkgutil.iter_modules(plugin.__path__, plugin.__name__ + ".")), []
    for info in modules:
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as err:   # a model class built on vLLM's own: only inside vLLM
            if (err.name or "").partition(".")[0] != "vllm":
                raise
            need_vllm.append(info.name)
    print(json.dumps({"blocked_loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED
                                               and sys.modules[m] is not None),
                      "pruned": last_prune(model) is not None,
                      "plugin_modules": len(modules), "need_vllm": len(need_vllm)}))
""")


def _run_without_demo_packages(setup_arguments, code: str) -> subprocess.CompletedProcess:
    modules = set()
    for distribution in _names(setup_arguments["extras_require"]["demo"]):
        modules |= {m for m, owners in importlib.metadata.packages_distributions().items()
                    if distribution in {canonicalize_name(o) for o in owners}}
    assert {"PIL", "skimage", "onnx", "matplotlib"} <= modules
    return subprocess.run([sys.executable, "-c", BLOCK + code, json.dumps(sorted(modules))],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_the_operator_and_both_engines_need_none_of_the_demo_packages(setup_arguments):
    run = _run_without_demo_packages(setup_arguments, CORE)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert found["blocked_loaded"] == [] and found["pruned"]
    assert found["need_vllm"] < found["plugin_modules"], "the plugin's own modules load without vLLM"


def test_the_check_fails_when_code_imports_a_demo_package(setup_arguments):
    """What the test above guards against: a core module that imports matplotlib stops the import."""
    run = _run_without_demo_packages(setup_arguments, "import desap_ops.cli.demo_draw as d; d._pyplot()\n")
    assert run.returncode != 0, run.stdout
    error = run.stderr.splitlines()[-1]
    assert error.startswith("ModuleNotFoundError") and "matplotlib" in error, run.stderr[-3000:]
