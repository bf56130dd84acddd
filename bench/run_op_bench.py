"""Operator microbenchmarks -> a table on stdout and JSON: the same as ``desap bench op``.

    python bench/run_op_bench.py --device cuda --out bench/results/op-h100.json
    python bench/run_op_bench.py --device cpu --tiny          # a quick check without a GPU
"""
import sys

from desap_ops.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "op", *sys.argv[1:]]))
