"""Tests of ``desap_ops.integrations.common``: what both engines share."""
