"""The benchmark code runs and reports what it promises (no timing assertions)."""
import json

import torch

from desap_ops import benchmarking


def test_traffic_counts_llava_shape():
    shape = benchmarking.SHAPES[0]
    counts = benchmarking.traffic(shape, torch.bfloat16)
    attn = 576 * 4096 * 2
    assert counts["bytes"] > attn and counts["bytes"] < 2 * attn
    assert counts["flops"] == 2 * 576 * 64 * 4096 + 2 * 576 * 64 * 1024 + 576 * 1024


def test_cpu_run_writes_the_documented_fields(tmp_path):
    result = benchmarking.run("cpu", torch.float32, benchmarking.TINY_SHAPES, with_compile=False)
    path = tmp_path / "op.json"
    benchmarking.save(result, path)
    saved = json.loads(path.read_text())
    assert {"date", "device", "torch", "triton"} <= saved["environment"].keys()
    assert {"copy_bytes_per_s", "matmul_flops_per_s"} <= saved["ceilings"].keys()
    (row,) = saved["rows"]
    for field in ("bytes", "flops", "floor_ms", "eager_ms", "fraction_of_floor"):
        assert row[field] > 0, field
    assert "tiny" in benchmarking.format_table(result)
