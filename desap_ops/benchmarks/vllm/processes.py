"""The processes that run vLLM for the benches: a module run as ``python -m`` with the engine
environment, its output to a log and its progress lines (:data:`MARK`) to the command's progress;
the log folder of a run; a port and a health check for a ``vllm serve`` of our own."""
from __future__ import annotations

import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional

from ..skeleton import Progress, RunFailed
from ._cpu_fixes import engine_environment

MARK = "desap-bench-vllm: "   # a vLLM process's progress lines start with this


class ProcessFailed(RunFailed):
    """A vLLM process exited with an error; ``tail``: the last lines of its log."""

    def __init__(self, what: str, returncode: Optional[int], log: Path, tail: list[str]):
        super().__init__(f"the vLLM run of {what} failed (exit {returncode}); its log: {log}", tail)


def log_tail(log: Path) -> list[str]:
    return log.read_text(errors="replace").strip().splitlines()[-15:]


def run_logged(argv: list[str], log_path: Path, what: str, say: Progress) -> str:
    """Run ``argv`` (a Python module that prints :data:`MARK` progress lines) with the engine
    environment, its output to ``log_path``, its progress to ``say``; the log's text. ProcessFailed
    on a non-zero exit."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                   env=engine_environment())
        for line in process.stdout:
            log.write(line)
            if line.startswith(MARK):
                say(f"{what}: {line[len(MARK):].strip()}")
        process.wait()
    if process.returncode != 0:
        raise ProcessFailed(what, process.returncode, log_path, log_tail(log_path))
    return log_path.read_text(errors="replace")


def say_mark(message: str) -> None:
    """A progress line of a vLLM process, which :func:`run_logged` passes on."""
    print(MARK + message, flush=True)


def new_log_folder(command: str, say: Progress) -> Path:
    """A fresh folder for one run's logs and process files, named after ``command``."""
    logs = Path(tempfile.mkdtemp(prefix=f"desap-{command.replace(' ', '-')}-"))
    say(f"vLLM logs in {logs}")
    return logs


def free_port() -> int:
    """A port on 127.0.0.1 that no one listens on now (for a ``vllm serve`` of our own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_healthy(url: str) -> bool:
    """Whether the ``vllm serve`` at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False
