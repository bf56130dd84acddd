"""The ``desap`` command line (also ``python -m desap_ops``).

    desap demo [--image PATH] [--prompt TEXT] [--keep K] [--task-ratio R|auto] [--model DIR]
               [--query-box x0,y0,x1,y1] [--methods desap,saliency,divprune] [--out kept.png]
    desap bench op [--device cpu|cuda] [--dtype bf16] [--tiny | --shapes a,b] [--no-compile]
                   [--rounds R] [--out op.json] [--plot op.png]
    desap bench e2e [--model NAME] [--keep 576,192,128,64] [--device cpu|cuda|meta] [--dtype bf16]
                    [--batch B] [--repeats N] [--methods desap,first,divprune] [--out e2e.json]
                    [--plot e2e.png]
    desap bench vllm [--model NAME] [--keep full,192,128,64] [--requests 16]
                     [--max-tokens 16] [--repeats 3] [--dtype bf16] [--task-ratio R|auto]
                     [--out vllm.json] [--plot vllm.png]
    desap bench serve [--model NAME] [--keep 192,128,64] [--methods desap,saliency] [--no-ideal]
                      [--concurrency 1,4,16,64]
                      [--prompts 4x] [--input-len 32] [--max-tokens 32] [--warmups 2] [--dtype bf16]
                      [--task-ratio R|auto] [--out serve.json] [--plot serve.png]

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
