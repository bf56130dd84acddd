"""What :func:`desap_ops.integrations.apply_desap` leaves on a patched model (``model._desap``),
and the public record of the last prune."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Union

from .chat import ChatMarkers


@dataclass(frozen=True)
class PruneRecord:
    """What the last prune of a patched model kept, one tensor per image (or video), in the
    order the model received them."""

    indices: list          # (K,) int64, ascending: kept candidate tokens
    assignment: list       # (N,) int64: output position of each candidate token
    task_scores: list      # (N,) float32
    saliency: list         # (N,) float32: the saliency the operator was given
    task_keep: list        # 0-d int64: how many of the kept tokens were chosen by task score
    text_tokens: list      # 0-d int64: how many prompt text tokens its task score read; 0: text-blind


RECORD_FIELDS = tuple(f.name for f in fields(PruneRecord))


@dataclass
class DesapState:
    """DeSAP's state on a patched model, the same fields for every family."""

    # apply_desap's options, checked
    keep: int                # tokens per image, or per video across its frames (the video models)
    task_ratio: Union[float, str]   # a share in [0, 1], or "auto"
    merge: bool
    text_reduce: str
    backend: str
    ignored_ids: set[int]    # token ids that never count as prompt text
    text_budget: Optional[int] = None       # at most this many text tokens per image; None: all
    chat: Optional[ChatMarkers] = None      # count only the user's words of a chat; None: all text
    # set by the patcher
    feature_layer: int = 0   # CLIP-style towers: index into hidden_states of the layer the signals
    #                          are read at (its attention is layer feature_layer - 1); 0 where the
    #                          patcher reads a fixed layer instead (Qwen2.5-VL)
    saved: list = field(default_factory=list)      # (owner, name, instance attribute or None) to restore
    originals: dict = field(default_factory=dict)  # method name -> the bound method DeSAP shadows
    # per call, cleared when the forward or generate call being served returns
    prompt: Optional[tuple] = None     # (input_ids, attention_mask) after shrinking, for the text side
    pending: Optional[dict] = None     # work a patcher planned for this call (the Qwen models: features,
    #                                    kept positions, rope deltas); None where nothing is planned
    # kept until the next vision pass: RECORD_FIELDS name -> one tensor per image (see last_prune)
    last: dict = field(default_factory=dict)
    told_text_blind: bool = False   # the text-blind warning (prompt.TEXT_BLIND) was logged for this model
