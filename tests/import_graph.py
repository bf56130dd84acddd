"""What a source file imports, read from its text, for the tests of the one-way layering
(tests/test_imports.py, tests/integrations/common/test_tiers.py): every import statement, inside
functions too unless asked for the module's top level alone, as absolute module names."""
from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    """``desap_ops/benchmarks/e2e.py`` -> ``desap_ops.benchmarks.e2e``; a package's ``__init__.py``
    -> the package. Read from the path as given under the repository, links kept (the kernels are
    ``desap_ops/kernels``, a link to ``kernels/``)."""
    parts = list(Path(os.path.relpath(Path(path).absolute(), REPO)).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_nodes(tree: ast.AST, top_level: bool) -> Iterator[ast.AST]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not (top_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            yield from _import_nodes(node, top_level)


def imported_modules(path: Path, top_level: bool = False) -> set[str]:
    """Every module ``path`` imports, as absolute names: ``import a.b`` gives ``a.b``, ``from a
    import b`` gives ``a`` and ``a.b`` (``b`` may be a module of ``a`` or a name in it), a relative
    import is resolved against the file's package. ``top_level``: leave out the imports inside
    functions (those run on first use, not on import)."""
    module = module_name(path)
    package = module if Path(path).name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(Path(path).read_text()), top_level):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def desap_parts(path: Path, top_level: bool = False) -> set[str]:
    """The parts of ``desap_ops`` (``ops``, ``methods``, ``integrations``, ``cli``, ...) ``path`` imports."""
    return {name.split(".")[1] for name in imported_modules(path, top_level)
            if name.startswith("desap_ops.") and len(name.split(".")) > 1}
