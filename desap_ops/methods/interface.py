"""The types of the method interface, which the registry, the built-ins and the runner share:
what a method is given (:class:`MethodInputs`), what it gives back (:class:`Selection`), and a
registered method (:class:`Method`)."""
from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch

DEFAULT_METHOD = "desap"


class Signal(str, enum.Enum):
    """A signal a method may read besides ``hidden``; the engines compute only those a method names.
    Its value is the name plugins and entry points use (``reads={"saliency"}`` keeps working), and
    the name of the :class:`MethodInputs` field (and of the engines' ``TowerSignals`` field) that
    carries it."""

    SALIENCY = "saliency"   # the tower's attention hooks: [CLS] attention, or the attention a token receives
    ATTN = "attn"           # the tower's attention hooks: the attention branch, in the text's space
    TEXT = "text"           # the prompt's text embeddings
    SEED = "seed"           # a hash of the pixels, the same in every engine

    def __str__(self) -> str:
        return self.value


SIGNALS = frozenset(Signal)
DEFAULT_READS = frozenset({Signal.SALIENCY, Signal.ATTN, Signal.TEXT})   # what a method registered without ``reads`` reads


class MethodFailure(ValueError):
    """A method raised, or gave back something that is not a selection. The message names it."""


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
    task_ratio: object = 0.5                 # the operator's options, for methods that read them
    text_reduce: str = "max"
    text_budget: Optional[int] = None
    backend: str = "auto"


class Selection(NamedTuple):
    """What a method gives back: ``indices`` (B, K) int64, strictly ascending in [0, N); optionally
    ``assignment`` (B, N) int64, each token's output position (a kept token its own, a dropped one
    that of the kept token it merges into). Without one, dropped tokens merge into their nearest
    kept token by cosine similarity of ``hidden``."""

    indices: torch.Tensor
    assignment: Optional[torch.Tensor] = None


SelectFn = Callable[[MethodInputs], Union[torch.Tensor, Selection]]


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its function, and the signals it reads (:class:`Signal`)."""

    name: str
    select: SelectFn
    reads: frozenset

    @property
    def code(self) -> int:
        return method_code(self.name)


def method_code(name: str) -> int:
    """A method's number where it travels as a tensor (vLLM's per-item options): exact in float64."""
    return zlib.crc32(name.encode())
