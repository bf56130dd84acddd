"""DeSAP inside transformers' Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Qwen2.5-VL's vision encoder has no [CLS] token, runs window attention in most layers, and merges
each 2 x 2 group of patches into one language-model token. DeSAP runs at the level of those
language-model tokens:

- saliency: the attention each token *receives* at the encoder's last full-attention layer (the
  mean over queries of softmax(q k^T) within its image, or its frame of a video, averaged over
  heads, summed over the 2 x 2 patches of the token). It is computed from that layer's own queries
  and keys (rotary applied), one block of queries at a time, so no attention matrix is ever held,
  and the model's own attention (SDPA or flash) runs unchanged in every layer;
- attention branch: that layer's attention output, mapped to the language model's space by the
  model's own patch merger;
- hidden and metric: the merged tokens the language model receives.

Images get ``keep`` tokens each, videos ``keep`` across all their frames. Planning the call,
positions and generation are shared with the other Qwen families (``qwen``, the Qwen base patcher).
"""
from __future__ import annotations

from typing import AbstractSet

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ...methods import SIGNALS
from ..common.hooked import Hook
from ..common.signals import TowerSignals
from . import qwen
from .family import Family
from .state import DesapState

HOOKS = (
    *qwen.PLAN_HOOKS,
    Hook("model.model.get_rope_index", ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask",
                                        "video_grid_thw", "second_per_grid_ts")),
    Hook("transformers.vision_utils.get_vision_window_index", ("spatial_merge_size", "window_size", "patch_size",
                                                                          "kwargs")),
    Hook("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.apply_rotary_pos_emb_vision"),
)


def saliency_layer(model: nn.Module) -> int:
    """The vision block DeSAP reads: the last full-attention block."""
    return model.config.vision_config.fullatt_block_indexes[-1]


def read_tower(model: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor,
               reads: AbstractSet[str] = SIGNALS) -> TowerSignals:
    """One tower pass over images or videos, read at :func:`saliency_layer`: per language-model
    token (all images, or all videos, in the model's order) the hidden state (T', C), the attention
    branch in text space (T', C) and the saliency (T',), and the pixel hashes; only those the method
    ``reads`` (without saliency and branch, a plain pass with no capture). Needs no patch: it reads
    the model as it is."""
    visual = model.model.visual

    def window_order(device: torch.device) -> torch.Tensor:
        """The encoder's window order -> the model's order."""
        # here, not at the top: importing the modeling module costs seconds
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size,
                                                  kwargs={})
        return torch.argsort(window_index.to(device))

    return qwen.read_qwen_tower(visual, pixels, grid_thw, reads, saliency_layer(model), _rotary, window_order)


def _rotary():
    # here, not at the top: importing the modeling module costs seconds
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    return apply_rotary_pos_emb_vision


def _output(features: list, levels: list) -> BaseModelOutputWithPooling:
    return BaseModelOutputWithPooling(pooler_output=features)


def install(model: nn.Module, state: DesapState) -> None:
    """Patch a Qwen2.5-VL model: forward, generate, generate's positions, the image and video features."""
    qwen.install(model, state, read_tower, _output)


FAMILY = Family(install, HOOKS)
