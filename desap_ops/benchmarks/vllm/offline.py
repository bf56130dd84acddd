"""``desap bench vllm``: offline serving throughput of vLLM with and without DeSAP.

One batch of requests (one image each: distinct random images, varied prompts written in
:data:`desap_ops.testing.checkpoint.WORDS`) goes through ``vllm.LLM.generate`` for each setting: the
full model (no ``hf_overrides``), then DeSAP at each budget (``hf_overrides={"desap": {"keep": K,
"task_ratio": R}}``). ``hf_overrides`` is fixed per engine, so each setting runs in its own
subprocess with its own engine, one after another, all from one command; the ratios are taken
against the full model of the same run.

In each subprocess: the engine starts (timed apart), a warm-up batch runs (the first
:data:`WARMUP_REQUESTS` prompts on images of their own), then ``--repeats`` timed rounds of the
whole batch. Every round has fresh images (the same images for every setting), and prefix caching
is off, so no round reuses the encoder, multimodal-processor or prefix cache of an earlier one;
vLLM's own counters of cache hits and preemptions are stored to show it. Greedy sampling with
``ignore_eos``, so every request yields exactly ``--max-tokens`` tokens in every setting.

What is reported per setting (medians over the timed rounds):

- requests/s: requests over the wall time of ``LLM.generate`` on the batch (input processing,
  vision tower, DeSAP, prefill and decode);
- prefill tokens: the sum of ``len(RequestOutput.prompt_token_ids)`` over the batch, the prompt
  tokens vLLM scheduled (with DeSAP an image brings K placeholders instead of N); vLLM's counter
  ``vllm:prompt_tokens`` over the round is stored beside it as a check;
- KV-cache blocks: *computed*, not read from vLLM: ``ceil((prompt + output tokens) / block_size)``
  per request with the engine's block size (``cache_config.block_size``), summed over the batch,
  the blocks each request holds when it finishes. vLLM exposes no per-request block count: its
  metric ``vllm:kv_cache_usage_perc`` is a gauge (usage now, 0 once the batch is done). Its per-step
  value (``SchedulerStats.kv_cache_usage``, what the gauge is set from) is read at every engine step
  and its peak times the engine's block count is stored too, as "peak KV blocks in use";
- time to first token: ``RequestOutput.metrics.first_token_latency`` (vLLM 0.32 fills it when
  ``disable_log_stats=False``): from the request's arrival to its first token, so in an offline batch
  it includes the wait behind the requests scheduled before it; the median over the batch.

The models are :data:`desap_ops.testing.vllm_models.MODELS` (LLaVA-1.5 and Qwen2.5-VL layouts).
Real model shapes carry random weights: the speeds hold for any weights, the generated words mean
nothing. The checkpoint folder is written once under :func:`.checkpoints.cache_root` and reused.
What this bench shares with ``desap bench serve`` is in the modules beside it: the settings, the
engine's sizing, the checkpoints, the processes and the record of the machine.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from desap_ops.testing.vllm_models import MODELS, prompt

from ..arguments import check_at_least_one, parse_budgets, parse_task_ratio
from ..machine import DTYPES, LoadAverage, dtype_name, load_average
from ..skeleton import Progress, command_line, flattened, from_json, to_json
from .checkpoints import checkpoint_folder
from .processes import new_log_folder, run_logged
from .record import EngineBinding, VllmEnvironment, machine_title
from .settings import Setting, check_model, check_vllm, settings
from .sizing import PROMPT_MARGIN, ModelShape, check_engine_memory, kv_cache_bytes, max_model_len, model_shape

if TYPE_CHECKING:   # matplotlib is imported when a plot is asked for
    from matplotlib.figure import Figure

COMMAND = "bench vllm"
WARMUP_REQUESTS = 4
# the module that runs one setting's engine: started by name, never imported here, so nothing the
# command line imports needs vLLM
WORKER = "desap_ops.benchmarks.vllm.offline_worker"
# The questions, in checkpoint.WORDS (the checkpoint's tokenizer knows no other word), 3 to 21 words.
QUESTIONS = (
    "what is in the image ?",
    "describe this photo",
    "what is the color of the sky ?",
    "how many people are there in the picture ?",
    "read the text of the sign",
    "where is the dog ?",
    "is there a cat on the left and a dog on the right ?",
    "count the red and blue car in the image",
    "show me the small object in the top left corner of the photo",
    "find the face and the hand of the person in the center of the image ?",
    "what color is the large tree on the right of the picture and how many green car are there ?",
    "describe the person on the left and the dog in the center and the sign on the right of this photo",
)


# --- the plan ----------------------------------------------------------------------------------------

@dataclass
class OfflinePlan:
    model: str
    settings: list[Setting]
    requests: int
    max_tokens: int
    repeats: int
    dtype: str
    task_ratio: Union[float, str]
    shape: ModelShape
    max_model_len: int
    kv_cache_bytes: int      # room for the whole batch at once in every setting (so none is preempted)
    command: str = ""


def check(args: Namespace) -> None:
    """The checks that need no model config, then vLLM importable here (UsageError)."""
    check_model(args.model)
    check_at_least_one(requests=args.requests, max_tokens=args.max_tokens, repeats=args.repeats)
    parse_task_ratio(args.task_ratio)
    parse_budgets(args.keep, full=True)
    check_vllm(COMMAND)


def plan(args: Namespace) -> OfflinePlan:
    """The run from checked arguments and the model's config: UsageError for a budget above the
    model's image tokens, an output that does not fit its positions, or an engine too large for the
    memory."""
    shape = model_shape(args.model)
    runs = settings(parse_budgets(args.keep, full=True), shape.image_tokens, args.model)
    max_len = max_model_len(shape, args.model, PROMPT_MARGIN, args.max_tokens)
    cache = kv_cache_bytes(shape, args.requests, max_len)
    check_engine_memory(COMMAND, args.model, shape, cache, args.requests)
    return OfflinePlan(model=args.model, settings=runs, requests=args.requests, max_tokens=args.max_tokens,
                       repeats=args.repeats, dtype=args.dtype, task_ratio=parse_task_ratio(args.task_ratio),
                       shape=shape, max_model_len=max_len, kv_cache_bytes=cache, command=typed_command(args))


def typed_command(args: Namespace) -> str:
    """The command as typed when ``desap`` runs from a shell, else the same settings written out."""
    return command_line(COMMAND, [
        ("--model", args.model), ("--requests", args.requests), ("--max-tokens", args.max_tokens),
        ("--repeats", args.repeats), ("--dtype", args.dtype), ("--task-ratio", args.task_ratio),
        ("--keep", args.keep), ("--out", args.out), ("--plot", args.plot)])


# --- the requests ------------------------------------------------------------------------------------

def prompts(requests: int, model: str = "tiny") -> list[str]:
    """One prompt per request in ``model``'s form, the questions in turn."""
    return [prompt(MODELS[model], QUESTIONS[i % len(QUESTIONS)]) for i in range(requests)]


def images(round_: int, count: int, model: str = "tiny", seed: int = 0) -> list:
    """``count`` distinct random RGB images for round ``round_`` (-1: the warm-up), the same for every
    setting: 300 to 500 pixels a side where the model resizes every image to its tower's size, the
    model's square size where an image's tokens follow its size (Qwen)."""
    import numpy as np
    from PIL import Image

    spec = MODELS[model]
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, round_ + 1, i])
        if spec.kind.tokens_follow_size:
            height = width = spec.image_side
        else:
            height, width = (int(v) for v in rng.integers(300, 501, size=2))
        out.append(Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)))
    return out


# --- one setting in its own process ------------------------------------------------------------------

@dataclass
class WorkerSpec:
    """What :mod:`.offline_worker` runs: one engine, its batch and rounds."""
    keep: Optional[int]
    hf_overrides: Optional[dict]
    model: str
    folder: str
    dtype: str               # vLLM's name: bfloat16, float32
    max_model_len: int
    kv_cache_bytes: int
    requests: int
    max_tokens: int
    repeats: int


@dataclass
class RoundRecord:
    """One timed round of a setting, per request where a list."""
    wall_s: float                        # LLM.generate on the whole batch
    prompt_tokens: list[int]             # len(RequestOutput.prompt_token_ids)
    output_tokens: list[int]
    ttft_s: list[Optional[float]]        # RequestOutput.metrics.first_token_latency
    prefill_s: list[Optional[float]]     # first token - scheduled
    peak_kv_usage: Optional[float]       # the highest SchedulerStats.kv_cache_usage over the round's steps
    counters: dict[str, float]           # vLLM's counters over the round, by their names


@dataclass
class SettingRun:
    """What one setting's process measured, with the load and the engine's binding around it."""
    keep: Optional[int]
    engine_start_s: float
    warmup_s: float
    warmup_requests: int
    block_size: int
    num_gpu_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    chunked_prefill: Optional[bool]
    prefix_caching: bool
    rounds: list[RoundRecord]
    load_average: Optional[LoadAverage] = None
    binding: Optional[EngineBinding] = None


def run_setting(plan: OfflinePlan, setting: Setting, folder: Path, logs: Path, say: Progress) -> SettingRun:
    """One setting in a fresh ``python -m desap_ops.benchmarks.vllm.offline_worker`` process; its
    output goes to a log file, its progress lines to ``say``."""
    spec = WorkerSpec(keep=setting.keep, hf_overrides=setting.hf_overrides(plan.task_ratio), model=plan.model,
                      folder=str(folder), dtype=dtype_name(DTYPES[plan.dtype]), max_model_len=plan.max_model_len,
                      kv_cache_bytes=plan.kv_cache_bytes, requests=plan.requests, max_tokens=plan.max_tokens,
                      repeats=plan.repeats)
    name = setting.name.replace("=", "")
    spec_path, result_path, log_path = logs / f"{name}.spec.json", logs / f"{name}.json", logs / f"{name}.log"
    spec_path.write_text(json.dumps(to_json(spec)))
    before = load_average()
    log = run_logged([sys.executable, "-m", WORKER, str(spec_path), str(result_path)], log_path,
                     f"setting {setting.name}", say)
    measured = from_json(SettingRun, json.loads(result_path.read_text()))
    measured.load_average, measured.binding = LoadAverage(before, load_average()), EngineBinding.from_log(log)
    return measured


# --- the result --------------------------------------------------------------------------------------

@dataclass
class OfflineRow:
    """One setting: medians over the timed rounds (see the module docstring), then its ratios
    against the full model's row."""
    setting: str
    keep: Optional[int]
    requests: int
    requests_per_s: float
    output_tokens_per_s: float
    wall_s: float
    prefill_tokens: int                       # prompt tokens vLLM scheduled for the batch
    prefill_tokens_same_every_round: bool
    prefill_tokens_vllm_counter: list[Optional[float]]   # vllm:prompt_tokens per round, the check
    kv_tokens: int
    kv_blocks: int                            # computed: ceil((prompt + output) / block size), summed
    peak_kv_blocks_in_use: Optional[int]
    ttft_ms: Optional[float]
    prefill_time_ms: Optional[float]
    engine_start_s: float
    throughput_x: Optional[float] = None              # requests/s / the full model's
    prefill_tokens_reduction: Optional[float] = None  # the full model's / this
    kv_blocks_reduction: Optional[float] = None
    ttft_speedup: Optional[float] = None

    @classmethod
    def of(cls, run: SettingRun) -> "OfflineRow":
        rounds = run.rounds
        first = rounds[0]
        prompt_tokens = [sum(r.prompt_tokens) for r in rounds]
        kv_tokens = [p + o for p, o in zip(first.prompt_tokens, first.output_tokens)]
        requests = len(first.prompt_tokens)
        ttft = [statistics.median(t for t in r.ttft_s if t is not None) * 1e3 for r in rounds
                if any(t is not None for t in r.ttft_s)]
        peaks = [r.peak_kv_usage for r in rounds if r.peak_kv_usage is not None]
        prefill = [statistics.median(r.prefill_s) * 1e3 for r in rounds if None not in r.prefill_s]
        return cls(setting=Setting(run.keep).name, keep=run.keep, requests=requests,
                   requests_per_s=statistics.median(requests / r.wall_s for r in rounds),
                   output_tokens_per_s=statistics.median(sum(r.output_tokens) / r.wall_s for r in rounds),
                   wall_s=statistics.median(r.wall_s for r in rounds),
                   prefill_tokens=prompt_tokens[0], prefill_tokens_same_every_round=len(set(prompt_tokens)) == 1,
                   prefill_tokens_vllm_counter=[r.counters.get("vllm:prompt_tokens") for r in rounds],
                   kv_tokens=sum(kv_tokens), kv_blocks=sum(math.ceil(t / run.block_size) for t in kv_tokens),
                   peak_kv_blocks_in_use=(round(statistics.median(peaks) * (run.num_gpu_blocks - 1))
                                          if peaks else None),
                   ttft_ms=statistics.median(ttft) if ttft else None,
                   prefill_time_ms=statistics.median(prefill) if prefill else None,
                   engine_start_s=run.engine_start_s)

    def compare(self, full: "OfflineRow") -> None:
        """This row's ratios against the full model's row of the same run."""
        self.throughput_x = self.requests_per_s / full.requests_per_s
        self.prefill_tokens_reduction = full.prefill_tokens / self.prefill_tokens
        self.kv_blocks_reduction = full.kv_blocks / self.kv_blocks
        self.ttft_speedup = full.ttft_ms / self.ttft_ms if full.ttft_ms and self.ttft_ms else None


@dataclass
class OfflineEngine:
    """The engine's settings, the same in every setting's process (the first one's as read)."""
    max_model_len: int
    kv_cache_memory_bytes: int
    block_size: int
    num_gpu_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    chunked_prefill: Optional[bool]
    prefix_caching: bool
    enforce_eager: bool
    sampling: str
    binding: EngineBinding = flattened()


@dataclass
class OfflineResult:
    environment: VllmEnvironment
    command: str
    model: str
    weights: str
    checkpoint: str
    dtype: str
    requests: int
    max_tokens: int
    repeats: int
    warmup_requests: int
    task_ratio: Union[float, str]
    image_tokens: int
    prompts: list[str]
    engine: OfflineEngine
    rows: list[OfflineRow]
    raw: list[SettingRun]
    logs: str


def run(plan: OfflinePlan, progress: Optional[Progress] = None) -> OfflineResult:
    """Every setting of ``plan`` in turn, each in its own process."""
    say = progress or (lambda _: None)
    folder = checkpoint_folder(plan.model, say)
    logs = new_log_folder(COMMAND, say)
    raws = [run_setting(plan, setting, folder, logs, say) for setting in plan.settings]
    rows = [OfflineRow.of(raw) for raw in raws]
    for row in rows:
        row.compare(rows[0])
    first = raws[0]
    engine = OfflineEngine(max_model_len=plan.max_model_len, kv_cache_memory_bytes=plan.kv_cache_bytes,
                           block_size=first.block_size, num_gpu_blocks=first.num_gpu_blocks,
                           max_num_batched_tokens=first.max_num_batched_tokens, max_num_seqs=first.max_num_seqs,
                           chunked_prefill=first.chunked_prefill, prefix_caching=first.prefix_caching,
                           enforce_eager=True, sampling="greedy, ignore_eos", binding=first.binding)
    return OfflineResult(
        environment=VllmEnvironment.here(), command=plan.command, model=plan.model, weights="random",
        checkpoint=str(folder), dtype=plan.dtype, requests=plan.requests, max_tokens=plan.max_tokens,
        repeats=plan.repeats, warmup_requests=first.warmup_requests, task_ratio=plan.task_ratio,
        image_tokens=plan.shape.image_tokens, prompts=prompts(plan.requests, plan.model), engine=engine,
        rows=rows, raw=raws, logs=str(logs))


# --- output ------------------------------------------------------------------------------------------

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def header(result: OfflineResult) -> str:
    env = result.environment
    return (f"{machine_title(env, result.engine.binding)}; offline, {result.model}, {result.weights} weights, "
            f"{result.dtype}; {result.requests} requests x 1 image ({result.image_tokens} tokens), "
            f"{result.max_tokens} output tokens each; medians of {result.repeats} timed rounds after a "
            f"{result.warmup_requests}-request warm-up; block size {result.engine.block_size}; torch {env.torch}, "
            f"{env.date}")


def table(result: OfflineResult) -> str:
    """The result as text: a header and one line per setting, ratios against the full model."""
    lines = [header(result),
             (f"{'setting':>10}{'req/s':>9}{'x':>7}{'prefill tok':>13}{'/':>7}{'KV blocks':>11}{'/':>7}"
              f"{'peak KV':>9}{'TTFT ms':>10}{'/':>7}{'out tok/s':>11}")]
    for r in result.rows:
        lines.append(f"{r.setting:>10}{r.requests_per_s:>9.3f}{r.throughput_x:>7.2f}{r.prefill_tokens:>13}"
                     f"{r.prefill_tokens_reduction:>7.2f}{r.kv_blocks:>11}{r.kv_blocks_reduction:>7.2f}"
                     f"{_fmt(r.peak_kv_blocks_in_use, 'd'):>9}{_fmt(r.ttft_ms, '.0f'):>10}"
                     f"{_fmt(r.ttft_speedup, '.2f'):>7}{r.output_tokens_per_s:>11.2f}")
    lines.append("x: throughput / full; / : full / this (prefill tokens, KV blocks, TTFT); KV blocks: computed, "
                 "ceil((prompt + output) / block size) per request, summed; peak KV: blocks in use at the busiest "
                 "engine step (vLLM's kv_cache_usage); TTFT: RequestOutput.metrics.first_token_latency, median over "
                 "the batch (includes the wait behind earlier requests)")
    return "\n".join(lines)


def figure(result: OfflineResult) -> Figure:
    """Requests/s per setting (left) and the ratios against the full model (right)."""
    from matplotlib.figure import Figure

    rows = result.rows
    names = [r.setting for r in rows]
    fig = Figure(figsize=(11, 4.8), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    bars = left.bar(names, [r.requests_per_s for r in rows], color=["#888888"] + ["#3a7ebf"] * (len(rows) - 1))
    left.bar_label(bars, labels=[f"{r.requests_per_s:.3f}" for r in rows], fontsize=9)
    left.set_ylabel("throughput (requests / s)")
    left.set_xlabel(f"setting (image tokens kept of {result.image_tokens})")
    left.set_title("vLLM offline throughput", fontsize=10)
    left.margins(y=0.15)
    x = list(range(len(rows)))
    series = (("throughput_x", "o-", "throughput (requests/s, x full)"),
              ("prefill_tokens_reduction", "s--", "prefill tokens scheduled (full / this)"),
              ("kv_blocks_reduction", "^:", "KV-cache blocks, computed (full / this)"),
              ("ttft_speedup", "D-.", "time to first token (full / this)"))
    for attribute, style, label in series:
        values = [getattr(r, attribute) for r in rows]
        if None not in values:
            right.plot(x, values, style, label=label)
            if attribute == "throughput_x":   # the headline number, written at each point
                for i, value in enumerate(values[1:], start=1):
                    right.annotate(f"{value:.2f}x", (i, value), textcoords="offset points", xytext=(0, -14),
                                   ha="center", fontsize=8, color="C0")
    right.set_xticks(x, names)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_ylabel("ratio against the full model (x)")
    right.set_xlabel(f"setting (image tokens kept of {result.image_tokens})")
    right.set_title("DeSAP against the full model, same run", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{result.model} ({result.weights} weights, {result.dtype}); "
                 f"{machine_title(result.environment, result.engine.binding)}\n{result.requests} requests, "
                 f"{result.max_tokens} output tokens, median of {result.repeats} rounds", fontsize=9)
    return fig
