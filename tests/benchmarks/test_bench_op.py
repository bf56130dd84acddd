"""``desap bench op``: the benchmark code runs and reports what it promises (no timing assertions);
its byte and FLOP counts agree with an independent count of what the reference implementation
reads, writes and multiplies."""
import dataclasses
import json

import pytest
import torch

from desap_ops import reference
from desap_ops.benchmarks import op as bench_op
from desap_ops.benchmarks.flops import flops_of
from desap_ops.benchmarks.skeleton import from_json, write_json
from desap_ops.cli.main import main

# the tiny shapes, and one of them with several images and another budget
COUNTED_SHAPES = [*bench_op.TINY_SHAPES, bench_op.TINY_BUDGET,
                  dataclasses.replace(bench_op.TINY_BUDGET, name="tiny-m4-k3", keep=3)]


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a list of inputs or of a PruneResult."""
    items = value._asdict().values() if hasattr(value, "_asdict") else value
    return [t for t in items if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", COUNTED_SHAPES, ids=lambda shape: shape.name)
def test_traffic_counts_the_bytes_the_reference_reads_and_writes(shape, dtype):
    """Beside the text budget's sketch, the bytes are those of the reference's inputs and outputs;
    the sketch adds attn read once more and the M kept text rows and their mask written and read."""
    inputs = bench_op.make_inputs(shape, "cpu", dtype)
    counts = bench_op.traffic(shape, dtype)
    moved = sum(t.nbytes for t in [*_tensors(inputs), *_tensors(reference.prune(*inputs, shape.keep,
                                                                                  text_budget=shape.text_budget))])
    assert counts.bytes - counts.sketch_bytes == moved
    hidden, attn, text, saliency = inputs
    if shape.text_budget is None:
        assert counts.sketch_bytes == 0
    else:
        kept, mask = reference.budget_text(attn, text, None, shape.text_budget)
        assert kept.shape[1] == shape.text_budget < text.shape[1]
        assert counts.sketch_bytes == attn.nbytes + 2 * (kept.nbytes + mask.nbytes)


@pytest.mark.parametrize("shape", COUNTED_SHAPES, ids=lambda shape: shape.name)
def test_traffic_counts_the_flops_torch_counts_in_the_reference_and_the_merge_sums(shape):
    """torch's FLOP counter counts the reference's matrix products (the similarity, the nearest-kept
    match and, under a budget, the sketch); the merge sums (one add per element of hidden) are
    elementwise, which it leaves out."""
    assert bench_op.traffic(shape, torch.float32).flops == _counted_flops(shape)


def _counted_flops(shape: bench_op.Shape) -> int:
    """torch's count of the reference on ``shape``, plus the merge sums it leaves out."""
    inputs = bench_op.make_inputs(shape, "cpu", torch.float32)
    counted = flops_of(lambda: reference.prune(*inputs, shape.keep, text_budget=shape.text_budget))
    return counted + shape.batch * shape.tokens * shape.width


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
    assert table[2].split()[0] == "tiny"   # the header, the columns' names, then one line per shape
    # the legend under the rows cites this run's measured ceilings
    legend = "\n".join(table[3:])
    assert f"{saved['ceilings']['copy_bytes_per_s'] / 1e9:.1f}" in legend


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


def test_the_budget_counts_several_times_fewer_flops():
    plain, budgeted = _by_name("prompt-2k-b1"), _by_name("prompt-2k-m64-b1")
    without, with_ = bench_op.traffic(plain, torch.float32), bench_op.traffic(budgeted, torch.float32)
    assert without.flops / with_.flops > 5
    assert without.sketch_bytes == 0 < with_.sketch_bytes
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


def test_a_budgeted_shape_runs_on_cpu_and_its_row_holds_every_round():
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
    assert speedup.flops_ratio == _counted_flops(twin) / _counted_flops(bench_op.TINY_BUDGET)   # without / with
    assert speedup.compile_speedup is None and speedup.fused_speedup is None   # neither was timed
    assert any(line.split()[:3] == ["text", "budget:", "tiny-l16"] for line in bench_op.table(result).splitlines())


def test_the_budgets_speedup_pairs_the_two_shapes_times_round_by_round(monkeypatch):
    """Round 1: 8 ms without the budget, 4 with (x2); round 2: 12 and 2 (x6): the speedup is the
    median of the rounds' ratios, 4, not the ratio of the median times (10 / 3)."""
    twin = dataclasses.replace(bench_op.TINY_BUDGET, name="tiny-l16", text_budget=None)
    times = iter([8.0, 4.0, 12.0, 2.0])   # the shapes in turn, round after round
    monkeypatch.setattr(bench_op, "time_shape", lambda *args, **kwargs: bench_op.Times(eager=next(times)))
    result = bench_op.run(bench_op.OpPlan("cpu", torch.float32, [twin, bench_op.TINY_BUDGET], with_compile=False,
                                          rounds=2))
    plain, budgeted = result.rows
    assert (plain.eager_ms_rounds, budgeted.eager_ms_rounds) == ([8.0, 12.0], [4.0, 2.0])
    (speedup,) = result.budget_speedups
    assert speedup.eager_speedup_rounds == [2.0, 6.0] and speedup.eager_speedup == 4.0


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
