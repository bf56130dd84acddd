"""What :func:`desap_ops.integrations.apply_desap` leaves on a patched model (``model._desap``), in
four parts by lifetime (the records of the last prune among them: ``common.record.PruneRecord``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from ..common.chat import ChatMarkers
from ..common.pruning import PruneOptions
from ..common.record import PruneRecord


@dataclass(frozen=True)
class Options(PruneOptions):
    """apply_desap's options, checked: the prune's, and which prompt tokens count as its text."""

    ignored_ids: frozenset[int]       # token ids that never count as prompt text
    chat: Optional[ChatMarkers]       # count only the user's words of a chat; None: all text
    tokenizer: Any = None             # the tokenizer or processor ``chat`` was read from; None: none given


class SavedAttribute(NamedTuple):
    """An attribute the patch set on ``owner``, and what the instance held under ``name`` before
    (None: nothing; the class's method showed through)."""

    owner: nn.Module
    name: str
    previous: Any


@dataclass
class Patch:
    """The patch's bookkeeping, for as long as it is installed."""

    saved: list[SavedAttribute] = field(default_factory=list)        # to restore
    originals: dict[str, Callable] = field(default_factory=dict)     # method name -> the method DeSAP shadows
    feature_layer: int = 0   # CLIP-style towers: index into hidden_states of the layer the signals are read
    #                          at (its attention is layer feature_layer - 1); 0 where the patcher reads a
    #                          fixed layer instead (the Qwen families)


class Prompt(NamedTuple):
    """The prompt of the call being served, after shrinking: the text side reads it."""

    input_ids: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor]


# the Qwen families' planned call (hf/qwen.py builds it; the call context holds it)
class PlannedMedium(NamedTuple):
    """What the model's ``get_<kind>_features`` hands out for one medium of a planned call."""

    features: list[torch.Tensor]       # per item (image or video): (K, C), its kept tokens
    levels: list[list[torch.Tensor]]   # per DeepStack level: per item (K, C), pruned and merged alike
    items_per_row: list[int]           # how many items each row of the batch holds


@dataclass(frozen=True)
class QwenPlan:
    """A planned call: the pruned features of each medium, and the kept tokens' 3D positions."""

    image: Optional[PlannedMedium]   # None: the call brought no images
    video: Optional[PlannedMedium]   # None: the call brought no videos
    positions: torch.Tensor          # (3, B, T'): the shortened prompt's positions
    rope_deltas: torch.Tensor        # (B, 1): largest position + 1 - length, per row (the model's rope_deltas)

    def medium(self, kind: str) -> Optional[PlannedMedium]:
        """The planned medium of ``kind`` ("image" or "video")."""
        return self.image if kind == "image" else self.video


@dataclass
class CallContext:
    """What one ``forward`` or ``generate`` call carries from its prepare step to the model's
    methods; emptied when the call returns."""

    prompt: Optional[Prompt] = None
    plan: Optional[QwenPlan] = None   # the Qwen families' planned call; None where nothing is planned
    # placeholder id -> each item's placeholder count in the served prompt (``serving.shrink_runs``):
    # where the text side finds each item's own run, whatever its budget
    budgets: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class Records:
    """What outlives a call: the records of the last vision pass (``last_prune``), one per image
    (or video) in the order the model received them, kept until the next pass starts, and whether
    this model has logged the text-blind warning."""

    last: Optional[list[PruneRecord]] = None   # None: no prune yet
    told_text_blind: bool = False


@dataclass
class DesapState:
    """DeSAP's state on a patched model, the same parts for every family."""

    options: Options
    patch: Patch = field(default_factory=Patch)
    call: CallContext = field(default_factory=CallContext)
    records: Records = field(default_factory=Records)
