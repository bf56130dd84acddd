"""The ``desap`` command line (also ``python -m desap_ops``).

    desap demo [--image PATH] [--prompt TEXT] [--keep K] [--task-ratio R] [--model DIR]
               [--query-box x0,y0,x1,y1] [--out kept.png]
    desap bench op [--device cuda] [--dtype bf16] [--tiny] [--out op.json]
    desap bench e2e [--model tiny|llava-1.5-7b|llava-next-7b|qwen2.5-vl-7b|llava-next-video-7b|video-llava-7b|
                     tiny-qwen2.5-vl|tiny-llava-next-video|tiny-video-llava] [--keep 576,192,128,64] [--device cuda]
                    [--out e2e.json] [--plot e2e.png]

Mistakes a person can fix (a missing file, a keep too large, --device cuda without a GPU) print
one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    pass


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} needs a CUDA GPU and none is visible; use --device cpu")
    if name not in ("cpu", "meta") and not name.startswith("cuda"):
        raise UsageError(f"--device must be cpu, meta or cuda, got {name}")
    return name


def _demo(args) -> int:
    from .demo import demo

    print(demo(image=args.image, prompt=args.prompt, keep=args.keep, task_ratio=args.task_ratio,
               model=args.model, out=args.out, query_box=args.query_box))
    return 0


def _bench_op(args) -> int:
    import torch

    from . import benchmarking

    device = _device(args.device)
    if device == "meta":
        raise UsageError("bench op times real work: use --device cpu or cuda")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    shapes = benchmarking.TINY_SHAPES if args.tiny else benchmarking.SHAPES
    result = benchmarking.run(device, dtypes[args.dtype], shapes, with_compile=not args.no_compile,
                              progress=lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    print(benchmarking.format_table(result))
    if args.out:
        benchmarking.save(result, args.out)
        print(f"wrote {args.out}")
    return 0


def _bench_e2e(args) -> int:
    from . import e2e

    device = _device(args.device)
    try:
        keeps = [int(k) for k in args.keep.split(",")] if args.keep else None
    except ValueError:
        raise UsageError(f"--keep must be comma-separated integers, got {args.keep}") from None
    result = e2e.run(args.model, keeps, device, args.dtype, batch=args.batch,
                     progress=lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    print(e2e.format_table(result))
    if args.out:
        e2e.save(result, args.out)
        print(f"wrote {args.out}")
    if args.plot:
        e2e.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="desap", description="DeSAP visual-token pruning: demo and benchmarks")
    commands = top.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="show what DeSAP keeps on a real image")
    demo.add_argument("--image", help="image file (default: skimage's astronaut photograph)")
    demo.add_argument("--prompt", help="the question (used with --model)")
    demo.add_argument("--keep", type=int, default=32, help="tokens to keep (default 32)")
    demo.add_argument("--task-ratio", type=float, default=0.5)
    demo.add_argument("--model", help="local LLaVA-1.5 / LLaVA-NeXT checkpoint folder (offline)")
    demo.add_argument("--query-box", help="x0,y0,x1,y1: tokens in this box play the text (no --model)")
    demo.add_argument("--out", default="kept.png", help="PNG to write (default kept.png)")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    op = bench.add_parser("op", help="operator microbenchmarks")
    op.add_argument("--device", default="cuda")
    op.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    op.add_argument("--tiny", action="store_true", help="one tiny shape (a smoke test)")
    op.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    op.add_argument("--out", help="JSON file to write")
    op.set_defaults(run=_bench_op)

    e2e = bench.add_parser("e2e", help="prefill with and without DeSAP on a whole model")
    e2e.add_argument("--model", default="tiny",
                     choices=["tiny", "llava-1.5-7b", "llava-next-7b", "tiny-qwen2.5-vl", "qwen2.5-vl-7b",
                              "tiny-llava-next-video", "llava-next-video-7b", "tiny-video-llava", "video-llava-7b"])
    e2e.add_argument("--keep", help="comma-separated budgets (default: the model's N and three smaller)")
    e2e.add_argument("--device", default="cpu", help="cpu, cuda, or meta (FLOPs only, any size)")
    e2e.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    e2e.add_argument("--batch", type=int, default=1)
    e2e.add_argument("--out", help="JSON file to write")
    e2e.add_argument("--plot", help="PNG plot of speedup against budget")
    e2e.set_defaults(run=_bench_e2e)
    return top


def main(argv: list[str] | None = None) -> int:
    from .demo import DemoError

    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, DemoError) as err:
        print(f"desap: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
