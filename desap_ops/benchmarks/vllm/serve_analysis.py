"""``desap bench serve``'s analysis: one :class:`ServeRow` per (setting, concurrency) from vLLM's
client and the server's counters, each compared with the full model and the ideal at the same
concurrency, and whether DeSAP at N/9 meets its target (:class:`ServeTarget`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..machine import LoadAverage
from ..skeleton import optional
from .serve_records import LevelRecord
from .serve_server import ServedSetting
from .settings import Setting, method_setting

TARGET_SHARE = 0.95      # DeSAP at N/9 should reach this share of the ideal's request throughput


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
