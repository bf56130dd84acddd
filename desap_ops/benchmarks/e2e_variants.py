"""The variants ``desap bench e2e`` runs on one model at each budget: the full model, the ideal and
each pruning method (DeSAP first), all set up by ``apply_desap`` on the same model and the same
inputs, and the calls that are timed and counted (a prefill, the vision tower alone)."""
from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from typing import Callable, Iterator, Union

from torch import nn

from desap_ops.integrations import apply_desap, remove_desap


class Baseline(str, Enum):
    """The two variants that are no pruning method: the unpatched model, and the ideal
    (``apply_desap(model, keep=K, ideal=True)``: each image's first K tokens, no pruning work)."""
    FULL = "full"
    IDEAL = "ideal"


@contextmanager
def variant(model: nn.Module, name: Union[Baseline, str], keep: int) -> Iterator[None]:
    """The model set up for a :class:`Baseline` or a pruning method by name, at budget ``keep``: as
    it is (full), or patched by ``apply_desap`` (ideal: ``ideal=True``; a method: ``method=name``)
    and restored after. Every variant reads the same inputs."""
    if name == Baseline.IDEAL:
        apply_desap(model, keep=keep, ideal=True)
    elif name != Baseline.FULL:
        apply_desap(model, keep=keep, method=name)
    try:
        yield
    finally:
        remove_desap(model)


def prefill(model: nn.Module, inputs: dict) -> Callable[[], object]:
    """One prefill of the batch's ``inputs``, the logits of the last position only (as generate's)."""
    return lambda: model(**inputs, logits_to_keep=1)


def tower_call(model: nn.Module, inputs: dict) -> Callable[[], object]:
    """The vision tower alone on the batch's pixels (LLaVA-1.5 and LLaVA-NeXT layouts)."""
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:
        pixels = pixels.flatten(0, 1)
    return lambda: model.model.vision_tower(pixels, output_hidden_states=True)
