"""The test plugin's entry points (tests/method_plugin) made visible without installing anything:
a ``<name>.dist-info`` folder written on ``sys.path`` is what ``pip install`` leaves, and
``importlib.metadata`` finds its ``entry_points.txt`` as it finds an installed package's. A fresh
registry then loads them as a fresh process would, and everything is restored afterwards."""
from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from desap_ops.methods import ENTRY_POINT_GROUP, MethodRegistry, registry

PLUGIN_ROOT = Path(__file__).resolve().parents[1] / "method_plugin"
PLUGIN_POINTS = {"largest-norm": "desap_method_plugin:LARGEST_NORM",
                 "broken-order": "desap_method_plugin:BROKEN_ORDER"}   # as its pyproject.toml names them


def write_dist_info(root: Path, points: Mapping[str, str], name: str = "desap_method_plugin_test") -> Path:
    """A distribution ``name`` under ``root`` whose ``desap_ops.methods`` entry points are ``points``."""
    info = root / f"{name}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{point} = {target}" for point, target in points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info


@contextmanager
def entry_points_on_path(root: Path, points: Mapping[str, str] = PLUGIN_POINTS) -> Iterator[MethodRegistry]:
    """Within the block, ``points`` are entry points of an installed package, and a fresh
    :class:`MethodRegistry` (built-ins, then the entry points, on its first lookup) is the process's
    default, which the engines use; the block gets it. Afterwards the default registry,
    ``sys.path`` and ``sys.modules`` are as they were."""
    write_dist_info(root, points)
    saved_registry, saved_path = registry.DEFAULT_REGISTRY, list(sys.path)
    had_plugin = "desap_method_plugin" in sys.modules
    sys.path[:0] = [str(root), str(PLUGIN_ROOT)]
    importlib.invalidate_caches()
    registry.DEFAULT_REGISTRY = fresh = MethodRegistry()
    try:
        yield fresh
    finally:
        registry.DEFAULT_REGISTRY = saved_registry
        sys.path[:] = saved_path
        if not had_plugin:
            sys.modules.pop("desap_method_plugin", None)
        importlib.invalidate_caches()
