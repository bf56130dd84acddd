"""The result of ``bench/processor_normalization.py``: what vLLM's Qwen multimodal processor costs per
image, and the pixel bytes it ships, with the pixels normalized on the CPU or on the device. Written
and read back with ``skeleton.write_json`` / ``skeleton.from_json``, as every file in bench/results."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ProcessorCostRow:
    """One setting at one image size: the time per image over the rounds and the pixels shipped."""
    setting: str                  # "cpu-normalize (before)" or "device-normalize (after)"
    mm_device_do_normalize: bool
    size: int                     # the square image's side, in pixels
    median_ms: float
    times_ms: list[float]         # one per round, in round order
    pixel_dtype: str
    pixel_shape: list[int]
    pixel_bytes: int


@dataclass
class ProcessorCostResult:
    """Every row of one run, with where and how it ran."""
    what: str
    cpu: str
    logical_cpus: int
    torch_threads: int
    loadavg_before: str           # /proc/loadavg as read before and after the timed rounds
    loadavg_after: str
    versions: dict[str, str]
    model_dtype: str
    rounds: int
    results: list[ProcessorCostRow]
