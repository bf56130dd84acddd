"""Tests of ``desap_ops.integrations``, one package per tier (``common``, ``hf``, ``vllm``; the vLLM
engine tests, which need vLLM itself, are in tests/on_vllm). Packages, so that the same file name
may stand in two tiers and the helpers import relatively (``prompts`` is shared by the tiers)."""
