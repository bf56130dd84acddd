"""The ``desap`` command line (also ``python -m desap_ops``). Each command's usage is what its
``--help`` prints; the README's "Command line" holds the same lines (tests/test_readme_synopsis.py).

Each command is a module with ``add_parser(commands)`` and ``run(args) -> int``, wired by
:data:`COMMANDS`. Mistakes a person can fix (a missing file, a keep too large, --device cuda
without a GPU) print one line ``desap: error: ...`` and return 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import bench, demo
from desap_ops.benchmarks.arguments import UsageError

COMMANDS = {"demo": demo, "bench": bench}   # the command's name -> its module


def parser() -> argparse.ArgumentParser:
    """The ``desap`` argument parser: every command of :data:`COMMANDS` with its options."""
    top = argparse.ArgumentParser(prog="desap", description="DeSAP visual-token pruning: demo and benchmarks")
    commands = top.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(commands)
    return top


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``desap`` with ``argv`` (default: the process's arguments); 0 on success, 2 on a fixable mistake."""
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as err:
        print(f"desap: error: {err}", file=sys.stderr)
        return 2
