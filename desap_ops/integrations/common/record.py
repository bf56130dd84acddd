"""What a prune kept, one record per image (or video), the same type in both engines:
transformers' ``last_prune(model)`` and the vLLM model's ``desap_history`` hold these. Beside it,
the text-blind warning both engines log when an image read no prompt text."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ...methods import Signal, get_method
from ...reference import PruneResult

log = logging.getLogger(__name__)

# logged once per model (transformers) or per engine process (vLLM) when an image read no text
TEXT_BLIND = ("DeSAP: an image had no prompt text for its task score to read, so saliency alone chose its "
              "tokens (text-blind pruning, not DeSAP's task score). Each record says how many text tokens an "
              "image read (text_tokens; 0 here); docs/algorithm.md, \"The text an image reads\", says which count")


@dataclass(frozen=True)
class PruneRecord:
    """What one prune kept of one image (or video): CPU tensors of its own, which nothing changes
    after the record is built (:func:`records_of`)."""

    indices: torch.Tensor                 # (K,) int64, ascending: the kept candidate tokens
    assignment: torch.Tensor              # (N,) int64: output position of each candidate token, -1 if dropped
    task_scores: Optional[torch.Tensor]   # (N,) float32; None: the method scores no task (every one but DeSAP)
    saliency: Optional[torch.Tensor]      # (N,) float32, as the method read it; None: the method reads none
    task_keep: Optional[int]              # how many kept tokens the task score chose; None: no task score
    text_tokens: int                      # prompt text tokens the task score read; 0: text-blind (or none read)
    method: str                           # the method that chose (vLLM's fallback after a failed one: its name)


def _row(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU copy of ``tensor`` as ``dtype``, shared with nothing (the record's own)."""
    return tensor.detach().to(device="cpu", dtype=dtype, copy=True)


def records_of(result: PruneResult, saliency: Optional[torch.Tensor], text_tokens: torch.Tensor,
               method: str) -> list[PruneRecord]:
    """One record per image of ``result`` (a batch of B images), in its order: ``method`` is the
    name of the method that chose, ``saliency`` (B, N) the tower's (recorded only where the method
    reads it), ``text_tokens`` (B,) how many text tokens each image's task score read. A result
    without task scores (None) records None for them and for ``task_keep``."""
    images = result.indices.shape[0]
    if len(text_tokens) != images:
        raise ValueError(f"text_tokens must count one entry per image of the result ({images}), got {len(text_tokens)}")
    if saliency is not None and saliency.shape[0] != images:
        raise ValueError(f"saliency must hold one row per image of the result ({images}), got shape "
                         f"{tuple(saliency.shape)}")
    if Signal.SALIENCY not in get_method(method).reads:
        saliency = None
    scored = result.task_scores is not None and result.task_keep is not None
    return [PruneRecord(indices=_row(result.indices[i], torch.int64),
                        assignment=_row(result.assignment[i], torch.int64),
                        task_scores=_row(result.task_scores[i], torch.float32) if scored else None,
                        saliency=None if saliency is None else _row(saliency[i], torch.float32),
                        task_keep=int(result.task_keep[i]) if scored else None,
                        text_tokens=int(text_tokens[i]), method=method)
            for i in range(images)]


def warn_if_text_blind(records: Sequence[PruneRecord], reads: frozenset, told: bool) -> bool:
    """Log :data:`TEXT_BLIND` once: where the method ``reads`` text and one of ``records`` read
    none, unless ``told`` (the engine's flag: logged before). Returns the flag's new value."""
    if told or Signal.TEXT not in reads or all(record.text_tokens > 0 for record in records):
        return told   # a method that reads no text (the ideal) has nothing to tell
    log.warning(TEXT_BLIND)
    return True
