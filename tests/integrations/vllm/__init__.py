"""Tests of ``desap_ops.integrations.vllm`` that run without vLLM (the engine tests: tests/on_vllm)."""
