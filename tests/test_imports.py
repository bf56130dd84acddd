"""Imports run one way (README, "Layout"), read from the source, function bodies included:
app (cli -> benchmarks -> testing) -> integrations -> methods -> operator -> kernels.

The operator's layers, lowest first: the reference defines the contract's steps; validation checks
inputs against them; the kernels import nothing of the operator (the operator hands them what they
need, such as the auto split's constants); the received-attention op over them; then the Triton path, the registered ops,
PruneFunction, the entry point, and the pruning methods over it. A module may import only from
layers below its own (the files of the kernels and of the methods from each other too). The
package's ``__init__`` may import the integrations on first use only, inside a function, so that
importing the operator never imports them.
"""
from pathlib import Path

import pytest

from import_graph import REPO, desap_parts

PACKAGE = REPO / "desap_ops"
LAYERS = ["reference", "validation", "kernels", "received", "triton_backend", "ops", "function", "api", "methods"]
FOLDERS = ("kernels", "methods")   # layers that are folders: their files may import each other
FILES = {f"desap_ops/{name}.py": name for name in LAYERS if name not in FOLDERS}
FILES.update({f"desap_ops/{folder}/{path.name}": folder for folder in FOLDERS
              for path in (PACKAGE / folder).glob("*.py")})
# above the operator and the methods, lowest first: each may import what lies below it
ABOVE = ["integrations", "testing", "benchmarks", "cli"]


def _files(part: str) -> list[Path]:
    return sorted((PACKAGE / part).rglob("*.py"))


@pytest.mark.parametrize("relative", sorted(FILES))
def test_each_operator_module_imports_only_layers_below_it(relative):
    layer = FILES[relative]
    below = set(LAYERS[:LAYERS.index(layer)]) | ({layer} if layer in FOLDERS else set())
    imported = desap_parts(REPO / relative)
    assert imported <= below, f"{relative} imports {sorted(imported - below)}, not below {layer}"


@pytest.mark.parametrize("part", ABOVE)
def test_nothing_imports_a_part_above_its_own(part):
    above = set(ABOVE[ABOVE.index(part) + 1:])
    assert _files(part)
    for path in _files(part):
        wrong = desap_parts(path) & above
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}, above {part}"


def test_no_benchmark_imports_the_command_line():
    """The command line sits above the benchmarks: the argument checks both use live in
    desap_ops.benchmarks.arguments, so that no benchmark needs desap_ops.cli."""
    importers = [path.relative_to(REPO) for path in _files("benchmarks") if "cli" in desap_parts(path)]
    assert not importers


def test_the_package_imports_the_integrations_only_on_first_use():
    """``desap_ops.apply_desap`` comes from the integrations, imported inside a function: at import
    time the package imports only the operator's layers."""
    init = PACKAGE / "__init__.py"
    assert desap_parts(init, top_level=True) <= set(LAYERS)
    assert desap_parts(init) - set(LAYERS) == {"integrations"}


def test_a_package_of_methods_needs_only_the_public_methods_module():
    """tests/method_plugin, written as a user would write one: it imports desap_ops.methods alone."""
    plugin = REPO / "tests" / "method_plugin" / "desap_method_plugin" / "__init__.py"
    assert desap_parts(plugin) == {"methods"}
