"""The skeleton every benchmark runs through: the order of its steps, the one-line refusals before
anything runs, a failed run's exit, and results as JSON: the files in bench/results read back as the
result types without losing a field, and the plots drawn from them keep their titles on the figure."""
import json
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from desap_ops.benchmarks import arguments, e2e, op, skeleton
from desap_ops.benchmarks.arguments import UsageError
from desap_ops.benchmarks.skeleton import RunFailed, from_json, to_json
from desap_ops.benchmarks.vllm import offline, serve
from desap_ops.benchmarks.received_cost import ReceivedCostResult
from desap_ops.benchmarks.vllm.processor_cost import ProcessorCostResult

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
KINDS = {"op": op.OpBenchResult, "e2e": e2e.E2eResult, "serve": serve.ServeResult, "vllm": offline.OfflineResult,
         "processor": ProcessorCostResult, "received": ReceivedCostResult}


class Recorder:
    """A benchmark whose steps record their order; ``fail`` makes its run fail in a process."""

    def __init__(self, fail: bool = False):
        self.steps, self.fail = [], fail

    def check(self, args):
        self.steps.append("check")

    def plan(self, args):
        self.steps.append("plan")
        return "the plan"

    def run(self, plan, progress=None):
        self.steps.append(f"run {plan}")
        if self.fail:
            raise RunFailed("the run of x failed (exit 1); its log: x.log", ["last line of the log"])
        return Point(1, None)

    def table(self, result):
        self.steps.append("table")
        return "the table"

    def figure(self, result):
        self.steps.append("figure")
        from matplotlib.figure import Figure

        return Figure(figsize=(1, 1))


@dataclass
class Point:
    x: int
    y: Optional[int] = skeleton.optional()


def test_execute_checks_plans_runs_then_writes_the_table_json_and_plot(tmp_path, capsys):
    bench = Recorder()
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    assert skeleton.execute(bench, Namespace(out=str(out), plot=str(plot))) == 0
    assert bench.steps == ["check", "plan", "run the plan", "table", "figure"]
    assert json.loads(out.read_text()) == {"x": 1} and plot.stat().st_size > 0
    assert capsys.readouterr().out.splitlines() == ["the table", f"wrote {out}", f"wrote {plot}"]


def test_outputs_are_refused_before_the_benchmarks_own_checks(tmp_path):
    bench = Recorder()
    with pytest.raises(UsageError, match=r"--out .*r\.txt: the file name must end in \.json"):
        skeleton.execute(bench, Namespace(out=str(tmp_path / "r.txt"), plot=None))
    with pytest.raises(UsageError, match="is a folder"):
        skeleton.execute(bench, Namespace(out=None, plot=str(tmp_path)))
    assert bench.steps == []


def test_a_failed_run_prints_its_logs_tail_and_returns_1(capsys):
    assert skeleton.execute(Recorder(fail=True), Namespace(out=None, plot=None)) == 1
    assert capsys.readouterr().err.splitlines() == ["last line of the log",
                                                    "desap: error: the run of x failed (exit 1); its log: x.log"]


@pytest.mark.parametrize("text,full,expected", [
    (None, False, None), ("192,128,64", False, [192, 128, 64]), ("64,128,64", False, [64, 128]),
    ("full,64", True, [64]), ("full", True, []), (" 8 , 4", False, [8, 4])])
def test_budgets_parse_in_the_order_given(text, full, expected):
    assert arguments.parse_budgets(text, full) == expected


@pytest.mark.parametrize("text,full,message", [
    ("a,b", False, "--keep must be comma-separated integers, got a,b"),
    ("full,64", False, "--keep must be comma-separated integers, got full,64"),
    ("64.5", True, "--keep must be full or comma-separated integers, got 64.5"),
    ("64,0", False, "--keep values must be at least 1, got 0")])
def test_budgets_refuse_in_one_line(text, full, message):
    with pytest.raises(UsageError) as err:
        arguments.parse_budgets(text, full)
    assert str(err.value) == message


def test_the_papers_budgets_are_a_third_two_ninths_and_a_ninth():
    assert skeleton.paper_budgets(576) == [192, 128, 64]
    assert skeleton.paper_budgets(144) == [48, 32, 16]
    assert skeleton.paper_budgets(4) == [1]   # 4 // 9 == 0 is no budget


def test_json_names_omissions_and_flattening():
    @dataclass
    class Inner:
        a: int

    @dataclass
    class Outer:
        kept: Optional[int]
        with_: str = skeleton.named("with")
        gone: Optional[int] = skeleton.optional()
        inner: Inner = skeleton.flattened(default_factory=lambda: Inner(3))

    value = Outer(None, "w")
    assert to_json(value) == {"kept": None, "with": "w", "a": 3}
    assert from_json(Outer, to_json(value)) == value


def _contains(whole, part, path="") -> None:
    """Every key of ``part`` is in ``whole`` with the same value, recursively."""
    if isinstance(part, dict):
        assert isinstance(whole, dict), path
        for key, value in part.items():
            assert key in whole, f"{path}/{key} was lost"
            _contains(whole[key], value, f"{path}/{key}")
    elif isinstance(part, list):
        assert isinstance(whole, list) and len(whole) == len(part), path
        for i, (w, p) in enumerate(zip(whole, part)):
            _contains(w, p, f"{path}[{i}]")
    else:
        assert whole == part, path


# Written before the bench vllm result named its prompts (the file's "questions" are the 12
# question texts, not the prompts sent): read as they are by json, not as an OfflineResult.
EARLIER_LAYOUT = {"vllm-llava-tinyllama-1.1b-cpu.json", "vllm-llava-tinyllama-1.1b-cpu-run1-loaded.json"}


@pytest.mark.parametrize("path", sorted(p.name for p in RESULTS.glob("*.json") if p.name not in EARLIER_LAYOUT))
def test_every_result_file_reads_back_without_losing_a_field(path):
    saved = json.loads((RESULTS / path).read_text())
    result = from_json(KINDS[path.split("-")[0]], saved)
    _contains(json.loads(json.dumps(to_json(result))), saved)


def test_the_earlier_vllm_files_are_the_earlier_layout():
    for name in EARLIER_LAYOUT:
        saved = json.loads((RESULTS / name).read_text())
        assert "questions" in saved and "prompts" not in saved


@pytest.mark.parametrize("path", ["serve-llava-tinyllama-1.1b-cpu.json", "serve-qwen2.5-vl-small-cpu.json",
                                  "e2e-qwen3-vl-8b-shrink-cpu-fp32.json", "op-long-prompt-cpu.json"])
def test_plots_keep_their_titles_inside_the_figure(path):
    """The serve plot's title once ran off the figure's left edge on a machine with a long CPU name."""
    kind = path.split("-")[0]
    module = {"op": op, "e2e": e2e, "serve": serve}[kind]
    result = from_json(KINDS[kind], json.loads((RESULTS / path).read_text()))
    if kind == "serve":
        result.environment.cpu, result.environment.cpu_count = "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", 224
    else:
        result.environment.device = "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz, 112 threads"
    fig = module.figure(result)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    titles = [*fig.texts, *(ax.title for ax in fig.axes)]   # the figure's title is among its texts
    assert titles
    for title in titles:
        box = title.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height, (title.get_text(), box)
