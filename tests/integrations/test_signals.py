"""Signals read by hooks while a CLIP-style vision tower runs, against an eager attention matrix."""
import torch
from integration_prompts import llava_pixels

from desap_ops.testing.tiny import tiny_llava
from desap_ops.integrations.clip_tower import read_tower
from desap_ops.integrations.signals import capture, clip_layout, encoder_layers


def test_cls_saliency_matches_the_eager_attention_matrix():
    pixels = llava_pixels()
    eager = tiny_llava(attn_implementation="eager")
    tower = eager.model.vision_tower
    for index, layer in enumerate(encoder_layers(tower)):
        with capture(clip_layout(layer)) as signals:
            out = tower(pixels, output_attentions=True)
            saliency = signals.cls_saliency()
        torch.testing.assert_close(saliency, out.attentions[index][:, :, 0, :].mean(dim=1), rtol=1e-5, atol=1e-6)


def test_read_tower_reads_the_feature_layer_and_drops_cls():
    pixels = llava_pixels()
    eager = tiny_llava(attn_implementation="eager")
    tower = eager.model.vision_tower
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
        layer = encoder_layers(tower)[1]
        branch = layer.self_attn(layer.layer_norm1(out.hidden_states[1]))[0]
        full = read_tower(tower, pixels, 2, drop_cls=False)
        dropped = read_tower(tower, pixels, 2, drop_cls=True)
    torch.testing.assert_close(full.hidden, out.hidden_states[2])
    torch.testing.assert_close(full.branch, branch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.saliency, out.attentions[1][:, :, 0, :].mean(dim=1), rtol=1e-5, atol=1e-6)
    for got, kept in zip(dropped[1:], full[1:]):
        assert torch.equal(got, kept[:, 1:])
