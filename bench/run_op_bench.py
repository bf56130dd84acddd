"""Operator microbenchmarks -> a table on stdout and JSON (see desap_ops/benchmarking.py).

    python bench/run_op_bench.py --device cuda --out bench/results/op-h100.json
    python bench/run_op_bench.py --device cpu --tiny          # a quick check without a GPU
"""
import argparse
import sys

import torch

from desap_ops import benchmarking

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape, for a smoke test")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    result = benchmarking.run(args.device, DTYPES[args.dtype],
                              benchmarking.TINY_SHAPES if args.tiny else benchmarking.SHAPES,
                              with_compile=not args.no_compile,
                              progress=lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    print(benchmarking.format_table(result))
    if args.out:
        benchmarking.save(result, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
