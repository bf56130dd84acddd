"""apply_desap on a tiny random-weight Qwen2.5-VL built from a config: images, and videos (one budget per clip)."""
import pytest
import torch

from desap_ops import reference
from desap_ops.testing.tiny import QWEN_IMAGE as IMG, QWEN_VIDEO as VID, tiny_qwen2_5_vl
from desap_ops.integrations import apply_desap, last_prune, remove_desap
from desap_ops.integrations.common import signals
from desap_ops.integrations.hf import qwen2_5_vl

from ..prompts import pad
from . import qwen_inputs
from .fed import fed_rows, language_model_input
from .operator_by_hand import OPTIONS, PLANTED, check_record, plant_and_prune
from .qwen_checks import (TEXT, VIDEO, check_batch_equals_rows, check_generate_matches_forward,
                          check_keep_all_leaves_logits_unchanged, check_one_budget_per_clip, check_remove_restores)

START, END = 153, 154
PATCH_WIDTH = 3 * 2 * 14 * 14


def _image(grid_h, grid_w, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(grid_h * grid_w, PATCH_WIDTH, generator=gen), [1, grid_h, grid_w]


def _prompt(grids, before=(5,), after=(7, 8, 9)):
    ids = [1, *before]
    for _, h, w in grids:
        ids += [START] + [IMG] * (h * w // 4) + [END]
    return ids + list(after)


def _inputs(grids, seeds, **prompt):
    pixels = torch.cat([_image(h, w, s)[0] for (_, h, w), s in zip(grids, seeds)])
    ids = torch.tensor([_prompt(grids, **prompt)])
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(ids == IMG).int())


def test_received_attention_matches_the_full_matrix():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(20, 2, 8, generator=gen), torch.randn(20, 2, 8, generator=gen)
    segments = [(0, 8), (8, 20)]
    got = signals.received_attention(q, k, segments, 0.35)
    for start, end in segments:
        weights = (q[start:end].transpose(0, 1) @ k[start:end].transpose(0, 1).transpose(1, 2) * 0.35).softmax(-1)
        torch.testing.assert_close(got[start:end], weights.mean(dim=1).mean(dim=0))
        torch.testing.assert_close(got[start:end].sum(), torch.tensor(1.0))


def test_tower_signals_are_the_eager_attention_matrices_back_in_the_models_order(monkeypatch):
    """read_tower at the full-attention block, against an eager pass recorded by hand: saliency is
    the column means of the block's attention matrices (each image), summed per merged token, and
    the branch is the block's output through the merger, both moved from the encoder's window order
    to the model's by the permutation the encoder applied to the patch embeddings (found here by
    matching rows, not from the model's window index)."""
    import sys

    model = tiny_qwen2_5_vl(attn_implementation="eager")
    visual = model.model.visual
    inputs = _inputs([[1, 8, 12], [1, 4, 8]], [3, 4])
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        got = qwen2_5_vl.read_tower(model, pixels, grid)

    modeling = sys.modules[type(visual).__module__]
    block = visual.blocks[model.config.vision_config.fullatt_block_indexes[-1]].attn
    columns, seen, original = [], {}, modeling.eager_attention_forward

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if module is block:
            columns.append(weights[0].mean(dim=(0, 1)))   # mean over heads and queries: (keys,)
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    hooks = [visual.patch_embed.register_forward_hook(lambda m, a, out: seen.update(model_order=out)),
             visual.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(window_order=args[0])),
             block.register_forward_hook(lambda m, a, out: seen.update(branch=out))]
    with torch.no_grad():
        out = visual(pixels, grid_thw=grid)
        branch = visual.merger(seen["branch"])
    for hook in hooks:
        hook.remove()
    unit = visual.spatial_merge_unit
    model_rows, window_rows = (seen[k].reshape(-1, unit * seen[k].shape[-1]) for k in ("model_order", "window_order"))
    source = torch.cdist(window_rows, model_rows).argmin(dim=1)   # the model's token at each window position
    assert torch.equal(window_rows, model_rows[source])
    assert not torch.equal(source, torch.arange(len(source)))     # window order is not the model's here
    saliency = torch.empty_like(got.saliency)
    saliency[source] = torch.cat(columns).view(-1, unit).sum(dim=1)
    expected_branch = torch.empty_like(branch)
    expected_branch[source] = branch
    assert torch.equal(got.hidden, out.pooler_output)
    torch.testing.assert_close(got.saliency, saliency, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.attn, expected_branch, rtol=1e-5, atol=1e-6)


def test_keep_all_without_merge_leaves_logits_unchanged():
    model = tiny_qwen2_5_vl()
    single = _inputs([[1, 8, 12]], [1])
    expected = model(**single).logits
    apply_desap(model, keep=24, merge=False)
    assert torch.equal(model(**single).logits, expected)


def test_two_resolutions_in_one_prompt_each_get_the_budget():
    model = tiny_qwen2_5_vl()
    inputs = _inputs([[1, 8, 12], [1, 4, 4]], [1, 2])   # 24 and 4 tokens
    apply_desap(model, keep=4)
    out = model(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - (24 - 4)
    assert [len(r.indices) for r in last_prune(model)] == [4, 4]
    apply_desap(model, keep=6)    # keep means at most: the 4-token image passes whole
    model(**inputs)
    assert [len(r.indices) for r in last_prune(model)] == [6, 4]


def test_kept_tokens_keep_their_original_rotary_positions():
    model = tiny_qwen2_5_vl()
    inputs = _inputs([[1, 8, 12], [1, 8, 8]], [3, 4])
    full_positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs["image_grid_thw"])
    apply_desap(model, keep=5)
    with language_model_input(model) as seen:
        out = model(**inputs)
    ids = inputs["input_ids"][0]
    placeholders = (ids == IMG).nonzero()[:, 0]
    starts = [0, 24]
    kept_positions = torch.cat([placeholders[start + idx] for start, idx in zip(starts, (r.indices for r in last_prune(model)))])
    keep_mask = ids != IMG
    keep_mask[kept_positions] = True
    assert out.logits.shape[1] == int(keep_mask.sum()) == ids.numel() - (24 - 5) - (16 - 5)
    assert torch.equal(seen.position_ids[:, 0], full_positions[:, 0, keep_mask])
    assert int((seen.position_ids.shape[-1])) == int(keep_mask.sum())


def test_language_model_gets_the_reference_operator_output():
    model = tiny_qwen2_5_vl()
    inputs = _inputs([[1, 8, 12]], [5], after=(7, 8, 9, 10))
    with torch.no_grad():
        tower = qwen2_5_vl.read_tower(model, inputs["pixel_values"], inputs["image_grid_thw"])
        hidden, branch, saliency = tower.hidden, tower.attn, tower.saliency
        text = model.get_input_embeddings()(torch.tensor([[7, 8, 9, 10]]))
        expected = reference.prune(hidden[None], branch[None], text, saliency[None], 7, task_ratio=0.4)
    assert torch.isclose(saliency.sum(), torch.tensor(1.0))   # attention received, one image
    apply_desap(model, keep=7, task_ratio=0.4)
    with language_model_input(model) as seen:
        model(**inputs)
    image_rows = fed_rows(seen, IMG)
    torch.testing.assert_close(image_rows, expected.tokens[0], rtol=1e-5, atol=1e-6)
    assert last_prune(model)[0].indices.tolist() == expected.indices[0].tolist()


def _sharpened():
    """A tiny Qwen2.5-VL whose saliency layer attends sharply (queries x 300): a random model
    attends almost uniformly, so its tokens' attention branches are nearly parallel and no text
    token can single any of them out."""
    model = tiny_qwen2_5_vl()
    qkv = model.model.visual.blocks[qwen2_5_vl.saliency_layer(model)].attn.qkv
    with torch.no_grad():
        qkv.weight[:qkv.weight.shape[0] // 3].mul_(300)
    return model


@pytest.mark.parametrize("options", OPTIONS)
def test_auto_split_and_text_budget_agree_with_the_operator_by_hand(options):
    keep, text = 6, (7, 8, PLANTED, 10, 11, 12)
    model = _sharpened()
    inputs = _inputs([[1, 8, 12]], [1], after=text)
    with torch.no_grad():
        tower = qwen2_5_vl.read_tower(model, inputs["pixel_values"], inputs["image_grid_thw"])
        hidden, branch, saliency = tower.hidden, tower.attn, tower.saliency
    by_hand, everything = plant_and_prune(model, hidden[None], branch[None], saliency[None], text, keep, options)
    apply_desap(model, keep=keep, **options)
    model(**inputs)
    check_record(last_prune(model), by_hand, everything, options)


@pytest.mark.parametrize("options", [dict(task_ratio=0.5), dict(task_ratio="auto")])
def test_a_text_budget_covering_the_text_changes_nothing(options):
    text = (7, 8, 9, 10)
    inputs = _inputs([[1, 8, 12]], [2], after=text)
    model = apply_desap(tiny_qwen2_5_vl(), keep=5, **options)
    expected = model(**inputs).logits
    for budget in (len(text), 100):
        apply_desap(model, keep=5, text_budget=budget, **options)
        assert torch.equal(model(**inputs).logits, expected)


def test_generate_under_auto_and_a_text_budget_matches_forward():
    model = apply_desap(tiny_qwen2_5_vl(), keep=6, task_ratio="auto", text_budget=2)
    inputs = _inputs([[1, 8, 12], [1, 8, 8]], [6, 7], after=(7, 8, 9, 10))
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, :-3], inputs["input_ids"])    # the caller's prompt, then the new tokens
    assert out[0, -3] == model(**inputs).logits[0, -1].argmax()
    assert all(isinstance(r.task_keep, int) and 0 <= r.task_keep <= 6 for r in last_prune(model))


def test_generate_is_deterministic_and_matches_forward():
    model = apply_desap(tiny_qwen2_5_vl(), keep=6)
    inputs = _inputs([[1, 8, 12]], [6])
    first = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    second = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, second)
    logits = model(**inputs).logits
    assert torch.equal(first[:, :-4], inputs["input_ids"])
    assert first[0, -4] == logits[0, -1].argmax()


def test_batch_generate_equals_its_rows_alone_with_left_padding():
    model = apply_desap(tiny_qwen2_5_vl(), keep=5)
    rows = [_inputs([[1, 8, 12]], [7], after=(7, 8, 9, 10, 11)), _inputs([[1, 8, 8]], [8], after=(9,))]
    ids, mask = pad([r["input_ids"][0].tolist() for r in rows], left=True)
    batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).int(),
                 pixel_values=torch.cat([r["pixel_values"] for r in rows]),
                 image_grid_thw=torch.cat([r["image_grid_thw"] for r in rows]))
    together = model.generate(**batch, max_new_tokens=3, do_sample=False)
    for i, r in enumerate(rows):
        alone = model.generate(**r, max_new_tokens=3, do_sample=False)
        assert together[i, -3:].tolist() == alone[0, -3:].tolist()


def test_attention_implementation_is_untouched_and_remove_restores():
    model = tiny_qwen2_5_vl()
    inputs = _inputs([[1, 8, 8]], [9])
    before = model(**inputs).logits
    apply_desap(model, keep=4)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    model(**inputs)
    remove_desap(model)
    for name in ("forward", "generate", "_prepare_position_ids_for_generation"):
        assert name not in model.__dict__
    assert "get_image_features" not in model.model.__dict__
    assert torch.equal(model(**inputs).logits, before)


# --- videos: one budget per clip, as for Qwen3-VL (qwen_checks, without per-frame timestamps) ---

@pytest.mark.parametrize("media", ["video", "image+video"])
def test_video_keep_all_without_merge_leaves_logits_unchanged(media):
    check_keep_all_leaves_logits_unchanged(tiny_qwen2_5_vl, media, timestamps=False)


def test_video_language_model_gets_the_reference_operator_and_original_positions():
    model = tiny_qwen2_5_vl()
    data = qwen_inputs.inputs([VIDEO], seed=5, timestamps=False, after=TEXT)
    with torch.no_grad():
        tower = qwen2_5_vl.read_tower(model, data["pixel_values_videos"], data["video_grid_thw"])
        hidden, branch, saliency = tower.hidden, tower.attn, tower.saliency
        text = model.get_input_embeddings()(torch.tensor([TEXT]))
        expected = reference.prune(hidden[None], branch[None], text, saliency[None], 7, task_ratio=0.4)
    assert torch.isclose(saliency.sum(), torch.tensor(2.0))   # attention received within each of 2 frames
    apply_desap(model, keep=7, task_ratio=0.4)
    with language_model_input(model) as seen:
        model(**data)
    kept = last_prune(model)[0].indices
    assert kept.tolist() == expected.indices[0].tolist()
    ids = data["input_ids"]
    torch.testing.assert_close(seen.inputs_embeds[0][seen.input_ids[0] == VID], expected.tokens[0],
                               rtol=1e-5, atol=1e-6)
    full, _ = model.model.get_rope_index(ids, mm_token_type_ids=data["mm_token_type_ids"],
                                         video_grid_thw=data["video_grid_thw"])
    columns = sorted((ids[0] != VID).nonzero()[:, 0].tolist() + (ids[0] == VID).nonzero()[:, 0][kept].tolist())
    assert torch.equal(seen.position_ids[:, 0], full[:, 0, columns])


def test_video_one_budget_per_clip_and_keep_means_at_most():
    check_one_budget_per_clip(tiny_qwen2_5_vl, timestamps=False)


@pytest.mark.parametrize("media", ["video", "image+video"])
def test_video_generate_matches_forward(media):
    check_generate_matches_forward(tiny_qwen2_5_vl, media, timestamps=False)


def test_video_left_padded_batch_of_an_image_row_and_a_video_row_equals_its_rows():
    check_batch_equals_rows(tiny_qwen2_5_vl, timestamps=False)


def test_video_remove_desap_restores():
    check_remove_restores(tiny_qwen2_5_vl, timestamps=False)
