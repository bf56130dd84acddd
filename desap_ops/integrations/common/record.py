"""What a prune kept, one record per image (or video), the same type in both engines:
transformers' ``last_prune(model)`` and the vLLM model's ``desap_history`` hold these. Beside it,
the text-blind warning both engines log when an image read no prompt text."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from ...methods import Signal, get_method
from ...reference import PruneResult

log = logging.getLogger(__name__)

# logged once per model (transformers) or per engine process (vLLM) when an image read no text
TEXT_BLIND = ("DeSAP: an image had no prompt text for its task score to read, so saliency alone chose its "
              "tokens (text-blind pruning, not DeSAP's task score). Each record says how many text tokens an "
              "image read (text_tokens; 0 here); docs/algorithm.md, \"The text an image reads\", says which count")


@dataclass(frozen=True, eq=False)
class PruneRecord:
    """What one prune kept of one image (or video): CPU tensors of its own, which nothing changes
    after the record is built (:func:`records_of`). Two records are equal when every field is,
    tensors exactly (dtype, shape and values)."""

    indices: torch.Tensor                 # (K,) int64, ascending: the kept candidate tokens
    assignment: torch.Tensor              # (N,) int64: output position of each candidate token, -1 if dropped
    task_scores: Optional[torch.Tensor]   # (N,) float32; None: the method scores no task (every one but DeSAP)
    saliency: Optional[torch.Tensor]      # (N,) float32, as the method read it; None: the method reads none
    task_keep: Optional[int]              # how many kept tokens the task score chose; None: no task score
    text_tokens: int                      # prompt text tokens the task score read; 0: text-blind (or none read)
    method: str                           # the method that chose (vLLM's fallback after a failed one: its name)

    def __eq__(self, other) -> bool:
        if not isinstance(other, PruneRecord):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    __hash__ = None   # tensors: compared by value, so not hashable


def _same(mine, theirs) -> bool:
    if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor):
        return mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    return type(mine) is type(theirs) and mine == theirs


def _on_cpu(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The batch's ``tensor`` as ``dtype`` on the CPU, in one copy (not one per image)."""
    return None if tensor is None else tensor.detach().to(device="cpu", dtype=dtype)


def records_of(result: PruneResult, saliency: Optional[torch.Tensor], text_tokens: torch.Tensor,
               method: str) -> list[PruneRecord]:
    """One record per image of ``result`` (a batch of B images), in its order: ``method`` is the
    name of the method that chose, ``saliency`` (B, N) the tower's (recorded only where the method
    reads it), ``text_tokens`` (B,) how many text tokens each image's task score read. A result
    without task scores (None) records None for them and for ``task_keep``. Each record holds
    copies of its own rows (clones: what the engine does with its tensors later never shows)."""
    images = result.indices.shape[0]
    if len(text_tokens) != images:
        raise ValueError(f"text_tokens must count one entry per image of the result ({images}), got {len(text_tokens)}")
    if saliency is not None and saliency.shape[0] != images:
        raise ValueError(f"saliency must hold one row per image of the result ({images}), got shape "
                         f"{tuple(saliency.shape)}")
    if Signal.SALIENCY not in get_method(method).reads:
        saliency = None
    scored = result.task_scores is not None and result.task_keep is not None
    indices, assignment = _on_cpu(result.indices, torch.int64), _on_cpu(result.assignment, torch.int64)
    scores = _on_cpu(result.task_scores, torch.float32) if scored else None
    saliency = _on_cpu(saliency, torch.float32)
    task_keep = result.task_keep.tolist() if scored else [None] * images
    counts = text_tokens.tolist() if isinstance(text_tokens, torch.Tensor) else list(text_tokens)
    return [PruneRecord(indices=indices[i].clone(), assignment=assignment[i].clone(),
                        task_scores=None if scores is None else scores[i].clone(),
                        saliency=None if saliency is None else saliency[i].clone(),
                        task_keep=None if task_keep[i] is None else int(task_keep[i]),
                        text_tokens=int(counts[i]), method=method)
            for i in range(images)]


def warn_if_text_blind(records: Sequence[PruneRecord], reads: frozenset, told: bool) -> bool:
    """Log :data:`TEXT_BLIND` once: where the method ``reads`` text and one of ``records`` read
    none, unless ``told`` (the engine's flag: logged before). Returns the flag's new value."""
    if told or Signal.TEXT not in reads or all(record.text_tokens > 0 for record in records):
        return told   # a method that reads no text (the ideal) has nothing to tell
    log.warning(TEXT_BLIND)
    return True
