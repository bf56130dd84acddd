"""The operator's imports run one way (README, "Layout"), read from the source, function bodies included.

Layers, lowest first: the reference defines the contract's steps; validation checks inputs against
them; the kernels import nothing of the operator (the operator hands them what they need, such as
the auto split's constants); then the Triton path, the registered ops, PruneFunction, the entry
point, and the pruning methods over it. A module may import only from layers below its own (the
files of the kernels and of the methods from each other too).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["reference", "validation", "kernels", "triton_backend", "ops", "function", "api", "methods"]
PACKAGES = ("kernels", "methods")   # layers that are folders: their files may import each other
FILES = {f"desap_ops/{name}.py": name for name in LAYERS if name not in PACKAGES}
FILES.update({f"kernels/{path.name}": "kernels" for path in (ROOT / "kernels").glob("*.py")})
FILES.update({f"desap_ops/methods/{path.name}": "methods" for path in (ROOT / "desap_ops" / "methods").glob("*.py")})


def _imported(path: Path) -> set:
    """The layers of desap_ops (or 'integrations', 'cli', ...) that a file imports, anywhere in it."""
    package = ["desap_ops", path.parent.name] if path.parent.name in PACKAGES else ["desap_ops"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            parts = base + (node.module.split(".") if node.module else [])
            names = [parts + [alias.name] for alias in node.names] if parts == ["desap_ops"] else [parts]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        else:
            continue
        found |= {name[1] for name in names if name[0] == "desap_ops" and len(name) > 1}
    return found


@pytest.mark.parametrize("relative", sorted(FILES))
def test_each_operator_module_imports_only_layers_below_it(relative):
    layer = FILES[relative]
    below = set(LAYERS[:LAYERS.index(layer)]) | ({layer} if layer in PACKAGES else set())
    imported = _imported(ROOT / relative)
    assert imported <= below, f"{relative} imports {sorted(imported - below)}, not below {layer}"


def test_the_package_reexports_the_integrations_as_its_one_exception():
    imported = _imported(ROOT / "desap_ops" / "__init__.py")
    assert imported - set(LAYERS) == {"integrations"}
    assert "one exception" in (ROOT / "desap_ops" / "__init__.py").read_text()


def test_a_package_of_methods_needs_only_the_public_methods_module():
    """tests/method_plugin, written as a user would write one: it imports desap_ops.methods alone."""
    plugin = ROOT / "tests" / "method_plugin" / "desap_method_plugin" / "__init__.py"
    assert _imported(plugin) == {"methods"}
