"""What both benchmarks share: dtype names, the median timer, the environment record, JSON output."""
from __future__ import annotations

import datetime
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


def environment(device: Union[str, torch.device]) -> dict:
    """Date (UTC), device name, torch, python and triton versions, stored with every result."""
    dev = torch.device(device)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def save_json(result: dict, path: Union[str, os.PathLike]) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
