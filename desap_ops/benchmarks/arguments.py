"""The one home of the command line's argument checks, which ``desap_ops.cli`` and every benchmark
import (the commands sit above the benchmarks, so neither imports back up): :class:`UsageError`,
the one error for a mistake the person running ``desap`` can fix, and the checks of the options
more than one command takes: a file it will write (``--out``, ``--plot``, the demo's picture),
``--task-ratio``, ``--methods``, ``--keep``, ``--device`` and the counts that must be at least 1.
It imports nothing of the app and no torch at import time (``--help`` stays light)."""
from __future__ import annotations

import importlib.util
import math
import os
import re
from typing import Optional, Union

from desap_ops.validation import AUTO

# what installs the packages the demo and the plots import (setup.py's `demo` extra)
INSTALL_DEMO = 'pip install "desap-ops[demo]"'


class UsageError(Exception):
    """A fixable mistake (a missing file, a keep too large, --device cuda without a GPU):
    :func:`desap_ops.cli.main.main` prints it on one line and returns 2."""


# --- files a command writes --------------------------------------------------------------------------

def check_writable(option: str, path: str, name_hint: str) -> None:
    """Refuse a file that could not be written after all the work: ``path`` is a folder (the
    message says "give a file name " + ``name_hint``), or its folder is missing or read-only."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name {name_hint}")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: cannot write in {folder}")


def check_file(option: str, path: Optional[str], extension: str) -> None:
    """Refuse a file that could not be written after all the work: a folder, a missing or read-only
    folder, another extension than ``extension``."""
    if not path:
        return
    check_writable(option, path, f"ending in {extension}")
    if not path.lower().endswith(extension):
        raise UsageError(f"{option} {path}: the file name must end in {extension}")


def check_outputs(out: Optional[str], plot: Optional[str]) -> None:
    """``--out`` a writable .json file, ``--plot`` a writable .png file and matplotlib importable."""
    check_file("--out", out, ".json")
    check_file("--plot", plot, ".png")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--plot {plot} needs matplotlib, which is not importable here: {INSTALL_DEMO}")


# --- options -----------------------------------------------------------------------------------------

def parse_task_ratio(value: Union[float, str]) -> Union[float, str]:
    """``--task-ratio``: a share in [0, 1] or "auto", from the command line's text (or a number)."""
    given = value
    if isinstance(value, str):
        if value == AUTO:
            return AUTO
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"--task-ratio must be a number in [0, 1] or auto, got {value!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise UsageError(f"--task-ratio must lie in [0, 1], got {given}")
    return value


def parse_methods(text: str) -> list[str]:
    """``--methods`` ("desap,first,divprune"): registered pruning methods (``desap_ops.methods``), in
    the order given without repeats. An unknown name is refused in one line naming it and the
    registered ones."""
    from desap_ops.methods import available_methods   # here: --help imports no torch

    names = [part.strip() for part in text.split(",")]
    known = available_methods()
    for name in names:
        if name not in known:
            raise UsageError(f"--methods: {name!r} is not a registered pruning method; registered: {', '.join(known)}")
    return list(dict.fromkeys(names))


def check_at_least_one(**values: int) -> None:
    """``check_at_least_one(requests=0)``: UsageError "--requests must be at least 1, got 0"."""
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def parse_budgets(text: Optional[str], full: bool = False) -> Optional[list[int]]:
    """The budgets of ``--keep`` ("192,128,64"; with ``full`` the word ``full`` may stand among them
    and is left out: ``--keep full`` is no budget, []), each at least 1, in the order given without
    repeats; None without text (the bench's defaults). The upper bound needs the model:
    :func:`check_budgets`."""
    if not text:
        return None
    parts = [part.strip() for part in text.split(",")]
    numbers = [part for part in parts if not (full and part == "full")]
    if not all(re.fullmatch(r"-?\d+", part) for part in numbers):
        raise UsageError(f"--keep must be {'full or ' if full else ''}comma-separated integers, got {text}")
    keeps: list[int] = []
    for keep in map(int, numbers):
        if keep < 1:
            raise UsageError(f"--keep values must be at least 1, got {keep}")
        if keep not in keeps:
            keeps.append(keep)
    return keeps


def check_budgets(keeps: list[int], tokens: int, model: str) -> None:
    """Every budget within the model's image tokens."""
    for keep in keeps:
        if not 1 <= keep <= tokens:
            raise UsageError(f"--keep values must lie in [1, {tokens}] (the image tokens of {model}), got {keep}")


def check_device(name: str) -> str:
    """``--device``: cpu, meta or cuda with a GPU visible; UsageError otherwise."""
    import torch   # here: --help imports no torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} needs a CUDA GPU and none is visible; use --device cpu")
    if name not in ("cpu", "meta") and not name.startswith("cuda"):
        raise UsageError(f"--device must be cpu, meta or cuda, got {name}")
    return name
