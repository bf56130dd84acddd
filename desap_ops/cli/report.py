"""What both benchmarks share: dtype names, the median timer, the environment record, JSON output."""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import statistics
import time
from typing import Callable, Union

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def environment(device: Union[str, torch.device]) -> dict:
    """Date (UTC), device name (the GPU, or the CPU model and torch's thread count), torch, python,
    triton and transformers versions, stored with every result."""
    dev = torch.device(device)
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"{cpu_name()}, {torch.get_num_threads()} threads")
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": name, "torch": torch.__version__, "python": platform.python_version()}
    for package in ("triton", "transformers"):
        try:
            info[package] = importlib.import_module(package).__version__
        except ImportError:
            info[package] = None
    return info


def save_json(result: dict, path: Union[str, os.PathLike]) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
