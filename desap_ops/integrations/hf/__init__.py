"""DeSAP for Hugging Face transformers models: the ``apply_desap`` tier of ``desap_ops.integrations``.

Imports point one way: the registry (``registry``: ``apply_desap``, ``remove_desap``,
``last_prune``, {model class: Family}) -> one patcher per model family (``llava``,
``llava_next``, ``qwen2_5_vl`` and ``qwen3_vl`` over the Qwen base patcher ``qwen``, ``video``),
each exporting its ``family.Family`` -> this tier's shared modules (``family``, ``serving``,
``state``, ``text``, ``clip_tower``, ``compat``) ->
``integrations.common``. A patcher never imports another patcher (the Qwen families import their
base, ``qwen``), and no shared module imports a patcher.

This package imports nothing itself: ``desap_ops.integrations`` re-exports the registry's public names.
"""
