"""The one error every app module raises for a mistake the person running ``desap`` can fix, and
the check every command makes of a file it will write."""
from __future__ import annotations


class UsageError(Exception):
    """A fixable mistake (a missing file, a keep too large, --device cuda without a GPU):
    :func:`desap_ops.cli.main.main` prints it on one line and returns 2."""


def check_writable(option: str, path: str, name_hint: str) -> None:
    """Refuse a file that could not be written after all the work: ``path`` is a folder (the
    message says "give a file name " + ``name_hint``), or its folder is missing or read-only."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name {name_hint}")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: cannot write in {folder}")
