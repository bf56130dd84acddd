"""The one place both engines prune an image: the options' pruning method (``desap_ops.methods``;
DeSAP by default, through ``desap_ops.prune``) on the tower's signals. Each method names the signals
it reads (``PruneOptions.reads``), and the engines compute only those: a method that reads no
saliency and no attention branch runs the tower plainly, with no attention capture, and one that
reads no text embeds none. The options' defaults (:data:`DEFAULTS`) are both engines'. The
``ideal`` option (the speed pruning could reach if it cost nothing: ``apply_desap(...,
ideal=True)`` and vLLM's ``hf_overrides={"desap": {..., "ideal": true}}`` alike) is translated
here, as the options are checked, into what it is: the method ``first``, unmerged.

``merge`` left at None (the default) is the method's own choice (``Method.merges``: DeSAP merges,
the baselines drop, as their papers do); True or False overrides it. :attr:`PruneOptions.merges`
resolves it, the one place that does."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ...methods import DEFAULT_METHOD, MethodInputs, Signal, TokenGrid, content_seeds, get_method, run_method
from ...reference import PruneResult
from ...validation import check_backend, check_merge, check_options, check_text_budget
from .signals import TowerSignals

IDEAL = "first"             # ``ideal=True`` is this method, unmerged
# what vLLM runs for images whose method failed: their first K tokens, merged or not as the failed
# method would have been (the request's merge, else that method's own default: PruneOptions.merges)
FALLBACK_METHOD = "first"


@dataclass(frozen=True)
class PruneDefaults:
    """The defaults of the options both engines take by the same names: ``apply_desap``'s
    signature and vLLM's ``hf_overrides["desap"]`` read them here."""

    keep: int = 64
    task_ratio: Union[float, str] = 0.5
    merge: Optional[bool] = None   # None: the method's own default (Method.merges)
    text_reduce: str = "max"
    backend: str = "auto"
    text_budget: Optional[int] = None
    exclude_token_ids: tuple[int, ...] = ()
    ideal: bool = False
    method: str = DEFAULT_METHOD


DEFAULTS = PruneDefaults()


@dataclass(frozen=True)
class PruneOptions:
    """The options of a prune, checked (:meth:`checked`): apply_desap's and vLLM's by the same names."""

    keep: int                         # tokens per image, or per video across its frames
    task_ratio: Union[float, str]     # a share in [0, 1], or "auto"
    merge: Optional[bool]             # merge the dropped tokens into the kept ones (and the DeepStack levels
                                      # alike); None: as the method does by default (``merges``)
    text_reduce: str
    backend: str
    text_budget: Optional[int]        # at most this many text tokens per image; None: all
    method: str                       # a registered pruning method (``desap_ops.methods``)

    @staticmethod
    def checked(keep, task_ratio, merge, text_reduce, backend, text_budget, method=DEFAULTS.method, *,
                ideal=DEFAULTS.ideal) -> "PruneOptions":
        """The options checked and normalised (``desap_ops.validation``; ``method`` must be
        registered; ``merge`` None, True or False); ``ideal=True`` gives the method ``first`` with
        ``merge`` False (with ``method`` left at the default, or ``first``). An engine's own
        options extend them (``PruneOptions`` subclasses built from ``vars()`` of these)."""
        # merge is checked apart: None (the method's default) is an option's value, not the operator's
        keep, task_ratio, _, text_reduce = check_options(keep, task_ratio, True, text_reduce)
        merge = check_merge_option(merge)
        if not isinstance(ideal, bool):
            raise TypeError(f"ideal must be True or False, got {ideal!r}")
        method = get_method(method).name
        if ideal:
            if method not in (DEFAULT_METHOD, IDEAL):
                raise ValueError(f"ideal is the method {IDEAL!r} unmerged; it cannot be combined with "
                                 f"method={method!r}")
            method, merge = IDEAL, False
        return PruneOptions(keep=keep, task_ratio=task_ratio, merge=merge, text_reduce=text_reduce,
                            backend=check_backend(backend), text_budget=check_text_budget(text_budget), method=method)

    @property
    def reads(self) -> frozenset[Signal]:
        """The signals the method reads (``desap_ops.methods.Signal``): what the engines compute."""
        return get_method(self.method).reads

    @property
    def merges(self) -> bool:
        """Whether this prune merges its dropped tokens: ``merge`` where it is set, else the
        method's own default (``Method.merges``). Every engine path reads it here."""
        return get_method(self.method).merges if self.merge is None else self.merge


def check_merge_option(merge) -> Optional[bool]:
    """The ``merge`` option: None (the method's own default) or a bool (0 and 1 too, as the operator takes them)."""
    if merge is None:
        return None
    try:
        return check_merge(merge)
    except TypeError:
        raise TypeError(f"merge must be None (the method's own default), True or False, got "
                        f"{type(merge).__name__} {merge!r}") from None


def tower_reads(options) -> frozenset[Signal]:
    """The signals any of ``options`` (one per image of a tower pass) reads."""
    return frozenset().union(*(o.reads for o in options))


def prune_images(signals: TowerSignals, text_space: Callable[[torch.Tensor], torch.Tensor], texts: Optional[torch.Tensor],
                 text_mask: Optional[torch.Tensor], keep: int, options: PruneOptions,
                 grid: Optional[TokenGrid] = None) -> PruneResult:
    """Prune each image of ``signals`` ((B, N, .)) to ``keep`` tokens for its text ``texts``
    (B, L, C) and ``text_mask`` (B, L), with ``options.method``, merged as
    :attr:`PruneOptions.merges` says. ``text_space`` maps the tower's rows into the language
    model's space (a projector, or nothing where the tower's merger already did): the attention
    branch, and ``hidden`` for a method that reads the projected rows where the reader gave none
    (the CLIP-style towers, whose projector runs after each family's own reshaping: LLaVA-NeXT's
    packing, the video models' pooling). Only the signals the method reads are touched: the
    others may be None or empty. ``grid``: where
    the tokens lie (``methods.TokenGrid``, the same for every image); None: one square grid."""
    method = get_method(options.method)
    reads = method.reads
    attn = text_space(signals.attn) if Signal.ATTN in reads else None
    projected = None
    if Signal.PROJECTED in reads:
        projected = signals.projected if signals.projected is not None else text_space(signals.hidden)
    text = texts if Signal.TEXT in reads else None
    inputs = MethodInputs(hidden=signals.hidden, keep=keep,
                          saliency=signals.saliency if Signal.SALIENCY in reads else None, attn=attn, text=text,
                          text_mask=text_mask if Signal.TEXT in reads else None,
                          seed=content_seeds(signals.seed) if Signal.SEED in reads else None,
                          projected=projected, keys=signals.keys if Signal.KEYS in reads else None,
                          task_ratio=options.task_ratio, text_reduce=options.text_reduce,
                          text_budget=options.text_budget, backend=options.backend,
                          received=signals.received if Signal.RECEIVED in reads else None,
                          layer_received=signals.layer_received if Signal.LAYER_RECEIVED in reads else None,
                          grid=grid)
    return run_method(method, inputs, options.merges)
