"""One setting of ``desap bench vllm`` inside vLLM: run as ``python -m
desap_ops.benchmarks.vllm.offline_worker SPEC RESULT`` by :func:`.offline.run_setting`, one fresh
process per setting (vLLM spawns processes, hence the ``__main__`` guard). With the serve client,
the only modules of the benches that import vLLM."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from ..skeleton import from_json, to_json
from .offline import WARMUP_REQUESTS, RoundRecord, SettingRun, WorkerSpec, images, prompts
from .processes import say_mark as _say


def _counters(llm) -> dict:
    """vLLM's counters and histogram sums, by name (labels summed)."""
    values: dict = {}
    for metric in llm.get_metrics():
        kind = type(metric).__name__
        if kind == "Counter":
            values[metric.name] = values.get(metric.name, 0) + metric.value
        elif kind == "Histogram":
            values[metric.name + ":sum"] = values.get(metric.name + ":sum", 0.0) + metric.sum
            values[metric.name + ":count"] = values.get(metric.name + ":count", 0) + metric.count
    return values


COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_hits", "vllm:mm_cache_queries",
            "vllm:mm_cache_hits", "vllm:num_preemptions", "vllm:time_to_first_token_seconds:sum",
            "vllm:time_to_first_token_seconds:count")


class PeakUsage:
    """The highest ``SchedulerStats.kv_cache_usage`` (the value behind ``vllm:kv_cache_usage_perc``)
    over the engine steps since :meth:`reset`, read where the engine hands each step's stats to its
    stat loggers."""

    def __init__(self, llm):
        self.peak: Optional[float] = None
        manager = getattr(llm.llm_engine, "logger_manager", None)
        if manager is None or not hasattr(manager, "record"):
            self.available = False
            return
        self.available = True
        record = manager.record

        def wrapped(*args, **kwargs):
            stats = kwargs.get("scheduler_stats", args[0] if args else None)
            usage = getattr(stats, "kv_cache_usage", None)
            if usage is not None:
                self.peak = usage if self.peak is None else max(self.peak, usage)
            return record(*args, **kwargs)

        manager.record = wrapped

    def reset(self) -> None:
        self.peak = 0.0 if self.available else None


def worker(spec: WorkerSpec) -> SettingRun:
    """Run one setting and return its raw measurements."""
    from vllm import LLM, SamplingParams

    overrides = {} if spec.hf_overrides is None else {"hf_overrides": spec.hf_overrides}
    _say("starting the engine")
    start = time.perf_counter()
    llm = LLM(model=spec.folder, dtype=spec.dtype, max_model_len=spec.max_model_len, enforce_eager=True,
              seed=0, kv_cache_memory_bytes=spec.kv_cache_bytes, enable_prefix_caching=False,
              disable_log_stats=False, limit_mm_per_prompt={"image": 1}, **overrides)
    engine_start_s = time.perf_counter() - start
    config = llm.llm_engine.vllm_config
    cache, scheduler = config.cache_config, config.scheduler_config
    params = SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, ignore_eos=True)
    texts = prompts(spec.requests, spec.model)
    peak = PeakUsage(llm)

    def batch(round_: int, count: int) -> list[dict]:
        return [{"prompt": text, "multi_modal_data": {"image": image}}
                for text, image in zip(texts[:count], images(round_, count, spec.model))]

    warm = batch(-1, min(WARMUP_REQUESTS, spec.requests))
    _say(f"warm-up batch ({len(warm)} requests)")
    start = time.perf_counter()
    llm.generate(warm, params, use_tqdm=False)
    warmup_s = time.perf_counter() - start
    rounds = []
    for round_ in range(spec.repeats):
        requests = batch(round_, spec.requests)   # built before the clock starts
        _say(f"round {round_ + 1} of {spec.repeats}")
        before = _counters(llm)
        peak.reset()
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        wall_s = time.perf_counter() - start
        after = _counters(llm)
        metrics = [o.metrics for o in outputs]
        rounds.append(RoundRecord(
            wall_s=wall_s,
            prompt_tokens=[len(o.prompt_token_ids) for o in outputs],
            output_tokens=[len(o.outputs[0].token_ids) for o in outputs],
            ttft_s=[m.first_token_latency if m is not None else None for m in metrics],
            prefill_s=[m.first_token_ts - m.scheduled_ts if m is not None else None for m in metrics],
            peak_kv_usage=peak.peak,
            counters={name: after.get(name, 0) - before.get(name, 0) for name in COUNTERS if name in after}))
    return SettingRun(keep=spec.keep, engine_start_s=engine_start_s, warmup_s=warmup_s, warmup_requests=len(warm),
                      block_size=cache.block_size, num_gpu_blocks=cache.num_gpu_blocks,
                      max_num_batched_tokens=scheduler.max_num_batched_tokens, max_num_seqs=scheduler.max_num_seqs,
                      chunked_prefill=getattr(scheduler, "enable_chunked_prefill", None),
                      prefix_caching=cache.enable_prefix_caching, rounds=rounds)


def _worker_main(spec_path: str, result_path: str) -> None:
    spec = from_json(WorkerSpec, json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(to_json(worker(spec))))


if __name__ == "__main__":   # a worker process (vLLM spawns processes: the guard is needed)
    _worker_main(*sys.argv[1:3])
