"""The one error every app module raises for a mistake the person running ``desap`` can fix."""
from __future__ import annotations


class UsageError(Exception):
    """A fixable mistake (a missing file, a keep too large, --device cuda without a GPU):
    :func:`desap_ops.cli.main.main` prints it on one line and returns 2."""
