"""The one error every command raises for a mistake the person running ``desap`` can fix, and the
checks of arguments more than one command takes: a file it will write, ``--task-ratio``,
``--methods``."""
from __future__ import annotations

import math
import os
from typing import Union

from desap_ops.validation import AUTO


class UsageError(Exception):
    """A fixable mistake (a missing file, a keep too large, --device cuda without a GPU):
    :func:`desap_ops.cli.main.main` prints it on one line and returns 2."""


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
