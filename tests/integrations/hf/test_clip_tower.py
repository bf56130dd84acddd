"""Signals read by hooks while a transformers CLIP-style vision tower runs (``integrations/hf/clip_tower.py``),
against an eager attention matrix."""
import torch

from desap_ops.testing.tiny import tiny_llava
from desap_ops.integrations.common.signals import capture
from desap_ops.integrations.hf.clip_tower import clip_layout, encoder_layers, read_tower

from ..prompts import llava_pixels


def test_cls_saliency_matches_the_eager_attention_matrix():
    pixels = llava_pixels()
    eager = tiny_llava(attn_implementation="eager")
    tower = eager.model.vision_tower
    for index, layer in enumerate(encoder_layers(tower)):
        layout = clip_layout(layer)
        with capture(layout.taps()) as captured:
            out = tower(pixels, output_attentions=True)
        saliency = layout.cls_saliency(captured)
        torch.testing.assert_close(saliency, out.attentions[index][:, :, 0, :].mean(dim=1), rtol=1e-5, atol=1e-6)


def test_read_tower_reads_the_feature_layer_and_drops_cls():
    pixels = llava_pixels()
    eager = tiny_llava(attn_implementation="eager")
    tower = eager.model.vision_tower
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
        layer = encoder_layers(tower)[1]
        branch = layer.self_attn(layer.layer_norm1(out.hidden_states[1]))[0]
        full, _ = read_tower(tower, pixels, 2, drop_cls=False)
        dropped, _ = read_tower(tower, pixels, 2, drop_cls=True)
    torch.testing.assert_close(full.hidden, out.hidden_states[2])
    torch.testing.assert_close(full.attn, branch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.saliency, out.attentions[1][:, :, 0, :].mean(dim=1), rtol=1e-5, atol=1e-6)
    for got, kept in ((dropped.hidden, full.hidden), (dropped.attn, full.attn), (dropped.saliency, full.saliency)):
        assert torch.equal(got, kept[:, 1:])
