"""``desap bench op``: the benchmark code runs and reports what it promises (no timing assertions)."""
import dataclasses
import json

import pytest
import torch

from desap_ops import ops, reference
from desap_ops.benchmarks import op as bench_op
from desap_ops.benchmarks.skeleton import from_json, write_json
from desap_ops.cli.main import main


def test_traffic_counts_llava_shape():
    shape = bench_op.SHAPES[0]
    counts = bench_op.traffic(shape, torch.bfloat16)
    attn = 576 * 4096 * 2
    assert counts.bytes > attn and counts.bytes < 2 * attn
    assert counts.flops == 2 * 576 * 64 * 4096 + 2 * 576 * 64 * 1024 + 576 * 1024


def test_cpu_run_writes_the_documented_fields(tmp_path):
    result = bench_op.run(bench_op.OpPlan("cpu", torch.float32, bench_op.TINY_SHAPES, with_compile=False))
    path = tmp_path / "op.json"
    write_json(result, path)
    saved = json.loads(path.read_text())
    assert from_json(bench_op.OpBenchResult, saved) == result   # the file reads back as the result it was
    assert {"date", "device", "torch", "triton"} <= saved["environment"].keys()
    assert {"copy_bytes_per_s", "matmul_flops_per_s"} <= saved["ceilings"].keys()
    (row,) = saved["rows"]
    assert row["eager_ms_rounds"] == [row["eager_ms"]] and saved["rounds"] == 1
    for field in ("bytes", "flops", "floor_ms", "eager_ms", "fraction_of_floor"):
        assert row[field] > 0, field
    table = bench_op.table(result).splitlines()
    assert table[2].startswith("tiny")
    # a legend under the rows explains the derived columns, with this run's measured ceilings
    legend = "\n".join(table[3:])
    assert table[3].startswith("MB: ") and "floor ms: the least time" in legend
    assert "%floor: floor ms / the best measured time" in legend
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


def _by_name(name: str) -> bench_op.Shape:
    (shape,) = [s for s in bench_op.SHAPES if s.name == name]
    return shape


def test_the_long_prompt_shapes_differ_only_in_the_budget():
    plain, budgeted = _by_name("prompt-2k-b1"), _by_name("prompt-2k-m64-b1")
    assert (plain.batch, plain.tokens, plain.keep, plain.width, plain.text_width, plain.n_text) == \
        (1, 576, 64, 1024, 4096, 2048)
    assert dataclasses.replace(budgeted, name=plain.name, text_budget=None) == plain
    assert (plain.text_budget, budgeted.text_budget) == (None, 64)


def test_the_budget_counts_several_times_fewer_flops_and_its_sketch_bytes():
    plain, budgeted = _by_name("prompt-2k-b1"), _by_name("prompt-2k-m64-b1")
    without, with_ = bench_op.traffic(plain, torch.float32), bench_op.traffic(budgeted, torch.float32)
    n, l, m, c = 576, 2048, 64, 4096
    sketch_flops = 2 * (n + l) * c * reference.SKETCH_WIDTH + 2 * n * l * reference.SKETCH_WIDTH
    assert without.flops - with_.flops == 2 * n * (l - m) * c - sketch_flops
    assert with_.flops == ops.prune_flops((1, n, 1024), (1, n, c), (1, l, c), None, (1, n), None, 64, text_budget=64)
    assert without.flops / with_.flops > 5
    # the sketch step reads attn once more; the M kept rows (and mask) are written and read again
    assert without.sketch_bytes == 0
    assert with_.sketch_bytes == (n * c + 2 * m * c) * 4 + 2 * m
    assert with_.bytes - without.bytes == with_.sketch_bytes


def test_every_implementation_gets_the_text_budget():
    shape = bench_op.TINY_BUDGET
    inputs = bench_op.make_inputs(shape, "cpu", torch.float32)
    impls = bench_op.implementations(shape.keep, shape.text_budget, with_compile=False)
    with torch.no_grad():
        expected = reference.prune(*inputs, shape.keep, text_budget=shape.text_budget)
        unbudgeted = reference.prune(*inputs, shape.keep)
        for name in ("eager", "fused"):
            got = impls[name](*inputs)
            assert torch.equal(got.indices, expected.indices), name
            torch.testing.assert_close(got.task_scores, expected.task_scores)
    # the budget must change what is computed here, or the check above would prove nothing
    assert not torch.equal(expected.task_scores, unbudgeted.task_scores)


def test_a_budgeted_shape_runs_on_cpu_and_its_speedup_is_measured_per_round():
    twin = dataclasses.replace(bench_op.TINY_BUDGET, name="tiny-l16", text_budget=None)
    result = bench_op.run(bench_op.OpPlan("cpu", torch.float32, [twin, bench_op.TINY_BUDGET], with_compile=False,
                                          rounds=2))
    assert result.rounds == 2
    plain, row = result.rows
    assert row.shape.text_budget == 4 and row.sketch_bytes > 0 and plain.sketch_bytes == 0
    assert row.bytes > 0 and row.flops > 0 and row.floor_ms > 0 and row.fraction_of_floor > 0
    assert len(row.eager_ms_rounds) == 2 and min(row.eager_ms_rounds) <= row.eager_ms <= max(row.eager_ms_rounds)
    (speedup,) = result.budget_speedups
    assert (speedup.without, speedup.with_) == ("tiny-l16", "tiny-m4")
    assert speedup.flops_ratio == plain.flops / row.flops
    # each round's ratio pairs the two shapes' times of that round, not of other rounds
    assert speedup.eager_speedup_rounds == pytest.approx([a / b for a, b in zip(plain.eager_ms_rounds,
                                                                                row.eager_ms_rounds)])
    assert speedup.compile_speedup is None and speedup.fused_speedup is None   # neither was timed
    assert any(line.startswith("text budget: tiny-l16 / tiny-m4: ") for line in bench_op.table(result).splitlines())


def test_bench_op_shapes_picks_rows_by_name(tmp_path):
    out = tmp_path / "op.json"
    assert main(["bench", "op", "--device", "cpu", "--shapes", "tiny-m4", "--no-compile", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shape"]["name"] == "tiny-m4" and row["shape"]["text_budget"] == 4


@pytest.mark.parametrize("args,message", [
    (["--shapes", "tiny,nope"], "--shapes takes names from llava1.5-b1"),
    (["--shapes", "tiny", "--tiny"], "--tiny and --shapes both choose the shapes"),
    (["--tiny", "--rounds", "0"], "--rounds must be at least 1, got 0"),
])
def test_bench_op_refuses_bad_shapes_and_rounds_in_one_line(capsys, args, message):
    assert main(["bench", "op", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("desap: error: ") and message in err, err
