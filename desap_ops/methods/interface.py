"""The types of the method interface, which the registry, the built-ins and the runner share:
what a method is given (:class:`MethodInputs`), what a selecting method gives back
(:class:`Selection`), and a method (:class:`Method`), checked as it is made."""
from __future__ import annotations

import enum
import math
import re
import zlib
from dataclasses import dataclass
from typing import AbstractSet, Callable, NamedTuple, Optional, Union

import torch

from ..reference import PruneResult

DEFAULT_METHOD = "desap"   # the method an engine runs when none is named
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


class Signal(str, enum.Enum):
    """A signal a method may read besides ``hidden``; the engines compute only those a method names.
    Its value is the name plugins and entry points use (``reads={"saliency"}`` keeps working), and
    the name of the :class:`MethodInputs` field (and of the engines' ``TowerSignals`` field) that
    carries it."""

    SALIENCY = "saliency"   # the tower's attention hooks: [CLS] attention, or the attention a token receives
    ATTN = "attn"           # the tower's attention hooks: the attention branch, in the text's space
    TEXT = "text"           # the prompt's text embeddings
    SEED = "seed"           # a hash of the pixels, the same in every engine
    PROJECTED = "projected" # the rows the language model receives (after the projector; Qwen: hidden itself)
    KEYS = "keys"           # the tower's attention hooks: the saliency block's keys, averaged over heads
    # the tower's attention hooks: the attention each token receives, averaged over heads and over
    # the queries of its image (HiPrune's attention), at the saliency block (Qwen: SALIENCY itself)
    RECEIVED = "received"
    # ... and at a middle, object-centric block of the tower (HiPrune's object layer)
    LAYER_RECEIVED = "layer_received"

    def __str__(self) -> str:
        return self.value


SIGNALS = frozenset(Signal)
DEFAULT_READS = frozenset({Signal.SALIENCY, Signal.ATTN, Signal.TEXT})   # a method's reads when it names none


class MethodFailure(ValueError):
    """A method raised, or gave back something that is not a selection (or a prune result of the
    right shapes). The message names it."""


@dataclass(frozen=True)
class MethodInputs:
    """What a method sees: B images (or video clips) of N candidate tokens each, to keep K of.
    Signals the method did not ask for (``Method.reads``) are None."""

    hidden: torch.Tensor                     # (B, N, D): the tokens' features, what is kept and merged
    keep: int                                # K, 1 <= K <= N: how many to keep (the engines' budget rule decided it)
    saliency: Optional[torch.Tensor] = None  # (B, N) float32: [CLS] attention, or the attention a token receives
    attn: Optional[torch.Tensor] = None      # (B, N, C): the attention branch in the text's space
    text: Optional[torch.Tensor] = None      # (B, L, C): the prompt text each image reads
    text_mask: Optional[torch.Tensor] = None # (B, L) bool: True for valid text tokens
    seed: Optional[torch.Tensor] = None      # (B,) int64 CPU: a hash of each image's pixels, the same in every engine
    projected: Optional[torch.Tensor] = None # (B, N, C): the rows the language model receives (Qwen: hidden itself)
    keys: Optional[torch.Tensor] = None      # (B, N, d): the keys of the block the saliency is read at, mean over heads
    task_ratio: object = 0.5                 # the operator's options, for methods that read them
    text_reduce: str = "max"
    text_budget: Optional[int] = None
    backend: str = "auto"
    # HiPrune: the attention each token receives, at the saliency block and at a middle block, and
    # where each token lies in its image
    received: Optional[torch.Tensor] = None         # (B, N) float32: mean over heads and the image's queries
    layer_received: Optional[torch.Tensor] = None   # (B, N) float32: the same at a middle block
    grid: Optional["TokenGrid"] = None              # where the tokens lie (the same for the B rows); None: one square


class TokenGrid(NamedTuple):
    """Where an image's N tokens lie: ``blocks`` of (frames, rows, columns), one after another in
    token order, each frame-major and then row-major (LLaVA-1.5: one (1, 24, 24); LLaVA-NeXT: its
    base crop, then its unpadded AnyRes grid; a Qwen image or video: (t, h, w) of merged tokens).
    Two tokens are spatial neighbours when they share a block and a frame and lie next to each other
    in a row or a column."""

    blocks: tuple[tuple[int, int, int], ...]

    @property
    def tokens(self) -> int:
        return sum(t * h * w for t, h, w in self.blocks)

    @staticmethod
    def square(tokens: int) -> "TokenGrid":
        """One square image of ``tokens`` tokens (LLaVA-1.5's patch grid); a ValueError if not square."""
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"grid: {tokens} tokens with no grid given form no square; pass a TokenGrid")
        return TokenGrid(((1, side, side),))


class Selection(NamedTuple):
    """What a method gives back: ``indices`` (B, K) int64, strictly ascending in [0, N); optionally
    ``assignment`` (B, N) int64, each token's output position (a kept token its own, a dropped one
    that of the kept token it merges into). Without one, dropped tokens merge into their nearest
    kept token by cosine similarity of ``hidden``."""

    indices: torch.Tensor
    assignment: Optional[torch.Tensor] = None


SelectFn = Callable[[MethodInputs], Union[torch.Tensor, Selection]]
PruneFn = Callable[[MethodInputs, bool], PruneResult]


@dataclass(frozen=True)
class Method:
    """A registered method: its name, the signals it reads (a frozenset of :class:`Signal`; plain
    signal names are accepted and converted), and exactly one of two functions:

    - ``select(inputs)`` chooses the kept indices (a (B, K) tensor or a :class:`Selection`); the
      runner checks them and gathers or merges the tokens as the contract's step 4 does;
    - ``prune(inputs, merge)`` does the whole step itself (a fused kernel: DeSAP) and gives back a
      :class:`~desap_ops.reference.PruneResult`, which the runner checks.

    ``checked=False`` (a ``prune`` method only) runs it with no check and no wrapping: its errors
    surface as they are. The built-in DeSAP is such a method, the operator, whose own argument
    checks are the caller's to see and whose results its test suite holds to the contract.

    ``merges`` is whether the method merges its dropped tokens into the kept ones by default (its
    paper's choice: DeSAP merges, FasterVLM and DivPrune drop); the engines' ``merge`` option
    overrides it, and left at None it is this."""

    name: str
    select: Optional[SelectFn] = None
    reads: frozenset[Signal] = DEFAULT_READS
    prune: Optional[PruneFn] = None
    checked: bool = True
    merges: bool = True

    def __post_init__(self):
        check_name(self.name)
        object.__setattr__(self, "reads", check_reads(self.name, self.reads))
        if (self.select is None) == (self.prune is None):
            got = "both" if self.select is not None else "neither"
            raise TypeError(f"method {self.name!r} must have exactly one of select (it chooses the kept tokens) "
                            f"and prune (it prunes the whole step), got {got}")
        kind, fn = ("select", self.select) if self.select is not None else ("prune", self.prune)
        if not callable(fn):
            raise TypeError(f"method {self.name!r}: {kind} must be callable, got {type(fn).__name__}")
        if not isinstance(self.checked, bool) or (not self.checked and self.prune is None):
            raise TypeError(f"method {self.name!r}: checked must be True or False, and False only for a prune "
                            f"method, got {self.checked!r} for a {kind} method")
        if not isinstance(self.merges, bool):
            raise TypeError(f"method {self.name!r}: merges must be True or False (whether it merges its dropped "
                            f"tokens by default), got {self.merges!r}")

    @property
    def code(self) -> int:
        return method_code(self.name)


def check_name(name) -> None:
    """A ValueError unless ``name`` is a valid method name."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"method name must be 1 to 63 lower-case letters, digits, '_', '.' or '-', "
                         f"starting with a letter or digit, got {name!r}")


def check_reads(name: str, reads) -> frozenset[Signal]:
    """``reads`` (Signals or their names) as a frozenset of :class:`Signal`; a TypeError or
    ValueError naming the method otherwise."""
    names = sorted(s.value for s in Signal)
    if isinstance(reads, str) or not isinstance(reads, (AbstractSet, list, tuple)) or \
            not all(isinstance(s, str) for s in reads):
        raise TypeError(f"method {name!r}: reads must be a collection of signal names from {names}, got {reads!r}")
    unknown = sorted(set(reads) - set(names))
    if unknown:
        raise ValueError(f"method {name!r} reads unknown signal(s) {unknown}; the signals are {names}")
    return frozenset(Signal(s) for s in reads)


def method_code(name: str) -> int:
    """A method's number where it travels as a tensor (vLLM's per-item options): exact in float64."""
    return zlib.crc32(name.encode())
