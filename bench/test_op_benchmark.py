"""pytest-benchmark microbenchmarks of the operator (not part of the test suite).

    python -m pytest bench/ --benchmark-only                # CUDA if present, else CPU
The shapes, inputs and implementations are those of ``desap bench op`` (desap_ops.benchmarks.op).
CUDA timings synchronise inside the timed call, so each round is one full op; for numbers to
report, use ``desap bench op`` (CUDA events, medians, CUDA graphs, floors).
"""
from dataclasses import asdict

import pytest
import torch

from desap_ops.benchmarks import op as bench_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = bench_op.SHAPES if DEVICE == "cuda" else bench_op.SHAPES[:1] + bench_op.TINY_SHAPES
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
IMPLS = ["eager", "compile"] + (["fused"] if DEVICE == "cuda" else [])


def _synced(fn):
    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return call


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_prune(benchmark, shape, impl):
    inputs = bench_op.make_inputs(shape, DEVICE, DTYPE)
    op = bench_op.implementations(shape.keep, shape.text_budget, with_compile=impl == "compile",
                                  with_fused=impl == "fused")[impl]
    benchmark.extra_info.update(asdict(bench_op.traffic(shape, DTYPE)))
    with torch.no_grad():
        result = benchmark(_synced(lambda: op(*inputs)))
    assert result.tokens.shape == (shape.batch, shape.keep, shape.width)
