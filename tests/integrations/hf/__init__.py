"""Tests of ``desap_ops.integrations.hf``: apply_desap on tiny random-weight transformers models."""
