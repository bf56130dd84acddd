"""``desap bench op``: the fused op against the eager and the compiled reference.

For each shape this counts the bytes the op must move (each input read once, each output written
once) and the FLOPs it must do, measures the device's copy bandwidth and matrix rate, and reports
the floor they imply (the larger of bytes / bandwidth and FLOPs / rate) next to the measured
median time. On CUDA, times come from ``triton.testing.do_bench`` (CUDA events, median, after
warm-up), also from replaying a captured CUDA graph, with inputs rotated so that they do not sit
in L2. On CPU, from ``time.perf_counter`` (median); the Triton kernels are not timed on CPU (the
interpreter is for checking, not speed).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch

from desap_ops import ops, prune, reference

from .report import environment, time_median_ms


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int      # N
    keep: int        # K
    width: int       # D (and E: the metric is hidden)
    text_width: int  # C
    n_text: int      # L


SHAPES = [
    Shape("llava1.5-b1", 1, 576, 64, 1024, 4096, 64),
    Shape("llava1.5-b8", 8, 576, 64, 1024, 4096, 64),
    Shape("llava1.5-b64", 64, 576, 64, 1024, 4096, 64),
    Shape("llava-next-b1", 1, 2880, 320, 1024, 4096, 64),
    Shape("video-b1", 1, 2048, 256, 1024, 4096, 64),
    Shape("long-prompt-b1", 1, 576, 64, 1024, 4096, 1024),
]
TINY_SHAPES = [Shape("tiny", 2, 64, 8, 32, 48, 8)]
TARGETS = {"speedup_vs_eager_b1": 10.0, "speedup_vs_compile_b1": 3.0, "hbm_fraction_b64": 0.60}

Device = Union[str, torch.device]


def default_device() -> str:
    """The device that exists here: cuda when a GPU is visible, else cpu (asked when a run starts,
    not at import, so that a GPU made visible later counts)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def traffic(shape: Shape, dtype: torch.dtype) -> dict:
    """The bytes the op must move and the FLOPs it must do (merge on, metric = hidden); the FLOPs
    are the operator's registered formula (similarity, nearest kept, merge sums)."""
    size = torch.empty((), dtype=dtype).element_size()
    b, n, k, d, c, l = shape.batch, shape.tokens, shape.keep, shape.width, shape.text_width, shape.n_text
    read = b * (n * c + l * c + n * d) * size + b * n * 4          # attn, text, hidden, saliency (fp32)
    written = b * k * d * size + b * k * 8 + b * n * 8 + b * n * 4  # tokens, indices, assignment, scores
    flops = ops.prune_flops((b, n, d), (b, n, c), (b, l, c), None, (b, n), None, k)
    return {"bytes": read + written, "flops": flops}


def make_inputs(shape: Shape, device: Device, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(hidden, attn, text, saliency) of ``shape``, drawn on the CPU from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    draw = lambda *size: torch.randn(*size, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    b, n = shape.batch, shape.tokens
    return (draw(b, n, shape.width), draw(b, n, shape.text_width), draw(b, shape.n_text, shape.text_width),
            torch.rand(b, n, generator=gen).to(device))


def implementations(keep: int, *, with_compile: bool = True, with_fused: bool = True) -> dict[str, Callable]:
    """The timed callables, each taking (hidden, attn, text, saliency): ``eager`` (the reference),
    ``compile`` (``torch.compile`` of it, compiled on the first call) and ``fused`` (the Triton op)."""

    def eager(h, a, t, s):
        return reference.prune(h, a, t, s, keep)

    impls = {"eager": eager}
    if with_compile:
        impls["compile"] = torch.compile(eager, fullgraph=True, dynamic=False)
    if with_fused:
        impls["fused"] = lambda h, a, t, s: prune(h, a, t, s, keep, backend="triton")
    return impls


def time_cuda_graph_ms(step: Callable[[], object], calls: int) -> float:
    """Median milliseconds per call: ``calls`` calls of ``step`` (one per rotating input set)
    captured in one CUDA graph, the graph replayed and timed, the time divided by ``calls``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(calls):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step()
    from triton.testing import do_bench

    return float(do_bench(graph.replay, warmup=50, rep=300, return_mode="median")) / calls


def device_ceilings(device: Device) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16/fp32 matrix rate."""
    dev = torch.device(device)
    numel = (512 if dev.type == "cuda" else 64) * 2**20 // 4
    src = torch.randn(numel, device=dev)
    dst = torch.empty_like(src)
    copy_ms = time_median_ms(lambda: dst.copy_(src), dev)
    side = 8192 if dev.type == "cuda" else 1024
    mat_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(side, side, device=dev, dtype=mat_dtype)
    b = torch.randn(side, side, device=dev, dtype=mat_dtype)
    mm_ms = time_median_ms(lambda: a @ b, dev)
    return {"copy_bytes_per_s": 2 * numel * 4 / (copy_ms * 1e-3),
            "matmul_flops_per_s": 2 * side**3 / (mm_ms * 1e-3), "matmul_dtype": str(mat_dtype)}


def _rotating(inputs_list: list, call: Callable) -> Callable[[], object]:
    state = {"i": 0}

    def step():
        args = inputs_list[state["i"] % len(inputs_list)]
        state["i"] += 1
        return call(*args)

    return step


def bench_shape(shape: Shape, device: Device, dtype: torch.dtype, ceilings: dict, *, with_compile: bool = True,
                progress: Optional[Callable[[str], None]] = None) -> dict:
    """One row: the shape's counts, the median time of each implementation, the floor and ratios."""
    dev = torch.device(device)
    counts = traffic(shape, dtype)
    # rotate input sets so that together they exceed the L2 cache (METHOD: do not time the cache)
    sets = 1 if dev.type != "cuda" else max(1, min(16, math.ceil(256e6 / counts["bytes"])))
    inputs = [make_inputs(shape, dev, dtype, seed) for seed in range(sets)]
    impls = implementations(shape.keep, with_compile=with_compile, with_fused=dev.type == "cuda")
    labels = {"eager": "eager reference", "compile": "torch.compile(reference)", "fused": "fused Triton op"}
    row = {"shape": asdict(shape), "dtype": str(dtype).replace("torch.", ""), **counts, "input_sets": sets}
    say = progress or (lambda _: None)
    with torch.no_grad():
        for name, impl in impls.items():
            say(f"{shape.name}: {labels[name]}")
            row[f"{name}_ms"] = time_median_ms(_rotating(inputs, impl), dev)
        if "fused" in impls:
            row["fused_graph_ms"] = time_cuda_graph_ms(_rotating(inputs, impls["fused"]), sets)
    floor_s = max(counts["bytes"] / ceilings["copy_bytes_per_s"], counts["flops"] / ceilings["matmul_flops_per_s"])
    row["floor_ms"] = floor_s * 1e3
    best = row.get("fused_ms", row.get("compile_ms", row["eager_ms"]))
    row["fraction_of_floor"] = row["floor_ms"] / best
    row["achieved_bytes_per_s"] = counts["bytes"] / (best * 1e-3)
    if "fused_ms" in row:
        row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
        if "compile_ms" in row:
            row["speedup_vs_compile"] = row["compile_ms"] / row["fused_ms"]
    return row


def check_targets(rows: list[dict]) -> dict:
    """The issue's targets, as ratios measured in this run (CUDA rows only)."""
    by_name = {r["shape"]["name"]: r for r in rows}
    out = {}
    b1, b64 = by_name.get("llava1.5-b1"), by_name.get("llava1.5-b64")
    if b1 and "speedup_vs_eager" in b1:
        out["speedup_vs_eager_b1"] = b1["speedup_vs_eager"]
        out["speedup_vs_compile_b1"] = b1.get("speedup_vs_compile")
    if b64 and "fused_ms" in b64:
        out["hbm_fraction_b64"] = b64["achieved_bytes_per_s"] / b64["ceilings_copy_bytes_per_s"]
    return {k: {"measured": v, "target": TARGETS[k], "met": v is not None and v >= TARGETS[k]} for k, v in out.items()}


def run(device: Optional[Device] = None, dtype: torch.dtype = torch.bfloat16, shapes: Optional[list[Shape]] = None,
        with_compile: bool = True, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Every shape's row, the device's ceilings, the targets and the environment, as saved to JSON;
    ``device`` defaults to :func:`default_device`."""
    device = device if device is not None else default_device()
    shapes = shapes if shapes is not None else SHAPES
    ceilings = device_ceilings(device)
    rows = []
    for shape in shapes:
        row = bench_shape(shape, device, dtype, ceilings, with_compile=with_compile, progress=progress)
        row["ceilings_copy_bytes_per_s"] = ceilings["copy_bytes_per_s"]
        rows.append(row)
    return {"environment": environment(device), "ceilings": ceilings, "rows": rows,
            "targets": check_targets(rows)}


def legend(ceilings: dict) -> list[str]:
    """What the table's derived columns mean, with this run's measured ceilings."""
    matmul_dtype = ceilings["matmul_dtype"].replace("torch.", "")
    return ["floor ms: the least time the op could take here, the larger of bytes / copy bandwidth and FLOPs / matrix",
            (f"          rate, both measured on this device ({ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s copy, "
             f"{ceilings['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s {matmul_dtype} matmul)"),
            "%floor: floor ms / the best measured time (fused, else compile, else eager); 100% = at the floor",
            "x eager, x comp: eager and compile time / fused time; graph: the fused op replayed in a CUDA graph"]


def format_table(result: dict) -> str:
    """The rows as a text table, a legend of the derived columns, and the targets."""
    head = (f"{'shape':<16}{'MB':>8}{'GFLOP':>8}{'floor ms':>10}{'eager ms':>10}{'compile':>10}{'fused':>10}"
            f"{'graph':>10}{'x eager':>9}{'x comp':>8}{'%floor':>8}")
    lines = [f"{result['environment']['device']}  torch {result['environment']['torch']}  "
             f"triton {result['environment']['triton']}  {result['environment']['date']}", head]
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in result["rows"]:
        lines.append(f"{r['shape']['name']:<16}{r['bytes'] / 1e6:>8.1f}{r['flops'] / 1e9:>8.2f}{fmt(r['floor_ms']):>10}"
                     f"{fmt(r['eager_ms']):>10}{fmt(r.get('compile_ms')):>10}{fmt(r.get('fused_ms')):>10}"
                     f"{fmt(r.get('fused_graph_ms')):>10}{fmt(r.get('speedup_vs_eager'), 1):>9}"
                     f"{fmt(r.get('speedup_vs_compile'), 1):>8}{100 * r['fraction_of_floor']:>7.0f}%")
    lines += legend(result["ceilings"])
    for name, t in result["targets"].items():
        lines.append(f"target {name}: measured {fmt(t['measured'], 2)} vs {t['target']} -> {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)
