"""``desap bench op``: the benchmark code runs and reports what it promises (no timing assertions)."""
import json

import torch

from desap_ops.cli import bench_op
from desap_ops.cli.main import main
from desap_ops.cli.report import save_json


def test_traffic_counts_llava_shape():
    shape = bench_op.SHAPES[0]
    counts = bench_op.traffic(shape, torch.bfloat16)
    attn = 576 * 4096 * 2
    assert counts["bytes"] > attn and counts["bytes"] < 2 * attn
    assert counts["flops"] == 2 * 576 * 64 * 4096 + 2 * 576 * 64 * 1024 + 576 * 1024


def test_cpu_run_writes_the_documented_fields(tmp_path):
    result = bench_op.run("cpu", torch.float32, bench_op.TINY_SHAPES, with_compile=False)
    path = tmp_path / "op.json"
    save_json(result, path)
    saved = json.loads(path.read_text())
    assert {"date", "device", "torch", "triton"} <= saved["environment"].keys()
    assert {"copy_bytes_per_s", "matmul_flops_per_s"} <= saved["ceilings"].keys()
    (row,) = saved["rows"]
    for field in ("bytes", "flops", "floor_ms", "eager_ms", "fraction_of_floor"):
        assert row[field] > 0, field
    table = bench_op.format_table(result).splitlines()
    assert table[2].startswith("tiny")
    # a legend under the rows explains the derived columns, with this run's measured ceilings
    legend = "\n".join(table[3:])
    assert table[3].startswith("floor ms: ") and "%floor: floor ms / the best measured time" in legend
    assert f"{saved['ceilings']['copy_bytes_per_s'] / 1e9:.1f} GB/s copy" in legend


def test_implementations_agree_on_what_they_keep():
    shape = bench_op.TINY_SHAPES[0]
    inputs = bench_op.make_inputs(shape, "cpu", torch.float32)
    impls = bench_op.implementations(shape.keep, with_compile=False)
    assert set(impls) == {"eager", "fused"}
    with torch.no_grad():
        eager, fused = (impls[name](*inputs) for name in ("eager", "fused"))
    assert torch.equal(eager.indices, fused.indices)


def test_bench_op_on_cpu_writes_json(tmp_path):
    out = tmp_path / "op.json"
    assert main(["bench", "op", "--device", "cpu", "--tiny", "--no-compile", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["shape"]["name"] == "tiny" and saved["rows"][0]["eager_ms"] > 0


def test_bench_op_defaults_to_the_device_that_exists(tmp_path, monkeypatch):
    """No --device: cuda where a GPU is visible, else cpu (so it runs on this machine whatever it has)."""
    used = []
    measure = bench_op.device_ceilings
    monkeypatch.setattr(bench_op, "device_ceilings", lambda device: used.append(device) or measure(device))
    assert main(["bench", "op", "--tiny", "--no-compile", "--out", str(tmp_path / "op.json")]) == 0
    assert used == ["cuda" if torch.cuda.is_available() else "cpu"]


def test_the_default_device_is_decided_when_the_command_runs(monkeypatch):
    for visible, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda visible=visible: visible)
        assert bench_op.default_device() == expected
