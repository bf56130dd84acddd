"""Which transformers releases ``apply_desap`` is tested with, and the start-up check of every
model internal a patch hooks.

A patch reaches into a model's internals (``get_image_features``, ``get_rope_index``, generate's
position preparation, ...), and any release may move them. Before patching, ``apply_desap`` checks
that the installed transformers is not older than the oldest tested release, and that every name
the family's patch uses exists with the parameters it passes. A mismatch is one ``RuntimeError``
naming the tested range, instead of an ``AttributeError`` from deep inside a patched call. A
release newer than the newest tested one gets a warning (once), then the same check.
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Sequence

from packaging.version import Version
from torch import nn

from ..common.hooked import Hook

# The range CI runs the integration tests against (.ci/run): the oldest release below is
# reinstalled and tested on every change; the newest is whatever the registry serves that day.
OLDEST_TESTED = "5.16.1"
NEWEST_TESTED = "5.25.0"
TESTED = f"transformers {OLDEST_TESTED} to {NEWEST_TESTED}"

_warned: set[str] = set()


def transformers_version() -> str:
    try:
        return version("transformers")
    except PackageNotFoundError:   # a source checkout without metadata
        import transformers

        return transformers.__version__


def check_version(installed: str | None = None) -> None:
    """Refuse a transformers older than the oldest tested release; warn once about a newer one."""
    installed = installed or transformers_version()
    if Version(installed) < Version(OLDEST_TESTED):
        raise RuntimeError(f"apply_desap needs transformers >= {OLDEST_TESTED}: found {installed}. desap-ops is "
                           f"tested with {TESTED} (pip install 'transformers>={OLDEST_TESTED}')")
    if Version(installed).release > Version(NEWEST_TESTED).release and installed not in _warned:
        _warned.add(installed)
        warnings.warn(f"transformers {installed} is newer than the releases desap-ops is tested with ({TESTED}); "
                      "the model internals apply_desap hooks were found, but check its output", stacklevel=3)


def _resolve(model: nn.Module, path: str):
    head, *rest = path.split(".")
    if head == "transformers":   # the longest importable module, then attributes
        for cut in range(len(path.split(".")), 0, -1):
            name = ".".join(path.split(".")[:cut])
            try:
                target = importlib.import_module(name)
            except ImportError:
                continue
            for attribute in path.split(".")[cut:]:
                target = getattr(target, attribute)
            return target
        raise AttributeError(path)
    target = model
    for attribute in rest:
        target = getattr(target, attribute)
    return target


def _accepts(function, parameters: Sequence[str]) -> list[str]:
    """The names in ``parameters`` that ``function`` has no parameter for."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []   # a builtin without a signature: nothing to compare
    names = signature.parameters
    return [p for p in parameters if p not in names]


def check_hooks(model: nn.Module, hooks: Sequence[Hook]) -> None:
    """Raise one RuntimeError listing every hook of ``hooks`` (``common.hooked.Hook``: a dotted
    path, and the parameters the patch passes by name, or None where it passes none or does not
    call it) that is missing from ``model`` (or from transformers) or that lacks one of its ``params``."""
    problems = []
    for hook in hooks:
        try:
            target = _resolve(model, hook.target)
        except AttributeError:
            problems.append(f"{hook.target} is missing")
            continue
        missing = [] if hook.params is None else _accepts(target, hook.params)
        if missing:
            problems.append(f"{hook.target} takes no {', '.join(missing)}")
    if problems:
        raise RuntimeError(f"apply_desap cannot patch {type(model).__name__} under transformers "
                           f"{transformers_version()}: {'; '.join(problems)}. desap-ops is tested with {TESTED}")
