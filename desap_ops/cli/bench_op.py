"""``desap bench op``: the fused op against the eager and the compiled reference.

For each shape this counts the bytes the op must move (each input read once, each output written
once) and the FLOPs it must do, measures the device's copy bandwidth and matrix rate, and reports
the floor they imply (the larger of bytes / bandwidth and FLOPs / rate) next to the measured
median time. On CUDA, times come from ``triton.testing.do_bench`` (CUDA events, median, after
warm-up), also from replaying a captured CUDA graph, with inputs rotated so that they do not sit
in L2. On CPU, from ``time.perf_counter`` (median); the Triton kernels are not timed on CPU (the
interpreter is for checking, not speed).

``--shapes`` picks rows by name; the two long-prompt rows (L = 2,048, without and with
``text_budget=64``) compare the whole similarity with the budgeted one.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch

from desap_ops import ops, prune, reference

from .errors import UsageError
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
    text_budget: Optional[int] = None  # M: at most M text tokens take part in the similarity


SHAPES = [
    Shape("llava1.5-b1", 1, 576, 64, 1024, 4096, 64),
    Shape("llava1.5-b8", 8, 576, 64, 1024, 4096, 64),
    Shape("llava1.5-b64", 64, 576, 64, 1024, 4096, 64),
    Shape("llava-next-b1", 1, 2880, 320, 1024, 4096, 64),
    Shape("video-b1", 1, 2048, 256, 1024, 4096, 64),
    Shape("long-prompt-b1", 1, 576, 64, 1024, 4096, 1024),
    # a chat-length prompt: the similarity over all 2,048 text tokens, then over the 64 the budget keeps
    Shape("prompt-2k-b1", 1, 576, 64, 1024, 4096, 2048),
    Shape("prompt-2k-m64-b1", 1, 576, 64, 1024, 4096, 2048, text_budget=64),
]
TINY_SHAPES = [Shape("tiny", 2, 64, 8, 32, 48, 8)]
TINY_BUDGET = Shape("tiny-m4", 2, 64, 8, 32, 48, 16, text_budget=4)  # the budget path, small (--shapes tiny-m4)
TIMES = ("eager_ms", "compile_ms", "fused_ms", "fused_graph_ms")  # the measured medians of a row
TARGETS = {"speedup_vs_eager_b1": 10.0, "speedup_vs_compile_b1": 3.0, "hbm_fraction_b64": 0.60}

Device = Union[str, torch.device]


def default_device() -> str:
    """The device that exists here: cuda when a GPU is visible, else cpu (asked when a run starts,
    not at import, so that a GPU made visible later counts)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def select_shapes(names: str) -> list[Shape]:
    """The shapes named in ``names`` (comma-separated, from SHAPES, TINY_SHAPES and TINY_BUDGET), in that order."""
    known = {shape.name: shape for shape in SHAPES + TINY_SHAPES + [TINY_BUDGET]}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise UsageError(f"--shapes takes names from {', '.join(known)}; got {names!r}")
    return [known[name] for name in wanted]


def traffic(shape: Shape, dtype: torch.dtype) -> dict:
    """The bytes the op must move and the FLOPs it must do (merge on, metric = hidden); the FLOPs
    are the operator's registered formula (similarity, nearest kept, merge sums, and the text
    sketch under a budget).

    With a budget M < L the text budget is a separate torch step before the similarity: it reads
    attn and the L text rows, and writes the M rows it keeps and their mask, which the similarity
    then reads instead of all L. What that adds (attn read a second time, the M rows and the mask
    written and read) is ``sketch_bytes``, included in ``bytes``.
    """
    size = torch.empty((), dtype=dtype).element_size()
    b, n, k, d, c, l = shape.batch, shape.tokens, shape.keep, shape.width, shape.text_width, shape.n_text
    m = l if shape.text_budget is None else min(l, shape.text_budget)
    read = b * (n * c + l * c + n * d) * size + b * n * 4          # attn, text, hidden, saliency (fp32)
    # tokens, indices, assignment, scores, task_keep
    written = b * k * d * size + b * k * 8 + b * n * 8 + b * n * 4 + b * 8
    sketch = b * (n * c + 2 * m * c) * size + 2 * b * m if m < l else 0
    flops = ops.prune_flops((b, n, d), (b, n, c), (b, l, c), None, (b, n), None, k, text_budget=shape.text_budget)
    return {"bytes": read + written + sketch, "sketch_bytes": sketch, "flops": flops}


def make_inputs(shape: Shape, device: Device, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(hidden, attn, text, saliency) of ``shape``, drawn on the CPU from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    draw = lambda *size: torch.randn(*size, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    b, n = shape.batch, shape.tokens
    return (draw(b, n, shape.width), draw(b, n, shape.text_width), draw(b, shape.n_text, shape.text_width),
            torch.rand(b, n, generator=gen).to(device))


def implementations(keep: int, text_budget: Optional[int] = None, *, with_compile: bool = True,
                    with_fused: bool = True) -> dict[str, Callable]:
    """The timed callables, each taking (hidden, attn, text, saliency): ``eager`` (the reference),
    ``compile`` (``torch.compile`` of it, compiled on the first call) and ``fused`` (the Triton op),
    all with the same ``text_budget``."""

    def eager(h, a, t, s):
        return reference.prune(h, a, t, s, keep, text_budget=text_budget)

    impls = {"eager": eager}
    if with_compile:
        impls["compile"] = torch.compile(eager, fullgraph=True, dynamic=False)
    if with_fused:
        impls["fused"] = lambda h, a, t, s: prune(h, a, t, s, keep, backend="triton", text_budget=text_budget)
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
    impls = implementations(shape.keep, shape.text_budget, with_compile=with_compile, with_fused=dev.type == "cuda")
    labels = {"eager": "eager reference", "compile": "torch.compile(reference)", "fused": "fused Triton op"}
    row = {"shape": asdict(shape), "dtype": str(dtype).replace("torch.", ""), **counts, "input_sets": sets}
    say = progress or (lambda _: None)
    with torch.no_grad():
        for name, impl in impls.items():
            say(f"{shape.name}: {labels[name]}")
            row[f"{name}_ms"] = time_median_ms(_rotating(inputs, impl), dev)
        if "fused" in impls:
            row["fused_graph_ms"] = time_cuda_graph_ms(_rotating(inputs, impls["fused"]), sets)
    return derive(row, ceilings)


def derive(row: dict, ceilings: dict) -> dict:
    """``row`` with the floor and the ratios that follow from its counts and times."""
    floor_s = max(row["bytes"] / ceilings["copy_bytes_per_s"], row["flops"] / ceilings["matmul_flops_per_s"])
    row["floor_ms"] = floor_s * 1e3
    best = row.get("fused_ms", row.get("compile_ms", row["eager_ms"]))
    row["fraction_of_floor"] = row["floor_ms"] / best
    row["achieved_bytes_per_s"] = row["bytes"] / (best * 1e-3)
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


def merge_rounds(rounds: list[dict], ceilings: dict) -> dict:
    """One row from the same shape's rows of several rounds: each time the median over the rounds,
    every round's time kept as ``<time>_rounds``."""
    row = dict(rounds[0])
    for key in TIMES:
        if key in row:
            row[f"{key}_rounds"] = [r[key] for r in rounds]
            row[key] = statistics.median(row[f"{key}_rounds"])
    return derive(row, ceilings)


def budget_speedups(rows: list[dict]) -> list[dict]:
    """For every row with a text budget whose twin without one (the same shape, no budget) ran in the
    same run: the time without / the time with per implementation, the median over the rounds of
    each round's ratio (both timed in that round, so that a change of load falls on both), and the
    FLOP ratio as counted."""
    plain = {tuple(v for k, v in r["shape"].items() if k not in ("name", "text_budget")): r
             for r in rows if r["shape"]["text_budget"] is None}
    out = []
    for row in rows:
        twin = plain.get(tuple(v for k, v in row["shape"].items() if k not in ("name", "text_budget")))
        if row["shape"]["text_budget"] is None or twin is None:
            continue
        entry = {"without": twin["shape"]["name"], "with": row["shape"]["name"],
                 "flops_ratio": twin["flops"] / row["flops"]}
        for impl in ("eager", "compile", "fused"):
            key = f"{impl}_ms_rounds"
            if key in row and key in twin:
                entry[f"{impl}_speedup_rounds"] = [a / b for a, b in zip(twin[key], row[key])]
                entry[f"{impl}_speedup"] = statistics.median(entry[f"{impl}_speedup_rounds"])
        out.append(entry)
    return out


def run(device: Optional[Device] = None, dtype: torch.dtype = torch.bfloat16, shapes: Optional[list[Shape]] = None,
        with_compile: bool = True, progress: Optional[Callable[[str], None]] = None, rounds: int = 1) -> dict:
    """Every shape's row, the device's ceilings, the targets and the environment, as saved to JSON;
    ``device`` defaults to :func:`default_device`. With ``rounds`` R > 1 every shape is timed once
    per round, the shapes in turn, and each time is the median over the rounds: on a shared machine
    a load that comes and goes then falls on every shape alike, not on whichever ran during it."""
    device = device if device is not None else default_device()
    shapes = shapes if shapes is not None else SHAPES
    ceilings = device_ceilings(device)
    by_round = []
    for number in range(1, rounds + 1):
        prefix = f"round {number}/{rounds}, " if rounds > 1 else ""
        say = (lambda message, prefix=prefix: progress(prefix + message)) if progress else None
        by_round.append([bench_shape(shape, device, dtype, ceilings, with_compile=with_compile, progress=say)
                         for shape in shapes])
    rows = [merge_rounds(list(group), ceilings) for group in zip(*by_round)]
    for row in rows:
        row["ceilings_copy_bytes_per_s"] = ceilings["copy_bytes_per_s"]
    return {"environment": environment(device), "ceilings": ceilings, "rounds": rounds, "rows": rows,
            "targets": check_targets(rows), "budget_speedups": budget_speedups(rows)}


def legend(ceilings: dict) -> list[str]:
    """What the table's derived columns mean, with this run's measured ceilings."""
    matmul_dtype = ceilings["matmul_dtype"].replace("torch.", "")
    return ["MB: the bytes the op must move (with a text budget, its sketch step's too); GFLOP: the registered formula",
            "floor ms: the least time the op could take here, the larger of bytes / copy bandwidth and FLOPs / matrix",
            (f"          rate, both measured on this device ({ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s copy, "
             f"{ceilings['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s {matmul_dtype} matmul)"),
            "%floor: floor ms / the best measured time (fused, else compile, else eager); 100% = at the floor",
            "x eager, x comp: eager and compile time / fused time; graph: the fused op replayed in a CUDA graph"]


def format_table(result: dict) -> str:
    """The rows as a text table, a legend of the derived columns, and the targets."""
    head = (f"{'shape':<18}{'MB':>8}{'GFLOP':>8}{'floor ms':>10}{'eager ms':>10}{'compile':>10}{'fused':>10}"
            f"{'graph':>10}{'x eager':>9}{'x comp':>8}{'%floor':>8}")
    lines = [f"{result['environment']['device']}  torch {result['environment']['torch']}  "
             f"triton {result['environment']['triton']}  {result['environment']['date']}", head]
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in result["rows"]:
        lines.append(f"{r['shape']['name']:<18}{r['bytes'] / 1e6:>8.1f}{r['flops'] / 1e9:>8.2f}{fmt(r['floor_ms']):>10}"
                     f"{fmt(r['eager_ms']):>10}{fmt(r.get('compile_ms')):>10}{fmt(r.get('fused_ms')):>10}"
                     f"{fmt(r.get('fused_graph_ms')):>10}{fmt(r.get('speedup_vs_eager'), 1):>9}"
                     f"{fmt(r.get('speedup_vs_compile'), 1):>8}{100 * r['fraction_of_floor']:>7.0f}%")
    lines += legend(result["ceilings"])
    for b in result.get("budget_speedups", []):
        measured = ", ".join(f"{impl} {b[f'{impl}_speedup']:.2f}x" for impl in ("eager", "compile", "fused")
                             if f"{impl}_speedup" in b)
        lines.append(f"text budget: {b['without']} / {b['with']}: {b['flops_ratio']:.1f}x fewer FLOPs counted; "
                     f"measured time ratio {measured}")
    for name, t in result["targets"].items():
        lines.append(f"target {name}: measured {fmt(t['measured'], 2)} vs {t['target']} -> {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)
