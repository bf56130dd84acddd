"""The client of ``desap bench serve``: vLLM's own ``vllm bench serve`` against one running server,
once per concurrency level, with the server's metrics read around each level. Run as ``python -m
desap_ops.benchmarks.vllm.serve_client SPEC RESULT`` by :func:`.serve_server.run_setting` (SPEC: a
:class:`.serve_records.ClientSpec`; RESULT: a list of :class:`.serve_records.LevelRecord`); vLLM's benchmark runs in
this process (its ``main``, parsed from the same arguments the command takes) so that vLLM is
imported once per setting. The only module of ``bench serve`` that imports vLLM."""
from __future__ import annotations

import json
import shlex
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Optional

from ..machine import LoadAverage, load_average
from ..skeleton import from_json, to_json
from .processes import say_mark
from .serve_records import ClientSpec, LevelRecord

KV_USAGE = "vllm:kv_cache_usage_perc"
COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
            "vllm:request_success_total", "vllm:prefix_cache_hits_total")
POLL_S = 0.2


def read_metrics(url: str) -> dict[str, float]:
    """The server's Prometheus metrics by name, each summed over its labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


class PeakKvUsage:
    """The highest ``vllm:kv_cache_usage_perc`` (a fraction of the cache) polled every :data:`POLL_S`
    seconds while the ``with`` block runs."""

    def __init__(self, url: str):
        self.url, self.peak, self.samples = url, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                usage = read_metrics(self.url).get(KV_USAGE)
            except OSError:   # a busy server may miss a poll: the next one counts
                usage = None
            if usage is not None:
                self.peak, self.samples = max(self.peak, usage), self.samples + 1
            self._stop.wait(POLL_S)

    def __enter__(self) -> "PeakKvUsage":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench_arguments(spec: ClientSpec, concurrency: int, prompts: int, seed: int, name: str,
                    method: Optional[str] = None) -> list[str]:
    """``vllm bench serve``'s arguments for one level: random-mm, one square image and ``input_len``
    random words per request, greedy with ignore_eos, every request sent at once; with ``method``
    every request asks for that pruning method (``mm_processor_kwargs``, in its body)."""
    side = spec.image_side
    body = {"mm_processor_kwargs": {"desap": {"method": method}}}
    extra = [] if method is None else ["--extra-body", json.dumps(body)]
    return extra + ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", spec.url,
            "--model", spec.folder, "--tokenizer", spec.folder, "--dataset-name", "random-mm",
            "--random-input-len", str(spec.input_len), "--random-output-len", str(spec.max_tokens),
            "--random-range-ratio", "0", "--random-mm-base-items-per-request", "1",
            "--random-mm-num-mm-items-range-ratio", "0",
            "--random-mm-limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
            "--random-mm-bucket-config", f"{{({side}, {side}, 1): 1.0}}", "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
            "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--disable-tqdm", "--save-result", "--result-dir", spec.result_dir, "--result-filename", name]


def run_bench(argv: list[str]) -> dict:
    """vLLM's ``vllm bench serve`` with ``argv``, in this process; its result."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    return main(parser.parse_args(argv))


KEPT = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
        "total_input_tokens", "total_output_tokens", "median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms",
        "median_tpot_ms", "p99_tpot_ms", "mean_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms",
        "p99_e2el_ms", "max_concurrency", "num_prompts")


def client(spec: ClientSpec) -> list[LevelRecord]:
    """The warm-up, then every level of ``spec`` in turn (then again for each of ``spec.methods``,
    asked for per request); per level what vLLM's benchmark reported, the server's counters over it
    and its peak KV-cache usage."""
    if spec.warmups:
        say_mark(f"warm-up ({spec.warmups} requests)")
        run_bench(bench_arguments(spec, spec.warmups, spec.warmups, 0, f"{spec.name}-warmup.json"))
    levels = []
    for method, level in [(method, level) for method in (None, *spec.methods) for level in spec.levels]:
        tag = "" if method is None else f"-{method}"
        argv = bench_arguments(spec, level.concurrency, level.prompts, level.seed,
                               f"{spec.name}{tag}-c{level.concurrency}.json", method)
        say_mark(f"{f'method {method}, ' if method else ''}concurrency {level.concurrency}, {level.prompts} requests")
        load_before, before = load_average(), read_metrics(spec.url)
        with PeakKvUsage(spec.url) as peak:
            result = run_bench(argv)
        after = read_metrics(spec.url)
        levels.append(LevelRecord(
            concurrency=level.concurrency, prompts=level.prompts, seed=level.seed,
            command=shlex.join(["vllm", "bench", "serve", *argv]), result={key: result.get(key) for key in KEPT},
            metrics={key: after.get(key, 0.0) - before.get(key, 0.0) for key in COUNTERS},
            peak_kv_usage=peak.peak if peak.samples else None, kv_usage_samples=peak.samples,
            load_average=LoadAverage(load_before, load_average()), method=method))
    return levels


if __name__ == "__main__":   # vLLM's benchmark may start processes: the guard is needed
    spec_path, result_path = sys.argv[1:3]
    spec = from_json(ClientSpec, json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(to_json(client(spec))))
