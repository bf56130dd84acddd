"""vLLM hidden from the command-line tests (the main environment has none)."""
import importlib.util

import pytest


@pytest.fixture
def no_vllm(monkeypatch):
    """vLLM is not importable (as in the main environment, also where it happens to be installed)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "vllm" else find_spec(name, *rest))
