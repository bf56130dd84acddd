"""pytest-benchmark microbenchmarks of the operator (not part of the test suite).

    python -m pytest bench/ --benchmark-only                # CUDA if present, else CPU
CUDA timings synchronise inside the timed call, so each round is one full op; for numbers to
report, use bench/run_op_bench.py (CUDA events, medians, CUDA graphs, floors).
"""
import pytest
import torch

from desap_ops import benchmarking, prune, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = benchmarking.SHAPES if DEVICE == "cuda" else benchmarking.SHAPES[:1] + benchmarking.TINY_SHAPES
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
IMPLS = ["reference", "compiled-reference"] + (["triton"] if DEVICE == "cuda" else [])


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
    hidden, attn, text, saliency = benchmarking.make_inputs(shape, DEVICE, DTYPE)
    if impl == "triton":
        fn = lambda: prune(hidden, attn, text, saliency, shape.keep, backend="triton")  # noqa: E731
    else:
        ref = lambda h, a, t, s: reference.prune(h, a, t, s, shape.keep)  # noqa: E731
        if impl == "compiled-reference":
            ref = torch.compile(ref, fullgraph=True, dynamic=False)
        fn = lambda: ref(hidden, attn, text, saliency)  # noqa: E731
    counts = benchmarking.traffic(shape, DTYPE)
    benchmark.extra_info.update(counts)
    with torch.no_grad():
        result = benchmark(_synced(fn))
    assert result.tokens.shape == (shape.batch, shape.keep, shape.width)
