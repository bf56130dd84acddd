"""Reading a transformers CLIP-style vision tower at the model's feature layer (LLaVA-1.5,
LLaVA-NeXT and the video models): one run of the tower gives the hidden states, the attention
branch and the [CLS] saliency of every token (``common.signals``)."""
from __future__ import annotations

from typing import AbstractSet, Optional

import torch
from torch import nn

from ...methods import SIGNALS, Signal
from ..common.signals import (CLIP_MIDDLE, AttentionLayout, LayerTap, TowerCapture, TowerSignals, frame_content,
                              head_mean, middle_block, tower_pass)


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


def clip_layout(encoder_layer: nn.Module) -> AttentionLayout:
    """CLIP / SigLIP-style layer: ``self_attn`` with ``q_proj`` and ``k_proj``."""
    attention = encoder_layer.self_attn
    return AttentionLayout(attention, attention.q_proj, attention.k_proj,
                           num_heads=attention.num_heads, scale=attention.scale)


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The transformer layers of a CLIP-style vision tower (transformers 5 and 4 layouts)."""
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        try:
            return vision_tower.get_submodule(path)
        except AttributeError:
            continue
    raise TypeError(f"cannot find the encoder layers of {type(vision_tower).__name__}")


def read_tower(tower: nn.Module, pixel_values: torch.Tensor, layer: int, drop_cls: bool,
               reads: AbstractSet[str] = SIGNALS) -> tuple[TowerSignals, object]:
    """Run ``tower`` once on ``pixel_values`` and read the signals at hidden_states[``layer``]
    ((B, T, .) each; ``drop_cls`` removes the [CLS] token from all of them). Returns them and the
    tower's own output (hidden_states included), which the model's feature method also returns.
    Only the signals the pruning method ``reads`` are read (``common.signals.tower_pass``): without
    saliency and branch the tower runs plainly, with no capture."""
    def layout() -> AttentionLayout:
        return clip_layout(encoder_layers(tower)[layer - 1])

    def read(outputs, captured: Optional[TowerCapture]) -> TowerSignals:
        hidden = outputs.hidden_states[layer]
        if captured is None:
            return TowerSignals(hidden)
        keys = head_mean(captured.key, layout().num_heads) if Signal.KEYS in reads else None
        received = layout().received(captured) if Signal.RECEIVED in reads else None
        return TowerSignals(hidden, captured.attention, layout().cls_saliency(captured), keys=keys, received=received)

    def middle() -> AttentionLayout:   # HiPrune's object layer, at or before the feature layer
        layers = encoder_layers(tower)
        return clip_layout(layers[min(middle_block(len(layers), CLIP_MIDDLE), layer - 1)])

    signals, outputs = tower_pass(
        reads, lambda: tower(pixel_values, output_hidden_states=True, return_dict=True), lambda: layout().taps(), read,
        lambda signals: frame_content(pixel_values, signals.hidden.shape[1], signals.hidden.dtype),
        LayerTap(lambda: middle().taps(), lambda captured: middle().received(captured)))
    if drop_cls:
        signals = signals.map(lambda t: t[:, 1:])
    return signals, outputs
