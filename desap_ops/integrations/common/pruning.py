"""The one place both engines prune an image: ``desap_ops.prune`` with the checked options, or,
under the ``ideal`` option, each image's first ``keep`` tokens, unscored and unmerged (the speed
pruning could reach if it cost nothing: ``apply_desap(..., ideal=True)`` and vLLM's
``hf_overrides={"desap": {..., "ideal": true}}`` alike). Under the ideal both engines run the tower
plainly, with no attention capture, and embed no text: its signals carry the hidden states alone
(``TowerSignals.branch`` and ``saliency`` None) and its texts are empty."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ...api import prune
from ...reference import PruneResult
from ...validation import check_backend, check_options, check_text_budget
from .signals import TowerSignals


@dataclass(frozen=True)
class PruneOptions:
    """The options of a prune, checked (:meth:`checked`): apply_desap's and vLLM's by the same names."""

    keep: int                         # tokens per image, or per video across its frames
    task_ratio: Union[float, str]     # a share in [0, 1], or "auto"
    merge: bool
    text_reduce: str
    backend: str
    text_budget: Optional[int]        # at most this many text tokens per image; None: all
    ideal: bool                       # keep the first ``keep`` tokens, unscored and unmerged

    @staticmethod
    def checked(keep, task_ratio, merge, text_reduce, backend, text_budget, ideal) -> "PruneOptions":
        """The options checked and normalised (``desap_ops.validation``); an engine's own options
        extend them (``PruneOptions`` subclasses built from ``vars()`` of these)."""
        keep, task_ratio, merge, text_reduce = check_options(keep, task_ratio, merge, text_reduce)
        if not isinstance(ideal, bool):
            raise TypeError(f"ideal must be True or False, got {ideal!r}")
        return PruneOptions(keep=keep, task_ratio=task_ratio, merge=merge, text_reduce=text_reduce,
                            backend=check_backend(backend), text_budget=check_text_budget(text_budget), ideal=ideal)

    def operator_options(self) -> dict:
        """The keyword arguments of ``desap_ops.prune`` these options set (all but keep)."""
        return dict(task_ratio=self.task_ratio, merge=self.merge, text_reduce=self.text_reduce,
                    backend=self.backend, text_budget=self.text_budget)

    @property
    def merges(self) -> bool:
        """Whether the dropped tokens are merged into the kept ones (never under ``ideal``): what
        the features that follow the kept tokens (DeepStack levels) are merged by too."""
        return self.merge and not self.ideal


def first_tokens(hidden: torch.Tensor, keep: int) -> PruneResult:
    """The ideal: each image's first ``keep`` tokens of ``hidden`` (B, N, D), in order, with no
    scoring and no merging (task scores and task_keep are zeros, a dropped token's assignment -1)."""
    batch, tokens = hidden.shape[:2]
    order = torch.arange(tokens, device=hidden.device)
    assignment = torch.where(order < keep, order, -1)
    return PruneResult(hidden[:, :keep], order[:keep].expand(batch, keep), assignment.expand(batch, tokens),
                       torch.zeros(batch, tokens, device=hidden.device),
                       torch.zeros(batch, dtype=torch.long, device=hidden.device))


def prune_images(signals: TowerSignals, text_space: Callable[[torch.Tensor], torch.Tensor], texts: Optional[torch.Tensor],
                 text_mask: Optional[torch.Tensor], keep: int, options: PruneOptions) -> PruneResult:
    """Prune each image of ``signals`` ((B, N, .)) to ``keep`` tokens for its text ``texts``
    (B, L, C) and ``text_mask`` (B, L). ``text_space`` maps the attention branch into the text's
    space (a projector, or nothing where the tower's merger already did). The ideal reads only
    ``signals.hidden``: its branch, saliency and texts may be None or empty."""
    if options.ideal:
        return first_tokens(signals.hidden, keep)
    attn = text_space(signals.branch)
    return prune(signals.hidden, attn, texts.to(attn.dtype), signals.saliency, keep, text_mask=text_mask,
                 **options.operator_options())
