"""HiPrune in transformers: the attention tokens receive (``Signal.RECEIVED``, and
``Signal.LAYER_RECEIVED`` at a middle block) the readers give against eager attention matrices, at the blocks the authors read, and HiPrune's kept tokens with its
anchors and buffers in play (LLaVA-NeXT's packed grid) against its naive form on signals read off an
unpatched eager model."""
import sys

import pytest
import torch

from desap_ops.integrations import apply_desap, last_prune, remove_desap
from desap_ops.integrations.common.layout import crops_per_image, packed_sources
from desap_ops.integrations.common.signals import CLIP_MIDDLE, QWEN_MIDDLE, middle_block
from desap_ops.integrations.hf import qwen2_5_vl, qwen3_vl
from desap_ops.integrations.hf.clip_tower import encoder_layers, feature_layer, read_tower
from desap_ops.methods import Signal
from desap_ops.methods.builtin import hiprune_anchors
from desap_ops.testing.tiny import BOS, IMAGE_TOKEN_ID as IMG, tiny_llava, tiny_llava_next, tiny_qwen2_5_vl, \
    tiny_qwen3_5, tiny_qwen3_vl
from methods.test_method_hiprune import naive_hiprune

from ..prompts import llava_pixels
from .qwen_inputs import inputs as qwen_inputs

TOL = dict(rtol=1e-5, atol=1e-6)
LAYER = frozenset({Signal.LAYER_RECEIVED})


def test_the_middle_block_is_the_authors_object_layer():
    # HIPRUNE_OBJECT_LAYER, counted from 1: 9 of CLIP-L/14's 24 layers, 16 of Qwen2.5-VL's 32 blocks
    # (a full-attention one: 7, 15, 23, 31); a tower of 3 blocks reads its first (CLIP) or second (Qwen)
    assert middle_block(24, CLIP_MIDDLE) == 8 and middle_block(32, QWEN_MIDDLE, [7, 15, 23, 31]) == 15
    assert middle_block(3, CLIP_MIDDLE) == 0 and middle_block(3, QWEN_MIDDLE) == 1
    assert middle_block(32, QWEN_MIDDLE, [20, 31]) == 20   # no full-attention block before: the first
    assert middle_block(1, CLIP_MIDDLE) == 0


def test_clip_received_is_the_column_mean_of_the_attention_at_both_layers_in_the_same_pass():
    """HiPrune's code on CLIP: ``attentions[layer].mean(dim=1).mean(dim=1)[:, 1:]``, every query
    ([CLS] included) of each image, at the middle layer and at the feature layer's block."""
    pixels = llava_pixels()
    eager = tiny_llava(attn_implementation="eager")
    tower, layer = eager.model.vision_tower, feature_layer(eager.config)
    middle = middle_block(len(encoder_layers(tower)), CLIP_MIDDLE)
    assert middle != layer - 1   # the tiny tower's middle layer is not its feature layer
    def hooks():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in encoder_layers(tower).modules()]

    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
        before = hooks()
        both, _ = read_tower(tower, pixels, layer, drop_cls=True, reads=LAYER | {Signal.RECEIVED})
        alone, _ = read_tower(tower, pixels, layer, drop_cls=False, reads=LAYER)
    received = lambda index: out.attentions[index].mean(dim=1).mean(dim=1)  # noqa: E731
    assert pixels.shape[0] > 1   # one softmax per image: no query reaches another image's tokens
    torch.testing.assert_close(both.layer_received, received(middle)[:, 1:], **TOL)
    torch.testing.assert_close(both.received, received(layer - 1)[:, 1:], **TOL)
    torch.testing.assert_close(both.saliency, out.attentions[layer - 1][:, :, 0, 1:].mean(dim=1), **TOL)
    torch.testing.assert_close(alone.layer_received, received(middle), **TOL)
    assert alone.received is None and alone.attn is None   # the middle block alone: no feature-layer capture
    assert hooks() == before   # both captures' hooks removed


QWEN = {"qwen3-vl": (tiny_qwen3_vl, qwen3_vl.read_tower), "qwen3.5": (tiny_qwen3_5, qwen3_vl.read_tower)}


@pytest.mark.parametrize("family", QWEN)
def test_qwen_layer_received_is_the_attention_received_at_the_middle_block(family, monkeypatch):
    """Column means of the middle block's eager attention within each image or frame, summed over
    each token's 2 x 2 patches (Qwen3's encoder runs in the model's order)."""
    build, read = QWEN[family]
    data = qwen_inputs([("image", 8, 12), ("video", 2, 8, 8)], seed=3)
    eager = build(attn_implementation="eager")
    visual = eager.model.visual
    middle = visual.blocks[middle_block(len(visual.blocks), QWEN_MIDDLE)].attn
    assert middle is not visual.blocks[-1].attn
    modeling = sys.modules[type(visual).__module__]
    original, columns = modeling.eager_attention_forward, []

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if module is middle:
            columns.append(weights[0].mean(dim=(0, 1)))
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        columns.clear()
        with torch.no_grad():
            signals = read(eager, data[pixels], data[grid], LAYER | {Signal.RECEIVED})
        expected = torch.cat(columns).view(-1, visual.spatial_merge_unit).sum(dim=1)
        torch.testing.assert_close(signals.layer_received, expected, **TOL)
        # the deep block's: the saliency itself (the attention a token receives)
        assert signals.received is signals.saliency and not torch.equal(signals.received, signals.layer_received)


def test_qwen2_5_vl_reads_its_middle_full_attention_block():
    # the tiny tower's one full-attention block (1 of 3) is both its middle and its last full one
    data = qwen_inputs([("image", 8, 12)], seed=4)
    model = tiny_qwen2_5_vl()
    assert middle_block(3, QWEN_MIDDLE, model.config.vision_config.fullatt_block_indexes) == \
        qwen2_5_vl.saliency_layer(model)
    with torch.no_grad():
        signals = qwen2_5_vl.read_tower(model, data["pixel_values"], data["image_grid_thw"], LAYER | {Signal.RECEIVED})
    assert torch.equal(signals.layer_received, signals.received)


NEXT_SIZES = torch.tensor([[56, 112], [112, 112]])   # 48 visual tokens + 4 newlines, 80 + 8


def test_llava_next_hiprune_keeps_anchors_buffers_and_registers_as_its_naive_form():
    """keep 30 per image: 26 visual tokens for the first (one anchor), 22 for the second (none)."""
    keep = 30
    pixels = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    eager = tiny_llava_next(attn_implementation="eager")
    layer = feature_layer(eager.config)
    middle = middle_block(len(encoder_layers(eager.model.vision_tower)), CLIP_MIDDLE)
    crops = crops_per_image(eager.config, NEXT_SIZES)   # the base and its AnyRes crops
    sources = packed_sources(eager.config, NEXT_SIZES)
    ids = torch.tensor([[BOS, 5] + [IMG] * sum(s.numel() for s in sources) + [7, 8, 9]])
    with torch.no_grad():
        flat = torch.cat([p[:n] for p, n in zip(pixels, crops)])
        out = eager.model.vision_tower(flat, output_attentions=True)
    model = apply_desap(eager, keep=keep, method="hiprune", merge=False)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels, image_sizes=NEXT_SIZES)
        records = last_prune(model)
    finally:
        remove_desap(model)
    start = 0
    for image, (source, n) in enumerate(zip(sources, crops)):
        visual = source[source >= 0]
        def read(index):   # the attention each token of every crop of this image receives, in packed order
            received = out.attentions[index][start:start + n].mean(dim=1).mean(dim=1)[:, 1:]
            return received.flatten()[visual].double().tolist()
        rows = int((source[16:] < 0).sum())
        blocks = ((1, 4, 4),) if visual.numel() == 16 else ((1, 4, 4), (1, rows, (visual.numel() - 16) // rows))
        budget = keep - int((source < 0).sum())
        assert hiprune_anchors(budget) == (1 if image == 0 else 0)
        assert records[image].indices.tolist() == naive_hiprune(read(middle), read(layer - 1), blocks, budget)
        start += n
