"""``desap bench op | e2e | vllm | serve``: the options of each benchmark, and each run by the one
skeleton of :mod:`desap_ops.benchmarks.skeleton` (check, plan, run, table, JSON, plot). The
benchmark modules are imported when one runs, so that ``--help`` imports no model code."""
from __future__ import annotations

import argparse
import importlib
import sys

from desap_ops.benchmarks.machine import DTYPES
from desap_ops.benchmarks.vllm import settings as vllm_settings
from desap_ops.testing.models import MODELS
from desap_ops.testing.vllm_models import MODELS as VLLM_MODELS

METHODS_EXAMPLE = "desap,first,random,saliency,similarity,divprune"   # the built-ins
# bench -> the module that runs it
BENCHES = {"op": "desap_ops.benchmarks.op", "e2e": "desap_ops.benchmarks.e2e",
           "vllm": "desap_ops.benchmarks.vllm.offline", "serve": "desap_ops.benchmarks.vllm.serve"}


def progress(message: str) -> None:
    """A benchmark's progress line, on stderr so that the table alone goes to stdout."""
    print(f"... {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from desap_ops.benchmarks.skeleton import execute

    return execute(importlib.import_module(BENCHES[args.bench]), args, progress)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``desap bench`` and its four benchmarks with their options."""
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)

    op = bench.add_parser("op", help="operator microbenchmarks")
    op.add_argument("--device", help="cpu or cuda (default: cuda if a GPU is visible, else cpu)")
    op.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="input dtype (default bf16)")
    op.add_argument("--tiny", action="store_true", help="one tiny shape (a smoke test)")
    op.add_argument("--shapes", help="comma-separated shape names, e.g. prompt-2k-b1,prompt-2k-m64-b1 "
                                     "(default: every full-size shape)")
    op.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    op.add_argument("--rounds", type=int, default=1,
                    help="time the shapes R times in turn; each time is the median over the rounds, so that a "
                         "changing load on a shared machine falls on every shape alike (default 1)")
    _outputs(op, "each shape's times against its floor")

    e2e = bench.add_parser("e2e", help="prefill with and without DeSAP on a whole model")
    e2e.add_argument("--model", default="tiny", choices=list(MODELS), help="the model (default tiny)")
    e2e.add_argument("--keep", help="comma-separated budgets (default: the model's N, N/3, 2N/9 and N/9)")
    e2e.add_argument("--device", default="cpu", help="cpu, cuda, or meta (FLOPs counted, nothing timed, any size)")
    e2e.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on cpu, else bf16")
    e2e.add_argument("--batch", type=int, default=1, help="images (or videos) per prefill (default 1)")
    e2e.add_argument("--repeats", type=int, default=5,
                     help="timed rounds after one warm-up, full/desap/ideal interleaved in each (default 5)")
    e2e.add_argument("--depth-factor", type=int, default=1,
                     help="a real shape's tower and language model F times shallower, widths kept: the tower's share "
                          "of prefill FLOPs stays the full model's (F must divide both depths; default 1)")
    e2e.add_argument("--methods", help=f"comma-separated pruning methods measured beside DeSAP, the ideal and the "
                                       f"full model in the same rounds, e.g. {METHODS_EXAMPLE} (default: desap "
                                       f"alone; desap always runs)")
    _outputs(e2e, "speedup and FLOP reduction against budget")

    vllm = bench.add_parser("vllm", help="vLLM offline serving throughput with and without DeSAP (needs vLLM)")
    _vllm_common(vllm)
    vllm.add_argument("--keep", help="comma-separated settings, e.g. full,192,128,64 (default: full, N/3, 2N/9, "
                                     "N/9); the full model always runs first, the baseline of the ratios")
    vllm.add_argument("--requests", type=int, default=16, help="requests per batch, one image each (default 16)")
    vllm.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    vllm.add_argument("--repeats", type=int, default=3,
                      help="timed rounds after the warm-up batch; each number is the median (default 3)")
    _outputs(vllm, "requests/s and the ratios against the full model", "machine, versions, command, every round")

    serve = bench.add_parser("serve", help="vllm serve under concurrent load, driven by vllm bench serve, with and "
                                           "without DeSAP and against an ideal (needs vLLM)")
    _vllm_common(serve)
    serve.add_argument("--keep", help="comma-separated budgets (default: N/3, 2N/9, N/9); the full model always runs "
                                      "first, then DeSAP and the ideal at each budget")
    serve.add_argument("--methods", help=f"comma-separated pruning methods, each asked for per request on DeSAP's "
                                         f"server at every budget after DeSAP, e.g. {METHODS_EXAMPLE} (default: "
                                         f"desap alone)")
    serve.add_argument("--no-ideal", action="store_true",
                       help="leave out the ideal (the first K tokens kept, no scoring), for a plugin without it")
    serve.add_argument("--concurrency", default="1,4,16,64", help="vllm bench serve --max-concurrency levels "
                                                                   "(default 1,4,16,64)")
    serve.add_argument("--prompts", default="4x", help="requests per level: a multiple of the concurrency (4x, the "
                                                       "default) or a number (raised to the concurrency)")
    serve.add_argument("--input-len", type=int, default=32, help="random words per request beside the image "
                                                                 "(random-mm's --random-input-len; default 32)")
    serve.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    serve.add_argument("--warmups", type=int, default=2, help="warm-up requests per server, unmeasured (default 2)")
    _outputs(serve, "throughput, TTFT and the share of the ideal against concurrency",
             "machine, load, commands, every level")


def _outputs(command: argparse.ArgumentParser, plot: str, out: str = "") -> None:
    """--out and --plot, which every benchmark takes (the skeleton writes them)."""
    command.add_argument("--out", help=f"JSON file to write{f' ({out})' if out else ''}")
    command.add_argument("--plot", help=f"PNG plot of {plot}")


def _vllm_common(command: argparse.ArgumentParser) -> None:
    """The options both vLLM benches take."""
    models = "; ".join(f"{name} ({model.about})" for name, model in VLLM_MODELS.items())
    command.add_argument("--model", default=next(iter(VLLM_MODELS)),
                         help=f"{models}; random weights, the checkpoint written once under ~/.cache/desap-ops/vllm "
                              f"(default {next(iter(VLLM_MODELS))})")
    command.add_argument("--dtype", choices=list(vllm_settings.DTYPE_CHOICES), default="bf16",
                         help="vLLM's dtype (default bf16)")
    command.add_argument("--task-ratio", default="0.5",
                         help="share of the kept tokens chosen by task score, in [0, 1], or auto (default 0.5)")
