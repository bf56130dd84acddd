"""A model family's entry in ``apply_desap``'s registry (``registry.FAMILIES``): each family module
exports its own :class:`Family`, and the registry maps model class names to them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..common.hooked import Hook
from .state import DesapState


@dataclass(frozen=True)
class Family:
    """How ``apply_desap`` patches one model class, and what that patch needs of the model."""

    install: Callable[[nn.Module, DesapState], None]   # patches the model in place
    hooks: tuple[Hook, ...]                             # the internals the patch uses, checked before patching (compat)
    # (model, pixel_values, image_sizes) -> the processor's placeholder count of each image, for
    # the families whose images go through a LLaVA image path (``image_token_counts``); None: none
    image_tokens: Optional[Callable[[nn.Module, torch.Tensor, Any], list[int]]] = None
