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

import dataclasses
import math
import statistics
from argparse import Namespace
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch

from desap_ops import ops, prune, reference

from .arguments import UsageError, check_device
from .machine import DTYPES, Environment, dtype_name, time_median_ms
from .skeleton import Progress, named, optional

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
IMPLEMENTATIONS = ("eager", "compile", "fused")
LABELS = {"eager": "eager reference", "compile": "torch.compile(reference)", "fused": "fused Triton op",
          "fused_graph": "fused, in a CUDA graph"}
TARGETS = {"speedup_vs_eager_b1": 10.0, "speedup_vs_compile_b1": 3.0, "hbm_fraction_b64": 0.60}

Device = Union[str, torch.device]


# --- the plan ----------------------------------------------------------------------------------------

@dataclass
class OpPlan:
    device: str
    dtype: torch.dtype
    shapes: list[Shape]
    with_compile: bool = True
    rounds: int = 1


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


def check(args: Namespace) -> None:
    """The device, the shapes and the rounds (UsageError)."""
    device = check_device(args.device or default_device())
    if device == "meta":
        raise UsageError("bench op times real work: use --device cpu or cuda")
    if args.tiny and args.shapes:
        raise UsageError("--tiny and --shapes both choose the shapes: give one")
    if args.shapes:
        select_shapes(args.shapes)
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")


def plan(args: Namespace) -> OpPlan:
    shapes = TINY_SHAPES if args.tiny else select_shapes(args.shapes) if args.shapes else SHAPES
    return OpPlan(args.device or default_device(), DTYPES[args.dtype], shapes, with_compile=not args.no_compile,
                rounds=args.rounds)


# --- what a shape costs at least ---------------------------------------------------------------------

@dataclass(frozen=True)
class Traffic:
    bytes: int          # what the op must move, the text budget's sketch step included
    sketch_bytes: int   # of which the text budget's sketch step
    flops: int          # the registered formula


def traffic(shape: Shape, dtype: torch.dtype) -> Traffic:
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
    return Traffic(bytes=read + written + sketch, sketch_bytes=sketch, flops=flops)


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float      # bytes read + written per second by a large copy
    matmul_flops_per_s: float
    matmul_dtype: str


def device_ceilings(device: Device) -> Ceilings:
    """Measured copy bandwidth (bytes read + written per second) and bf16 (CUDA) or fp32 matrix rate."""
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
    return Ceilings(copy_bytes_per_s=2 * numel * 4 / (copy_ms * 1e-3),
                    matmul_flops_per_s=2 * side**3 / (mm_ms * 1e-3), matmul_dtype=str(mat_dtype))


# --- timing ------------------------------------------------------------------------------------------

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


def _rotating(inputs_list: list, call: Callable) -> Callable[[], object]:
    count = [0]

    def step():
        args = inputs_list[count[0] % len(inputs_list)]
        count[0] += 1
        return call(*args)

    return step


def input_sets(shape: Shape, device: Device, dtype: torch.dtype) -> int:
    """How many input sets a round rotates through: on CUDA enough to exceed the L2 cache together
    (METHOD: do not time the cache), on a CPU one."""
    if torch.device(device).type != "cuda":
        return 1
    return max(1, min(16, math.ceil(256e6 / traffic(shape, dtype).bytes)))


@dataclass
class Times:
    """One round's median milliseconds of one shape, per implementation (None: not timed here)."""
    eager: float
    compile: Optional[float] = None
    fused: Optional[float] = None
    fused_graph: Optional[float] = None


def time_shape(shape: Shape, device: Device, dtype: torch.dtype, *, with_compile: bool = True,
               progress: Optional[Progress] = None) -> Times:
    """One round of ``shape``: the median time of each implementation (the fused op on CUDA only)."""
    dev = torch.device(device)
    inputs = [make_inputs(shape, dev, dtype, seed) for seed in range(input_sets(shape, dev, dtype))]
    impls = implementations(shape.keep, shape.text_budget, with_compile=with_compile, with_fused=dev.type == "cuda")
    say = progress or (lambda _: None)
    times = {}
    with torch.no_grad():
        for name, impl in impls.items():
            say(f"{shape.name}: {LABELS[name]}")
            times[name] = time_median_ms(_rotating(inputs, impl), dev)
        if "fused" in impls:
            times["fused_graph"] = time_cuda_graph_ms(_rotating(inputs, impls["fused"]), len(inputs))
    return Times(**times)


# --- the result --------------------------------------------------------------------------------------

@dataclass
class OpRow:
    """One shape: its counts, each implementation's time (the median over the rounds, every round's
    time beside it), the floor and the ratios that follow."""
    shape: Shape
    dtype: str
    bytes: int
    sketch_bytes: int
    flops: int
    input_sets: int
    eager_ms: float
    eager_ms_rounds: list[float]
    floor_ms: float
    fraction_of_floor: float         # floor / the best measured time (fused, else compile, else eager)
    achieved_bytes_per_s: float      # bytes / the best measured time
    ceilings_copy_bytes_per_s: float
    compile_ms: Optional[float] = optional()
    compile_ms_rounds: Optional[list[float]] = optional()
    fused_ms: Optional[float] = optional()
    fused_ms_rounds: Optional[list[float]] = optional()
    fused_graph_ms: Optional[float] = optional()
    fused_graph_ms_rounds: Optional[list[float]] = optional()
    speedup_vs_eager: Optional[float] = optional()
    speedup_vs_compile: Optional[float] = optional()

    @classmethod
    def of(cls, shape: Shape, dtype: torch.dtype, rounds: list[Times], ceilings: Ceilings, sets: int) -> "OpRow":
        counts = traffic(shape, dtype)
        timed = {}
        for impl in ("eager", "compile", "fused", "fused_graph"):
            each = [getattr(r, impl) for r in rounds]
            if None not in each:
                timed[f"{impl}_ms"], timed[f"{impl}_ms_rounds"] = statistics.median(each), each
        best = timed.get("fused_ms", timed.get("compile_ms", timed["eager_ms"]))
        floor_ms = 1e3 * max(counts.bytes / ceilings.copy_bytes_per_s, counts.flops / ceilings.matmul_flops_per_s)
        fused = timed.get("fused_ms")
        return cls(shape=shape, dtype=dtype_name(dtype), bytes=counts.bytes, sketch_bytes=counts.sketch_bytes,
                   flops=counts.flops, input_sets=sets, floor_ms=floor_ms, fraction_of_floor=floor_ms / best,
                   achieved_bytes_per_s=counts.bytes / (best * 1e-3),
                   ceilings_copy_bytes_per_s=ceilings.copy_bytes_per_s,
                   speedup_vs_eager=timed["eager_ms"] / fused if fused else None,
                   speedup_vs_compile=timed["compile_ms"] / fused if fused and "compile_ms" in timed else None,
                   **timed)


@dataclass
class Target:
    measured: Optional[float]
    target: float
    met: bool


@dataclass
class BudgetSpeedup:
    """A shape with a text budget against its twin without one, timed in the same run: the time
    without / the time with, per implementation, the median over the rounds of each round's ratio
    (both timed in that round, so that a change of load falls on both), and the FLOP ratio counted."""
    without: str                 # the shape without a budget
    with_: str = named("with")   # the shape with one
    flops_ratio: float
    eager_speedup: Optional[float] = optional()
    eager_speedup_rounds: Optional[list[float]] = optional()
    compile_speedup: Optional[float] = optional()
    compile_speedup_rounds: Optional[list[float]] = optional()
    fused_speedup: Optional[float] = optional()
    fused_speedup_rounds: Optional[list[float]] = optional()


@dataclass
class OpBenchResult:
    environment: Environment
    ceilings: Ceilings
    rounds: int
    rows: list[OpRow]
    targets: dict[str, Target]
    budget_speedups: list[BudgetSpeedup]


def check_targets(rows: list[OpRow]) -> dict[str, Target]:
    """The issue's targets, as ratios measured in this run (CUDA rows only)."""
    by_name = {r.shape.name: r for r in rows}
    out: dict[str, Optional[float]] = {}
    b1, b64 = by_name.get("llava1.5-b1"), by_name.get("llava1.5-b64")
    if b1 and b1.speedup_vs_eager is not None:
        out["speedup_vs_eager_b1"] = b1.speedup_vs_eager
        out["speedup_vs_compile_b1"] = b1.speedup_vs_compile
    if b64 and b64.fused_ms is not None:
        out["hbm_fraction_b64"] = b64.achieved_bytes_per_s / b64.ceilings_copy_bytes_per_s
    return {k: Target(v, TARGETS[k], v is not None and v >= TARGETS[k]) for k, v in out.items()}


def budget_speedups(rows: list[OpRow]) -> list[BudgetSpeedup]:
    """:class:`BudgetSpeedup` of every row with a text budget whose twin without one ran too."""
    twin_key = lambda shape: dataclasses.replace(shape, name="", text_budget=None)  # noqa: E731
    plain = {twin_key(r.shape): r for r in rows if r.shape.text_budget is None}
    out = []
    for row in rows:
        twin = plain.get(twin_key(row.shape))
        if row.shape.text_budget is None or twin is None:
            continue
        ratios = {}
        for impl in IMPLEMENTATIONS:
            without, with_ = getattr(twin, f"{impl}_ms_rounds"), getattr(row, f"{impl}_ms_rounds")
            if without is not None and with_ is not None:
                each = [a / b for a, b in zip(without, with_)]
                ratios[f"{impl}_speedup"], ratios[f"{impl}_speedup_rounds"] = statistics.median(each), each
        out.append(BudgetSpeedup(twin.shape.name, row.shape.name, twin.flops / row.flops, **ratios))
    return out


def run(plan: OpPlan, progress: Optional[Progress] = None) -> OpBenchResult:
    """Every shape of ``plan`` timed once per round, the shapes in turn; each time the median over
    the rounds: on a shared machine a load that comes and goes then falls on every shape alike, not
    on whichever ran during it."""
    ceilings = device_ceilings(plan.device)
    by_round: list[list[Times]] = []
    for number in range(1, plan.rounds + 1):
        prefix = f"round {number}/{plan.rounds}, " if plan.rounds > 1 else ""
        say = (lambda message, prefix=prefix: progress(prefix + message)) if progress else None
        by_round.append([time_shape(shape, plan.device, plan.dtype, with_compile=plan.with_compile, progress=say)
                         for shape in plan.shapes])
    rows = [OpRow.of(shape, plan.dtype, list(rounds), ceilings, input_sets(shape, plan.device, plan.dtype))
            for shape, rounds in zip(plan.shapes, zip(*by_round))]
    return OpBenchResult(Environment.here(plan.device), ceilings, plan.rounds, rows, check_targets(rows),
                  budget_speedups(rows))


# --- output ------------------------------------------------------------------------------------------

def legend(ceilings: Ceilings) -> list[str]:
    """What the table's derived columns mean, with this run's measured ceilings."""
    return ["MB: the bytes the op must move (with a text budget, its sketch step's too); GFLOP: the registered formula",
            "floor ms: the least time the op could take here, the larger of bytes / copy bandwidth and FLOPs / matrix",
            (f"          rate, both measured on this device ({ceilings.copy_bytes_per_s / 1e9:.1f} GB/s copy, "
             f"{ceilings.matmul_flops_per_s / 1e12:.2f} TFLOP/s "
             f"{ceilings.matmul_dtype.removeprefix('torch.')} matmul)"),
            "%floor: floor ms / the best measured time (fused, else compile, else eager); 100% = at the floor",
            "x eager, x comp: eager and compile time / fused time; graph: the fused op replayed in a CUDA graph"]


def table(result: OpBenchResult) -> str:
    """The rows as a text table, a legend of the derived columns, the text budget's speedups and the targets."""
    env = result.environment
    head = (f"{'shape':<18}{'MB':>8}{'GFLOP':>8}{'floor ms':>10}{'eager ms':>10}{'compile':>10}{'fused':>10}"
            f"{'graph':>10}{'x eager':>9}{'x comp':>8}{'%floor':>8}")
    lines = [f"{env.device}  torch {env.torch}  triton {env.triton}  {env.date}", head]
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in result.rows:
        lines.append(f"{r.shape.name:<18}{r.bytes / 1e6:>8.1f}{r.flops / 1e9:>8.2f}{fmt(r.floor_ms):>10}"
                     f"{fmt(r.eager_ms):>10}{fmt(r.compile_ms):>10}{fmt(r.fused_ms):>10}"
                     f"{fmt(r.fused_graph_ms):>10}{fmt(r.speedup_vs_eager, 1):>9}"
                     f"{fmt(r.speedup_vs_compile, 1):>8}{100 * r.fraction_of_floor:>7.0f}%")
    lines += legend(result.ceilings)
    for b in result.budget_speedups:
        measured = ", ".join(f"{impl} {getattr(b, f'{impl}_speedup'):.2f}x" for impl in IMPLEMENTATIONS
                             if getattr(b, f"{impl}_speedup") is not None)
        lines.append(f"text budget: {b.without} / {b.with_}: {b.flops_ratio:.1f}x fewer FLOPs counted; "
                     f"measured time ratio {measured}")
    for name, t in result.targets.items():
        lines.append(f"target {name}: measured {fmt(t.measured, 2)} vs {t.target} -> {'met' if t.met else 'NOT met'}")
    return "\n".join(lines)


def figure(result: OpBenchResult) -> Figure:
    """Each shape's measured times (bars, log scale) against its floor (a black mark)."""
    from matplotlib.figure import Figure

    rows = result.rows
    impls = [impl for impl in ("eager", "compile", "fused", "fused_graph")
             if any(getattr(r, f"{impl}_ms") is not None for r in rows)]
    fig = Figure(figsize=(8, 2.2 + 0.4 * len(rows) * len(impls)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    height = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        offsets = [y + (i - (len(impls) - 1) / 2) * height for y in range(len(rows))]
        ax.barh(offsets, [getattr(r, f"{impl}_ms") or 0.0 for r in rows], height, label=LABELS[impl])
    ax.scatter([r.floor_ms for r in rows], range(len(rows)), marker="|", s=400, color="black", zorder=3,
               label="floor (bytes / bandwidth, FLOPs / rate)")
    ax.set_yticks(range(len(rows)), [r.shape.name for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms per call")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncols=len(impls) + 1)
    ax.set_title(f"DeSAP op, {rows[0].dtype}, on {result.environment.device}", fontsize=10)
    return fig
