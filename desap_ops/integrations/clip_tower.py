"""Reading a CLIP-style vision tower at the model's feature layer (LLaVA-1.5, LLaVA-NeXT and the
video models): one run of the tower gives the hidden states, the attention branch and the [CLS]
saliency of every token (see ``signals``)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .signals import capture, clip_layout, encoder_layers


class TowerSignals(NamedTuple):
    outputs: object          # the tower's own output (hidden_states included)
    hidden: torch.Tensor     # (B, T, D) the feature layer's hidden states
    branch: torch.Tensor     # (B, T, D) its attention branch, before the residual add
    saliency: torch.Tensor   # (B, T) float32 [CLS] attention


def feature_layer(config) -> int:
    """The index into the tower's hidden_states that ``config.vision_feature_layer`` selects; its
    attention is encoder layer index - 1. A list of layers, or the embeddings, are refused."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"apply_desap needs a single vision_feature_layer, the model uses {layer}")
    count = config.vision_config.num_hidden_layers
    index = layer if layer >= 0 else count + 1 + layer
    if not 1 <= index <= count:
        raise ValueError(f"vision_feature_layer {layer} has no attention layer to read DeSAP's signals from")
    return index


def drops_cls(config) -> bool:
    """Whether the model drops [CLS] from its image features ("default") or keeps it ("full")."""
    return config.vision_feature_select_strategy == "default"


def patch_tokens(vision_config) -> int:
    """Patch tokens of one crop or frame, without [CLS]."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def tokens_per_crop(config) -> int:
    """Feature tokens the model takes from one crop: its patches, and [CLS] unless dropped."""
    return patch_tokens(config.vision_config) + (0 if drops_cls(config) else 1)


def read_tower(tower: nn.Module, pixel_values: torch.Tensor, layer: int, drop_cls: bool) -> TowerSignals:
    """Run ``tower`` once on ``pixel_values`` and read the signals at hidden_states[``layer``];
    ``drop_cls`` removes the [CLS] token from all three."""
    with capture(clip_layout(encoder_layers(tower)[layer - 1])) as signals:
        outputs = tower(pixel_values, output_hidden_states=True, return_dict=True)
        saliency = signals.cls_saliency()
        branch = signals.attention_branch
    hidden = outputs.hidden_states[layer]
    if drop_cls:
        hidden, branch, saliency = hidden[:, 1:], branch[:, 1:], saliency[:, 1:]
    return TowerSignals(outputs, hidden, branch, saliency)
