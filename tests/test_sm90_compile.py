"""Every launcher configuration compiles for sm_90 (H100/H200) with no spills, without a GPU.

The compile runs in its own process (no interpreter there). tests/conftest.py starts that process
as soon as this test is collected, so the compile runs beside the other tests, on the core they
leave idle, instead of after them; run alone, the test starts it itself.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import desap_ops

SCRIPT = Path(__file__).with_name("sm90_compile.py")
# the script's own folder comes first on its sys.path, not the checkout: point it at the desap_ops
# this session tests, or it compiles whichever copy is installed
SOURCE_ROOT = Path(desap_ops.__file__).resolve().parents[1]


def start_compile(workers: int = 0) -> subprocess.Popen:
    """The compile in its own process, with ``workers`` compile processes (0: one per core)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    if workers:
        env["SM90_COMPILE_WORKERS"] = str(workers)
    return subprocess.Popen([sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


@pytest.mark.slow
def test_kernels_compile_for_hopper(pytestconfig):
    run = getattr(pytestconfig, "sm90_compile", None) or start_compile()
    report, _ = run.communicate(timeout=900)
    assert run.returncode == 0, report[-4000:]
    assert " 0 failed" in report
