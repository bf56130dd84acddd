"""The one place both engines prune an image: the options' pruning method (``desap_ops.methods``;
DeSAP by default, through ``desap_ops.prune``) on the tower's signals. Each method names the signals
it reads (``PruneOptions.reads``), and the engines compute only those: a method that reads no
saliency and no attention branch runs the tower plainly, with no attention capture, and one that
reads no text embeds none. The options' defaults (:data:`DEFAULTS`) are both engines'. The
``ideal`` option (the speed pruning could reach if it cost nothing: ``apply_desap(...,
ideal=True)`` and vLLM's ``hf_overrides={"desap": {..., "ideal": true}}`` alike) is translated
here, as the options are checked, into what it is: the method ``first``, unmerged."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ...methods import DEFAULT_METHOD, MethodInputs, Signal, TokenGrid, content_seeds, get_method, run_method
from ...reference import PruneResult
from ...validation import check_backend, check_options, check_text_budget
from .signals import TowerSignals

IDEAL = "first"             # ``ideal=True`` is this method, unmerged
FALLBACK_METHOD = "first"   # what vLLM runs (merged, as the request asked) for images whose method failed


@dataclass(frozen=True)
class PruneDefaults:
    """The defaults of the options both engines take by the same names: ``apply_desap``'s
    signature and vLLM's ``hf_overrides["desap"]`` read them here."""

    keep: int = 64
    task_ratio: Union[float, str] = 0.5
    merge: bool = True
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
    merge: bool                       # merge the dropped tokens into the kept ones (and the DeepStack levels alike)
    text_reduce: str
    backend: str
    text_budget: Optional[int]        # at most this many text tokens per image; None: all
    method: str                       # a registered pruning method (``desap_ops.methods``)

    @staticmethod
    def checked(keep, task_ratio, merge, text_reduce, backend, text_budget, method=DEFAULTS.method, *,
                ideal=DEFAULTS.ideal) -> "PruneOptions":
        """The options checked and normalised (``desap_ops.validation``; ``method`` must be
        registered); ``ideal=True`` gives the method ``first`` with ``merge`` False (with
        ``method`` left at the default, or ``first``). An engine's own options extend them
        (``PruneOptions`` subclasses built from ``vars()`` of these)."""
        keep, task_ratio, merge, text_reduce = check_options(keep, task_ratio, merge, text_reduce)
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


def tower_reads(options) -> frozenset[Signal]:
    """The signals any of ``options`` (one per image of a tower pass) reads."""
    return frozenset().union(*(o.reads for o in options))


def prune_images(signals: TowerSignals, text_space: Callable[[torch.Tensor], torch.Tensor], texts: Optional[torch.Tensor],
                 text_mask: Optional[torch.Tensor], keep: int, options: PruneOptions,
                 grid: Optional[TokenGrid] = None) -> PruneResult:
    """Prune each image of ``signals`` ((B, N, .)) to ``keep`` tokens for its text ``texts``
    (B, L, C) and ``text_mask`` (B, L), with ``options.method``. ``text_space`` maps the attention
    branch into the text's space (a projector, or nothing where the tower's merger already did).
    Only the signals the method reads are touched: the others may be None or empty. ``grid``: where
    the tokens lie (``methods.TokenGrid``, the same for every image); None: one square grid."""
    method = get_method(options.method)
    reads = method.reads
    attn = text_space(signals.attn) if Signal.ATTN in reads else None
    text = texts if Signal.TEXT in reads else None
    inputs = MethodInputs(hidden=signals.hidden, keep=keep,
                          saliency=signals.saliency if Signal.SALIENCY in reads else None, attn=attn, text=text,
                          text_mask=text_mask if Signal.TEXT in reads else None,
                          seed=content_seeds(signals.seed) if Signal.SEED in reads else None,
                          task_ratio=options.task_ratio, text_reduce=options.text_reduce,
                          text_budget=options.text_budget, backend=options.backend,
                          layer_saliency=signals.layer_saliency if Signal.LAYER_SALIENCY in reads else None,
                          grid=grid)
    return run_method(method, inputs, options.merge)
