"""DeSAP inside vision-language model engines (docs/integrations.md, docs/vllm.md), in three tiers:

- ``common``: what both engines need, written once: the checked options and the one pruning call
  (with the ``ideal`` option), the one type of a vision tower's signals, placeholder surgery and
  budgets, the prompt text each image reads, chat markers, LLaVA-NeXT's packing with its
  image-newlines. It imports neither of the tiers below.
- ``hf``: ``apply_desap`` for Hugging Face transformers: the registry, one patcher per model family
  over this tier's shared modules (serving, state, the CLIP tower, the Qwen base patcher).
- ``vllm``: the vLLM plugin (entry point ``vllm.general_plugins`` -> ``vllm.register``), which
  imports ``common`` and never ``hf``.

    from desap_ops.integrations import apply_desap, remove_desap
    apply_desap(model, keep=64, task_ratio=0.5, merge=True)
    apply_desap(model, keep=64, task_ratio="auto", text_budget=32, chat=processor)   # beyond the paper
    apply_desap(model, keep=64, ideal=True)   # each image's first 64 tokens: the ideal's speed

The names below are ``hf.registry``'s (and ``ChatMarkers``, ``common.chat``'s; ``PruneRecord``,
``common.record``'s, the records of both engines), loaded on first use:
importing the vLLM plugin, or ``common``, does not load the transformers tier.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .common.chat import ChatMarkers
    from .hf.registry import SUPPORTED, apply_desap, image_token_counts, last_prune, remove_desap
    from .common.record import PruneRecord

# public name -> the module that defines it
_EXPORTS = {
    "apply_desap": ".hf.registry", "remove_desap": ".hf.registry", "last_prune": ".hf.registry",
    "image_token_counts": ".hf.registry", "SUPPORTED": ".hf.registry", "PruneRecord": ".common.record",
    "ChatMarkers": ".common.chat",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["apply_desap", "remove_desap", "last_prune", "PruneRecord", "ChatMarkers", "image_token_counts",
           "SUPPORTED"]
