"""What Qwen's saliency signal costs on the CPU against one attention call of the same shape.

The signal (``desap::received_attention``: the attention each patch receives within its image,
averaged over queries and heads) from queries and keys (n, 16, 72), one image of n patches, timed
as the CPU path (``desap_ops.received``: in float32 a matrix product and one fused softmax per block
of queries; in bfloat16 two fused-attention passes with their log-sum-exp) and as the eager reference (a float32 softmax one block of queries at a time, the path before),
against one ``torch.nn.functional.scaled_dot_product_attention`` call on (1, 16, n, 72) queries,
keys and values. Each round times every shape, dtype and implementation once, the
implementations' order rotating from round to round; the medians are over the rounds, and every
round is in the JSON with the machine, torch's threads and the load average before and after.

    PYTHONPATH=$PWD .venv/bin/python bench/received_attention.py --rounds 7 \\
        --out bench/results/received-attention-cpu.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from desap_ops.benchmarks.received_cost import ReceivedCostResult, ReceivedMachine, ReceivedTiming
from desap_ops.benchmarks.skeleton import write_json
from desap_ops.received import received_attention, received_attention_reference

HEADS, HEAD_DIM = 16, 72          # Qwen3-VL's vision tower (1152 wide)
PATCHES = (1024, 4096, 7056)      # 7056: a 1344 x 1344 image in 16-pixel patches
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLEMENTATIONS = ("sdpa", "signal", "signal (eager reference)")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _calls(patches: int, dtype: torch.dtype) -> dict[str, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(patches)
    queries, keys, values = (torch.randn(patches, HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(3))
    boundaries, scale = [0, patches], HEAD_DIM**-0.5
    q, k, v = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (queries, keys, values))
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "signal": lambda: received_attention(queries, keys, boundaries, scale),
        "signal (eager reference)": lambda: received_attention_reference(queries, keys, boundaries, scale),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/results/received-attention-cpu.json"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    load_before = os.getloadavg()
    cases = [(n, name) for n in PATCHES for name in DTYPES]
    calls = {case: _calls(case[0], DTYPES[case[1]]) for case in cases}
    timings = {(n, name, impl): ReceivedTiming(n, name, impl) for n, name in cases for impl in IMPLEMENTATIONS}
    differences = {}
    with torch.inference_mode():
        for case in cases:   # warm-up, and the new path checked against the reference
            new, old = calls[case]["signal"](), calls[case]["signal (eager reference)"]()
            calls[case]["sdpa"]()
            differences[f"{case[0]}/{case[1]}"] = (new - old).abs().max().item()
        for round_index in range(args.rounds):
            order = IMPLEMENTATIONS[round_index % 3:] + IMPLEMENTATIONS[:round_index % 3]
            for case in cases:
                for impl in order:
                    start = time.perf_counter()
                    calls[case][impl]()
                    timings[(*case, impl)].seconds.append(time.perf_counter() - start)
    load_after = os.getloadavg()

    for timing in timings.values():
        timing.median_s = statistics.median(timing.seconds)
    for timing in timings.values():
        timing.ratio_to_sdpa = timing.median_s / timings[(timing.patches, timing.dtype, "sdpa")].median_s
    report = ReceivedCostResult(
        date_utc=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=ReceivedMachine(_cpu_model(), os.cpu_count() or 0, torch.get_num_threads(), torch.__version__,
                        platform.python_version()),
        rounds=args.rounds, heads=HEADS, head_dim=HEAD_DIM, load_before=load_before, load_after=load_after,
        max_abs_difference=differences, timings=list(timings.values()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, args.out)
    for timing in report.timings:
        print(f"{timing.patches:5d} {timing.dtype:9s} {timing.implementation:25s} "
              f"{timing.median_s * 1e3:8.1f} ms  x{timing.ratio_to_sdpa:.2f} of SDPA")
    print(f"load {load_before} -> {load_after}; wrote {args.out}")


if __name__ == "__main__":
    main()
