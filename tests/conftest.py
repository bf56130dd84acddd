"""Without a GPU the Triton kernels run under the interpreter: set it before triton is imported."""
import importlib.util
import os

import torch

# tests/on_vllm need vLLM, which lives in an environment of its own (.ci/run runs them there)
collect_ignore = [] if importlib.util.find_spec("vllm") else ["on_vllm"]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_finish(session):
    """Start the sm_90 compile check's process now if it is among the tests to run (see
    tests/test_sm90_compile.py): it then overlaps the interpreted tests."""
    for item in session.items:
        if item.name == "test_kernels_compile_for_hopper":
            # one core fewer than the machine has: the interpreted tests keep one to themselves
            session.config.sm90_compile = item.module.start_compile(workers=max(1, (os.cpu_count() or 2) - 1))
            return


def pytest_sessionfinish(session):
    run = getattr(session.config, "sm90_compile", None)
    if run is not None and run.poll() is None:  # the test did not get to wait for it (-x, Ctrl-C)
        run.kill()
        run.communicate()
