"""The repository root is where users run ``python -m pytest`` and ``python -m desap_ops``, and Python
puts it first on ``sys.path`` there. Nothing in it may shadow an installed package: transformers
5.25 imports Hugging Face's ``kernels`` at start-up, and our top-level ``kernels/`` folder once
answered instead."""
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run from the root with the root first on sys.path, as ``python -c`` puts it: where each top-level
# name of every installed distribution resolves, without importing any of them.
_WHERE = """
import importlib.metadata, importlib.util, json, sys
where = {}
for name, dists in importlib.metadata.packages_distributions().items():
    if not name.isidentifier() or "desap-ops" in dists:
        continue
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        continue
    if spec is not None:
        where[name] = [spec.origin or ""] + list(spec.submodule_search_locations or [])
json.dump(where, sys.stdout)
"""


def _where(cwd: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", _WHERE], cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def test_no_installed_package_resolves_differently_from_the_repository_root(tmp_path):
    """Each installed top-level name resolves from the root exactly as from an empty folder."""
    elsewhere, here = _where(tmp_path), _where(ROOT)
    assert len(elsewhere) > 20, "few installed distributions were found: the check would pass vacuously"
    shadowed = {name: here.get(name) for name, found in elsewhere.items() if here.get(name) != found}
    assert not shadowed, f"from the repository root these installed packages resolve into it: {shadowed}"


def test_hugging_face_kernels_is_what_the_root_imports():
    """The one that broke (transformers >= 5.25 requires ``kernels``): imported from the root, it
    is the installed distribution's, and our kernels are still ``desap_ops.kernels``."""
    files = importlib.metadata.distribution("kernels").files or []
    assert any(str(f).startswith("kernels/") for f in files), "Hugging Face's kernels ships no kernels/ package"
    run = subprocess.run([sys.executable, "-c", "import kernels, desap_ops.kernels.selection as s; "
                          "print(kernels.__file__); print(s.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    theirs, ours = (Path(line).resolve() for line in run.stdout.split())
    assert "site-packages" in theirs.parts and theirs.parent.name == "kernels", theirs
    assert (ours.parent.name, ours.name) == ("kernels", "selection.py"), ours
