"""The ``desap`` command line (also ``python -m desap_ops``).

    desap demo [--image PATH] [--prompt TEXT] [--keep K] [--task-ratio R|auto] [--model DIR]
               [--query-box x0,y0,x1,y1] [--out kept.png]
    desap bench op [--device cpu|cuda] [--dtype bf16] [--tiny | --shapes a,b] [--no-compile]
                   [--rounds R] [--out op.json]
    desap bench e2e [--model NAME] [--keep 576,192,128,64] [--device cpu|cuda|meta] [--dtype bf16]
                    [--batch B] [--repeats N] [--out e2e.json] [--plot e2e.png]
    desap bench vllm [--model NAME] [--keep full,192,128,64] [--requests 16]
                     [--max-tokens 16] [--repeats 3] [--dtype bf16] [--task-ratio R|auto]
                     [--out vllm.json] [--plot vllm.png]
    desap bench serve [--model NAME] [--keep 192,128,64] [--no-ideal] [--concurrency 1,4,16,64]
                      [--prompts 4x] [--input-len 32] [--max-tokens 32] [--warmups 2] [--dtype bf16]
                      [--task-ratio R|auto] [--out serve.json] [--plot serve.png]

``desap bench e2e --help`` lists the models (desap_ops.cli.models.MODELS); the vLLM benches run
desap_ops.cli.vllm_models.MODELS. Mistakes a person can
fix (a missing file, a keep too large, --device cuda without a GPU) print one line
``desap: error: ...`` and return 2. The commands import their modules when they run, so that
``--help`` stays quick.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .errors import UsageError
from .models import MODELS
from .report import DTYPES, save_json


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _print_and_save(table: str, result: dict, out: Optional[str]) -> None:
    print(table)
    if out:
        save_json(result, out)
        print(f"wrote {out}")


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} needs a CUDA GPU and none is visible; use --device cpu")
    if name not in ("cpu", "meta") and not name.startswith("cuda"):
        raise UsageError(f"--device must be cpu, meta or cuda, got {name}")
    return name


def _keeps(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise UsageError(f"--keep must be comma-separated integers, got {text}") from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo

    print(demo(image=args.image, prompt=args.prompt, keep=args.keep, task_ratio=args.task_ratio,
               model=args.model, out=args.out, query_box=args.query_box))
    return 0


def _bench_op(args: argparse.Namespace) -> int:
    from . import bench_op

    device = _device(args.device or bench_op.default_device())
    if device == "meta":
        raise UsageError("bench op times real work: use --device cpu or cuda")
    if args.tiny and args.shapes:
        raise UsageError("--tiny and --shapes both choose the shapes: give one")
    shapes = bench_op.SHAPES
    if args.tiny or args.shapes:
        shapes = bench_op.TINY_SHAPES if args.tiny else bench_op.select_shapes(args.shapes)
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    result = bench_op.run(device, DTYPES[args.dtype], shapes, with_compile=not args.no_compile, progress=_progress,
                          rounds=args.rounds)
    _print_and_save(bench_op.format_table(result), result, args.out)
    return 0


def _bench_e2e(args: argparse.Namespace) -> int:
    from . import bench_e2e

    device = _device(args.device)
    result = bench_e2e.run(args.model, _keeps(args.keep), device, args.dtype, batch=args.batch, progress=_progress,
                           repeats=args.repeats)
    _print_and_save(bench_e2e.format_table(result), result, args.out)
    if args.plot:
        bench_e2e.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _bench_vllm(args: argparse.Namespace) -> int:
    from . import bench_vllm

    return bench_vllm.command(args, progress=_progress)


def _bench_serve(args: argparse.Namespace) -> int:
    from . import bench_serve

    return bench_serve.command(args, progress=_progress)


VLLM_MODELS = ("llava-tinyllama-1.1b (CLIP ViT-L/14-336 + TinyLlama-1.1B shapes, 576 tokens an image; default), "
               "llava-1.5-7b (its shapes, for a GPU), qwen2.5-vl-small (Qwen2.5-VL's tower blocks at 8 of 32 + "
               "Qwen2.5-0.5B, 144 tokens a 336-pixel image), tiny or tiny-qwen2.5-vl (smoke checks); random weights, the checkpoint written once under "
               "~/.cache/desap-ops/vllm")


def _vllm_common(command: argparse.ArgumentParser) -> None:
    """The options both vLLM benches take."""
    command.add_argument("--model", default="llava-tinyllama-1.1b", help=VLLM_MODELS)
    command.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="vLLM's dtype (default bf16)")
    command.add_argument("--task-ratio", default="0.5",
                         help="share of the kept tokens chosen by task score, in [0, 1], or auto (default 0.5)")


def parser() -> argparse.ArgumentParser:
    """The ``desap`` argument parser; each command stores its handler as ``run``."""
    top = argparse.ArgumentParser(prog="desap", description="DeSAP visual-token pruning: demo and benchmarks")
    commands = top.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="show what DeSAP keeps on a real image")
    demo.add_argument("--image", help="image file (default: skimage's astronaut photograph)")
    demo.add_argument("--prompt", help="the question (used with --model)")
    demo.add_argument("--keep", type=int, default=32, help="tokens to keep (default 32)")
    demo.add_argument("--task-ratio", default=0.5,
                      help="share of the kept tokens chosen by task score, the rest by [CLS] saliency, "
                           "in [0, 1] (default 0.5); or auto: each image's task scores choose it, and the "
                           "picture compares a strong cue (the query box) with a weak one")
    demo.add_argument("--model", help="local LLaVA-1.5 / LLaVA-NeXT checkpoint folder (offline)")
    demo.add_argument("--query-box", help="x0,y0,x1,y1: tokens in this box play the text (no --model)")
    demo.add_argument("--out", default="kept.png",
                      help="picture to write, its format from the extension (default kept.png)")
    demo.set_defaults(run=_demo)

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
    op.add_argument("--out", help="JSON file to write")
    op.set_defaults(run=_bench_op)

    e2e = bench.add_parser("e2e", help="prefill with and without DeSAP on a whole model")
    e2e.add_argument("--model", default="tiny", choices=list(MODELS))
    e2e.add_argument("--keep", help="comma-separated budgets (default: the model's N, N/3, 2N/9 and N/9)")
    e2e.add_argument("--device", default="cpu", help="cpu, cuda, or meta (FLOPs counted, nothing timed, any size)")
    e2e.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on cpu, else bf16")
    e2e.add_argument("--batch", type=int, default=1)
    e2e.add_argument("--repeats", type=int, default=5,
                     help="timed rounds after one warm-up, full/desap/ideal interleaved in each (default 5)")
    e2e.add_argument("--out", help="JSON file to write")
    e2e.add_argument("--plot", help="PNG plot of speedup and FLOP reduction against budget")
    e2e.set_defaults(run=_bench_e2e)

    vllm = bench.add_parser("vllm", help="vLLM offline serving throughput with and without DeSAP (needs vLLM)")
    _vllm_common(vllm)
    vllm.add_argument("--keep", help="comma-separated settings, e.g. full,192,128,64 (default: full, N/3, 2N/9, "
                                     "N/9); the full model always runs first, the baseline of the ratios")
    vllm.add_argument("--requests", type=int, default=16, help="requests per batch, one image each (default 16)")
    vllm.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    vllm.add_argument("--repeats", type=int, default=3,
                      help="timed rounds after the warm-up batch; each number is the median (default 3)")
    vllm.add_argument("--out", help="JSON file to write (machine, versions, command, every round)")
    vllm.add_argument("--plot", help="PNG plot of requests/s and the ratios against the full model")
    vllm.set_defaults(run=_bench_vllm)

    serve = bench.add_parser("serve", help="vllm serve under concurrent load, driven by vllm bench serve, with and "
                                           "without DeSAP and against an ideal (needs vLLM)")
    _vllm_common(serve)
    serve.add_argument("--keep", help="comma-separated budgets (default: N/3, 2N/9, N/9); the full model always runs "
                                      "first, then DeSAP and the ideal at each budget")
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
    serve.add_argument("--out", help="JSON file to write (machine, load, commands, every level)")
    serve.add_argument("--plot", help="PNG plot of throughput, TTFT and the share of the ideal against concurrency")
    serve.set_defaults(run=_bench_serve)
    return top


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``desap`` with ``argv`` (default: the process's arguments); 0 on success, 2 on a fixable mistake."""
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as err:
        print(f"desap: error: {err}", file=sys.stderr)
        return 2
