"""The engine-neutral tier of ``desap_ops.integrations``: what ``apply_desap`` (transformers,
``integrations.hf``) and the vLLM plugin (``integrations.vllm``) both need, written once.

- ``pruning``: the checked options of one prune and the one call that prunes (or, under the
  ``ideal`` option, keeps each image's first tokens).
- ``signals``: the one type of a vision tower's signals (:class:`signals.TowerSignals`), [CLS]
  saliency and received attention, and hooks that capture an attention layer while it runs.
- ``sequence``: placeholder surgery, the per-image budget rule, the text each image reads.
- ``prompt``: which token ids never count as text.
- ``record``: the per-image record of what a prune kept (``PruneRecord``, both engines') and the
  text-blind warning.
- ``hooked``: the one type of a library name an engine's patch uses (``Hook``), which each engine checks.
- ``chat``: a chat template's markers and the user's words they leave.
- ``layout``: how LLaVA-family models lay out an image's tokens (per crop, LLaVA-NeXT's AnyRes
  packing with image-newlines) and the kept tokens packed back with their newlines.

Nothing here imports ``integrations.hf`` or ``integrations.vllm``.
"""
