"""The result of ``bench/received_attention.py``: what the received-attention signal
(``desap_ops.received``, Qwen's saliency) costs on the CPU against one attention call of the same
shape. Written and read back with ``skeleton.write_json`` / ``skeleton.from_json``, as every file in
bench/results."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReceivedTiming:
    patches: int
    dtype: str
    implementation: str
    seconds: list[float] = field(default_factory=list)   # one per round, in round order
    median_s: float = 0.0
    ratio_to_sdpa: float = 0.0                             # median / the SDPA median of the same shape and dtype


@dataclass
class ReceivedMachine:
    cpu: str
    cores: int
    torch_threads: int
    torch: str
    python: str


@dataclass
class ReceivedCostResult:
    date_utc: str
    machine: ReceivedMachine
    rounds: int
    heads: int
    head_dim: int
    load_before: tuple[float, float, float]   # os.getloadavg(): 1, 5 and 15 minutes
    load_after: tuple[float, float, float]
    max_abs_difference: dict[str, float]       # new path against the eager reference, per "patches/dtype"
    timings: list[ReceivedTiming]
