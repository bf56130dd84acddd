"""The ``desap`` entry point: --help, and the errors a person can fix (one line, status 2)."""
import subprocess
import sys

import pytest
import torch

from desap_ops.cli.main import main
from desap_ops.cli.models import MODELS


def test_help_names_every_command_and_model(capsys):
    for argv, expected in ((["--help"], ["demo", "bench"]), (["bench", "--help"], ["op", "e2e"]),
                           (["bench", "e2e", "--help"], list(MODELS))):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert all(word in out for word in expected), (argv, out)


def test_python_dash_m_runs_the_same_command_line():
    run = subprocess.run([sys.executable, "-m", "desap_ops", "bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "usage: desap bench" in run.stdout


@pytest.mark.parametrize("args,message", [
    (["demo", "--image", "/no/such/file.png"], "no such image file"),
    (["demo", "--keep", "1000"], "--keep must lie in [1, 256]"),
    (["demo", "--query-box", "1,2,3"], "--query-box must be x0,y0,x1,y1"),
    (["demo", "--model", "/no/such/folder"], "local checkpoint folder"),
    (["bench", "e2e", "--model", "tiny", "--keep", "99"], "--keep values must lie in [1, 16]"),
    (["bench", "e2e", "--model", "tiny", "--keep", "a,b"], "comma-separated integers"),
])
def test_errors_a_person_can_fix_exit_2_without_a_traceback(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    errors = [line for line in err.strip().splitlines() if not line.startswith("... ")]  # not progress
    assert len(errors) == 1 and errors[0].startswith("desap: error: ")


def test_an_image_that_is_not_an_image(tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    assert main(["demo", "--image", str(fake)]) == 2
    assert "is not an image" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("command", [["bench", "op"], ["bench", "e2e", "--device", "cuda"]])
def test_cuda_without_a_gpu_exits_2(capsys, command):
    assert main(command + ["--device", "cuda"] if command == ["bench", "op"] else command) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_op_refuses_meta(capsys):
    assert main(["bench", "op", "--device", "meta"]) == 2
    assert "use --device cpu or cuda" in capsys.readouterr().err
