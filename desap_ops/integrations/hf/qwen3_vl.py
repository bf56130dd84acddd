"""DeSAP inside transformers' Qwen3-VL and Qwen3.5, dense and MoE
(``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``,
``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``).

The four share one vision tower: no [CLS], full attention in every block (within an image, or
within one frame of a video), a 2 x 2 patch merger. Qwen3.5 is that tower without DeepStack, so
one patcher serves both generations:

- saliency: the attention each language-model token receives at the tower's **last** block (summed
  over its 2 x 2 patches), from that block's own queries and keys with rotary applied;
- attention branch: the last block's attention output through the model's own merger;
- hidden and metric: the merged tokens the language model receives;
- DeepStack (Qwen3-VL): the features of the earlier tower layers that the first language-model
  layers add at the visual positions are pruned with the same indices and merged with the same
  assignment as the main tokens, so every level stays aligned with the kept tokens.

Planning, positions (the timestamps between a video's frames are text and keep theirs) and
generation are shared with Qwen2.5-VL (``qwen``, the Qwen base patcher).
"""
from __future__ import annotations

import inspect
import sys

from typing import AbstractSet

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ...methods import SIGNALS
from ..common.signals import TowerSignals, captures, patch_content, with_content
from . import qwen
from .compat import Hook
from .state import DesapState


def _hooks(module: str, deepstack: bool) -> tuple[Hook, ...]:
    """The internals the patch uses in the modeling module ``module`` (``transformers.models.<name>``)."""
    modeling = f"transformers.models.{module}.modeling_{module}"
    return (
        *qwen.PLAN_HOOKS,
        Hook("model.model.get_rope_index", ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                                            "attention_mask")),
        Hook(f"{modeling}.apply_rotary_pos_emb_vision"),
        *((Hook("model.model.visual.deepstack_merger_list"),
           Hook(f"{modeling}.BaseModelOutputWithDeepstackFeatures")) if deepstack else ()),
    )


HOOKS_QWEN3_VL = _hooks("qwen3_vl", deepstack=True)
HOOKS_QWEN3_VL_MOE = _hooks("qwen3_vl_moe", deepstack=True)
HOOKS_QWEN3_5 = _hooks("qwen3_5", deepstack=False)
HOOKS_QWEN3_5_MOE = _hooks("qwen3_5_moe", deepstack=False)


def _modeling(model: nn.Module):
    """The modeling module of ``model``'s vision tower (its own rotary and output classes)."""
    return sys.modules[type(model.model.visual).__module__]


def has_deepstack(model: nn.Module) -> bool:
    return len(getattr(model.model.visual, "deepstack_merger_list", ())) > 0


def read_tower(model: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor,
               reads: AbstractSet[str] = SIGNALS) -> TowerSignals:
    """One tower pass over images or videos, read at the last block; DeepStack levels included.
    Only the signals the method ``reads`` (without saliency and branch: the hidden states and
    levels alone, from a plain pass with no capture), and the pixel hashes where it reads the seed."""
    visual = model.model.visual
    signals = _read(model, visual, pixels, grid_thw, reads)
    return with_content(signals, lambda: patch_content(pixels, visual), reads)


def _read(model: nn.Module, visual: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, reads) -> TowerSignals:
    if not captures(reads):
        outputs = visual(pixels.type(visual.dtype), grid_thw=grid_thw)
        return TowerSignals(outputs.pooler_output, levels=tuple(getattr(outputs, "deepstack_features", None) or ()))
    block = visual.blocks[-1]
    with qwen.capture_block(block) as store:
        outputs = visual(pixels.type(visual.dtype), grid_thw=grid_thw)
    received = qwen.block_received_attention(block, store, _modeling(model).apply_rotary_pos_emb_vision)
    saliency = received.view(-1, visual.spatial_merge_unit).sum(dim=1)   # the tower's order is the model's
    levels = tuple(getattr(outputs, "deepstack_features", None) or ())
    return TowerSignals(outputs.pooler_output, visual.merger(store["branch"]), saliency, levels)


def deepstack_per_image(model: nn.Module) -> bool:
    """Whether the model reads DeepStack levels split per image (transformers >= 5.18, the release
    that also brought ``mm_encoder_outputs`` to the forward) or as one tensor per level (before)."""
    return "mm_encoder_outputs" in inspect.signature(type(model.model).forward).parameters


def install(model: nn.Module, state: DesapState) -> None:
    """Patch a Qwen3-VL or Qwen3.5 model (dense or MoE): forward, generate, generate's positions,
    the image and video features."""
    if not has_deepstack(model):
        output = lambda features, levels: BaseModelOutputWithPooling(pooler_output=features)  # noqa: E731
    else:
        with_deepstack, per_image = _modeling(model).BaseModelOutputWithDeepstackFeatures, deepstack_per_image(model)

        def output(features: list, levels: list):
            stacked = levels if per_image else [torch.cat(level) for level in levels]
            return with_deepstack(pooler_output=features, deepstack_features=stacked)
    qwen.install(model, state, read_tower, output)
