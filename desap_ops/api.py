"""The Python entry point, :func:`prune`."""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch

from . import reference
from .function import PruneFunction
from .reference import PruneResult
from .validation import check_backend, check_inputs

Backend = Literal["auto", "triton", "reference"]


def prune(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    text: torch.Tensor,
    saliency: torch.Tensor,
    keep: int,
    *,
    text_mask: Optional[torch.Tensor] = None,
    task_ratio: Union[float, Literal["auto"]] = 0.5,
    merge: bool = True,
    metric: Optional[torch.Tensor] = None,
    text_reduce: str = "max",
    backend: Backend = "auto",
    text_budget: Optional[int] = None,
) -> PruneResult:
    """Prune the N visual tokens of each image to ``keep`` with DeSAP (the contract: docs/contract.md).

    Args:
        hidden: (B, N, D) tokens to keep and merge.
        attn: (B, N, C) attention branch of the same tokens, mapped into the text space.
        text: (B, L, C) text token embeddings.
        saliency: (B, N) visual saliency, e.g. [CLS] attention averaged over heads.
        keep: K, the number of tokens each image keeps, 1 <= K <= N.
        text_mask: (B, L) bool, True for valid text tokens; None means all valid.
        task_ratio: share of the budget chosen by task score, in [0, 1], or "auto": each image's
            share read from how strongly its own task scores single out some tokens.
        merge: merge each dropped token into its nearest kept token.
        metric: (B, N, E) features for the nearest-neighbour match; default ``hidden``.
        text_reduce: "max" (best-matching text token) or "mean" over valid text tokens.
        backend: "auto" (Triton on CUDA, reference on CPU), "triton" or "reference".
        text_budget: at most this many text tokens per image take part in the similarity (repeats
            count once; the rest are ranked by a cheap sketch of their best match); None: all.

    Returns:
        PruneResult(tokens (B, K, D), indices (B, K) ascending, assignment (B, N),
        task_scores (B, N) float32, task_keep (B,) int64). Gradients flow from ``tokens`` to
        ``hidden`` only.
    """
    check_backend(backend)
    options = check_inputs(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                           text_reduce, text_budget)
    if backend == "reference":
        return reference.prune(hidden, attn, text, saliency, options.keep, text_mask=text_mask,
                               task_ratio=options.task_ratio, merge=options.merge, metric=metric,
                               text_reduce=options.text_reduce, text_budget=options.text_budget)
    return PruneResult(*PruneFunction.apply(hidden, attn, text, saliency, options.keep, text_mask,
                                            options.task_ratio, options.merge, metric, options.text_reduce,
                                            backend, options.text_budget))
