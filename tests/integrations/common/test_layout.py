"""LLaVA-NeXT's packing, one home for both engines (``integrations/common/layout.py``): the index
map against transformers' own ``pack_image_features`` on real features, and the kept tokens put
back between the newlines."""
import pytest
import torch

from desap_ops.testing.tiny import tiny_llava_next
from desap_ops.integrations.common.layout import (crops_per_image, packed_budget, packed_sources, tokens_per_crop,
                                                  with_newlines)

SIZES = [[56, 112], [112, 112], [56, 56]]   # grids of 1 x 2, 2 x 2 and 1 x 1 crops of 56 pixels, after a base crop


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


def _features(model, seed=0):
    """Random per-crop features of every image of SIZES, and the model's own packing of them."""
    crops = crops_per_image(model.config, SIZES)
    gen = torch.Generator().manual_seed(seed)
    per_crop = [torch.randn(n, tokens_per_crop(model.config), 8, generator=gen) for n in crops]
    newline = torch.randn(8, generator=gen)
    packed, _ = model.model.pack_image_features(per_crop, torch.tensor(SIZES),
                                                model.config.vision_feature_select_strategy, image_newline=newline)
    return per_crop, newline, packed


def test_packed_sources_say_where_each_packed_token_of_the_models_packing_comes_from(model):
    per_crop, newline, packed = _features(model)
    assert crops_per_image(model.config, SIZES) == [3, 5, 2]   # the base crop and the grid
    for own_pack in (None, model.model.pack_image_features):   # vLLM's default, and the model's own method
        sources = packed_sources(model.config, SIZES, pack=own_pack)
        for crops, source, whole in zip(per_crop, sources, packed, strict=True):
            flat = crops.flatten(0, 1)
            rebuilt = torch.where((source >= 0)[:, None], flat[source.clamp_min(0)], newline)
            assert torch.equal(rebuilt, whole)


def test_with_newlines_puts_the_kept_tokens_back_between_every_newline(model):
    per_crop, newline, packed = _features(model, seed=1)
    for crops, source, whole in zip(per_crop, packed_sources(model.config, SIZES), packed):
        is_visual = source >= 0
        visual = crops.flatten(0, 1)[source[is_visual]]
        # every visual token kept: the packed sequence itself
        assert torch.equal(with_newlines(is_visual, torch.arange(visual.shape[0]), visual, newline), whole)
        # every other one kept: the packed sequence without the others, newlines in place
        kept = torch.arange(0, visual.shape[0], 2)
        dropped = is_visual.nonzero()[:, 0][1::2]
        expected = whole[[i for i in range(whole.shape[0]) if i not in set(dropped.tolist())]]
        assert torch.equal(with_newlines(is_visual, kept, visual[kept], newline), expected)


def test_the_budget_counts_the_newlines_and_keeps_one_visual_token_at_least(model):
    sources = packed_sources(model.config, SIZES)
    assert [(s.numel(), int((s < 0).sum())) for s in sources] == [(52, 4), (88, 8), (36, 4)]
    assert [packed_budget(20, s) for s in sources] == [20, 20, 20]
    assert [packed_budget(100, s) for s in sources] == [52, 88, 36]   # at most keep: a small image passes whole
    assert packed_budget(3, sources[1]) == 9                          # its 8 newlines and one visual token
