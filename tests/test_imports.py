"""The operator's imports run one way (README, "Layout"), read from the source, function bodies included.

Layers, lowest first: the reference defines the contract's steps; validation checks inputs against
them; the kernels import nothing of the operator (the operator hands them what they need, such as
the auto split's constants); then the Triton path, the registered ops, PruneFunction, the entry
point. A module may import only from layers below its own (the kernels from each other too).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["reference", "validation", "kernels", "triton_backend", "ops", "function", "api"]
FILES = {f"desap_ops/{name}.py": name for name in LAYERS if name != "kernels"}
FILES.update({f"kernels/{path.name}": "kernels" for path in (ROOT / "kernels").glob("*.py")})


def _imported(path: Path) -> set:
    """The layers of desap_ops (or 'integrations', 'cli', ...) that a file imports, anywhere in it."""
    package = ["desap_ops", "kernels"] if path.parent.name == "kernels" else ["desap_ops"]
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
    below = set(LAYERS[:LAYERS.index(layer)]) | ({"kernels"} if layer == "kernels" else set())
    imported = _imported(ROOT / relative)
    assert imported <= below, f"{relative} imports {sorted(imported - below)}, not below {layer}"


def test_the_package_reexports_the_integrations_as_its_one_exception():
    imported = _imported(ROOT / "desap_ops" / "__init__.py")
    assert imported - set(LAYERS) == {"integrations"}
    assert "one exception" in (ROOT / "desap_ops" / "__init__.py").read_text()
