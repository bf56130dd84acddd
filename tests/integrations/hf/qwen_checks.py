"""The checks every Qwen family passes under apply_desap (tiny random-weight models), called by
test_qwen3_vl.py and test_qwen3_5.py with their builders, and in part by test_qwen2_5_vl.py."""
import sys

import torch

from desap_ops import reference
from desap_ops.integrations import apply_desap, last_prune, remove_desap

from .fed import language_model_input
from .qwen_inputs import IMG, VID, batch, inputs, tokens

IMAGE, VIDEO = ("image", 8, 12), ("video", 2, 8, 8)   # 24 tokens; 2 frames of 16 tokens
MEDIA = {"image": [IMAGE], "video": [VIDEO], "image+video": [IMAGE, VIDEO]}
TEXT = (7, 8, 9, 10)


def eager_tower(build, monkeypatch, pixels, grid):
    """Signals read off an eager twin without DeSAP's hooks: the merged tokens, the last block's
    attention branch through the merger, saliency as the column means of the last block's full
    attention matrices (each image or frame), summed over each token's 2 x 2 patches, and the
    DeepStack levels."""
    eager = build(attn_implementation="eager")
    visual = eager.model.visual
    modeling = sys.modules[type(visual).__module__]
    last, columns, branch = visual.blocks[-1].attn, [], {}
    original = modeling.eager_attention_forward

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if module is last:
            columns.append(weights[0].mean(dim=(0, 1)))   # mean over heads and queries: (keys,)
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    handle = last.register_forward_hook(lambda module, args, output: branch.update(out=output))
    with torch.no_grad():
        out = visual(pixels, grid_thw=grid)
        merged_branch = visual.merger(branch["out"])
    handle.remove()
    saliency = torch.cat(columns).view(-1, visual.spatial_merge_unit).sum(dim=1)
    return eager, out.pooler_output, merged_branch, saliency, list(getattr(out, "deepstack_features", None) or [])


def group_means(rows: torch.Tensor, assignment: torch.Tensor, keep: int) -> torch.Tensor:
    """Output j: the mean of the rows assigned to j, by hand."""
    return torch.stack([rows[assignment == j].mean(dim=0) for j in range(keep)])


def check_keep_all_leaves_logits_unchanged(build, media, timestamps=True):
    model = build()
    data = inputs(MEDIA[media], seed=1, timestamps=timestamps)
    expected = model(**data).logits
    apply_desap(model, keep=max(tokens(m) for m in MEDIA[media]), merge=False)
    assert torch.equal(model(**data).logits, expected)


def check_reference_operator_and_positions(build, monkeypatch, media, levels_expected, keep=7, timestamps=True):
    """One medium: the language model gets desap_ops.reference.prune of signals read off an eager
    twin, at the kept tokens' original 3D positions, and each DeepStack level the group means of
    that level's features."""
    (medium,) = MEDIA[media]
    data = inputs([medium], seed=5, timestamps=timestamps, after=TEXT)
    pixel_key, grid_key = ("pixel_values", "image_grid_thw") if medium[0] == "image" else \
        ("pixel_values_videos", "video_grid_thw")
    eager, hidden, branch, saliency, levels = eager_tower(build, monkeypatch, data[pixel_key], data[grid_key])
    with torch.no_grad():
        text = eager.get_input_embeddings()(torch.tensor([TEXT]))
        expected = reference.prune(hidden[None], branch[None], text, saliency[None], keep, task_ratio=0.4)

    model = apply_desap(build(), keep=keep, task_ratio=0.4)
    with language_model_input(model) as seen, torch.no_grad():
        model(**data)
    (record,) = last_prune(model)
    assert record.indices.tolist() == expected.indices[0].tolist()
    torch.testing.assert_close(record.saliency, saliency, rtol=1e-5, atol=1e-6)
    placeholder = IMG if medium[0] == "image" else VID
    fed = seen.input_ids[0] == placeholder
    torch.testing.assert_close(seen.inputs_embeds[0][fed], expected.tokens[0], rtol=1e-5, atol=1e-5)

    # DeepStack: every level the group means over the same assignment
    assert len(levels) == levels_expected and len(seen.deepstack_visual_embeds or []) == levels_expected
    for level, fed_level in zip(levels, seen.deepstack_visual_embeds or []):
        torch.testing.assert_close(fed_level, group_means(level, record.assignment, keep), rtol=1e-5, atol=1e-5)

    # positions: the kept placeholders' and all the text's (timestamps included) original ones
    ids = data["input_ids"]
    full, _ = model.model.get_rope_index(ids, mm_token_type_ids=data["mm_token_type_ids"],
                                         **{k: data.get(k) for k in ("image_grid_thw", "video_grid_thw")})
    columns = (ids[0] != placeholder).nonzero()[:, 0].tolist()
    columns += (ids[0] == placeholder).nonzero()[:, 0][record.indices].tolist()
    assert torch.equal(seen.position_ids[-3:, 0], full[:, 0, sorted(columns)])


def check_one_budget_per_clip(build, timestamps=True):
    """A video's frames compete for one budget, kept in frame-major order; keep means at most."""
    model = apply_desap(build(), keep=6)
    data = inputs([VIDEO, IMAGE], seed=2, timestamps=timestamps)
    out = model(**data)
    image, video = last_prune(model)   # the image, then the video
    assert [len(r.indices) for r in (image, video)] == [6, 6]
    assert torch.equal(video.indices, video.indices.sort().values)
    assert out.logits.shape[1] == data["input_ids"].shape[1] - (24 - 6) - (32 - 6)
    apply_desap(model, keep=30)   # the 24-token image passes whole, the 32-token clip does not
    model(**data)
    assert [len(r.indices) for r in last_prune(model)] == [24, 30]


def check_generate_matches_forward(build, media, timestamps=True):
    model = apply_desap(build(), keep=5)
    data = inputs(MEDIA[media], seed=6, timestamps=timestamps)
    out = model.generate(**data, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, :-3], data["input_ids"])    # the caller's prompt, then the new tokens
    assert out[0, -3] == model(**data).logits[0, -1].argmax()


def check_batch_equals_rows(build, timestamps=True):
    """A left-padded batch of an image row and a video row generates what each row alone does."""
    model = apply_desap(build(), keep=5)
    rows = [inputs([IMAGE], seed=7, timestamps=timestamps, after=(7, 8, 9, 10, 11)),
            inputs([VIDEO], seed=8, timestamps=timestamps, after=(9,))]
    together = model.generate(**batch(rows), max_new_tokens=3, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(**row, max_new_tokens=3, do_sample=False)
        assert together[i, -3:].tolist() == alone[0, -3:].tolist()


def check_remove_restores(build, timestamps=True):
    model = build()
    data = inputs([IMAGE, VIDEO], seed=9, timestamps=timestamps)
    before = model(**data).logits
    apply_desap(model, keep=4)
    assert model.config.vision_config._attn_implementation == "sdpa"
    model(**data)
    remove_desap(model)
    for name in ("forward", "generate", "_prepare_position_ids_for_generation"):
        assert name not in model.__dict__
    assert "get_image_features" not in model.model.__dict__ and "get_video_features" not in model.model.__dict__
    assert torch.equal(model(**data).logits, before)
