"""apply_desap on tiny random-weight LLaVA-NeXT-Video and Video-LLaVA models (frames x tokens)."""
import pytest
import torch
import torch.nn.functional as F

from desap_ops import reference
from desap_ops.testing.tiny import VIDEO_TOKEN_ID as VID, tiny_llava_next_video, tiny_video_llava
from desap_ops.integrations import apply_desap, last_prune, remove_desap
from desap_ops.integrations.hf.clip_tower import encoder_layers

from ..prompts import pad
from .fed import fed_rows, language_model_input

MODELS = {"llava-next-video": (tiny_llava_next_video, 4), "video-llava": (tiny_video_llava, 17)}
FRAMES = 3


def _video(seed, videos=1):
    return torch.randn(videos, FRAMES, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _prompt(per_frame, after=(7, 8, 9)):
    return [1, 5] + [VID] * (FRAMES * per_frame) + list(after)


def _unpatched_run(name, seed):
    """A fresh model, its tokens per frame, a one-video prompt, the clip, and the model's own logits."""
    build, per_frame = MODELS[name]
    model = build()
    ids, video = torch.tensor([_prompt(per_frame)]), _video(seed)
    return model, per_frame, ids, video, model(input_ids=ids, pixel_values_videos=video).logits


@pytest.mark.parametrize("name", MODELS)
def test_keep_all_without_merge_leaves_logits_unchanged(name):
    model, per_frame, ids, video, expected = _unpatched_run(name, seed=0)
    apply_desap(model, keep=FRAMES * per_frame, merge=False)
    assert torch.equal(model(input_ids=ids, pixel_values_videos=video).logits, expected)


@pytest.mark.parametrize("name", MODELS)
def test_one_budget_across_the_clip_equals_the_reference_by_hand(name):
    build, per_frame = MODELS[name]
    keep, text = 5, [7, 8, 9, 10]
    model = build()
    ids, video = torch.tensor([_prompt(per_frame, text)]), _video(1)
    apply_desap(model, keep=keep, task_ratio=0.6)
    with language_model_input(model) as seen:
        out = model(input_ids=ids, pixel_values_videos=video)
    assert out.logits.shape[1] == ids.shape[1] - FRAMES * per_frame + keep

    eager = build(attn_implementation="eager")
    inner = eager.model
    tower = getattr(inner, "video_tower", None) or inner.vision_tower
    with torch.no_grad():
        frames = tower(video.flatten(0, 1), output_hidden_states=True, output_attentions=True)
        layer = encoder_layers(tower)[1]
        branch = layer.self_attn(layer.layer_norm1(frames.hidden_states[1]))[0]
        saliency = frames.attentions[1][:, :, 0, :].mean(dim=1)
        hidden = frames.hidden_states[2]
        if name == "llava-next-video":   # drop [CLS], pool 2 x 2 (saliency summed per window)
            hidden, branch = inner.vision_resampler(hidden[:, 1:]), inner.vision_resampler(branch[:, 1:])
            saliency = F.avg_pool2d(saliency[:, 1:].view(-1, 1, 4, 4), 2, 2).flatten(1) * 4
        flat = lambda t: t.reshape(1, -1, *t.shape[2:])  # noqa: E731
        result = reference.prune(flat(hidden), inner.multi_modal_projector(flat(branch)),
                                 eager.get_input_embeddings()(torch.tensor([text])), flat(saliency), keep,
                                 task_ratio=0.6)
        expected = inner.multi_modal_projector(result.tokens)[0]
    assert [r.indices.tolist() for r in last_prune(model)] == result.indices.tolist()
    assert [r.task_keep for r in last_prune(model)] == result.task_keep.tolist()
    torch.testing.assert_close(fed_rows(seen, VID), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_generate_matches_forward_and_batches_equal_rows(name):
    build, per_frame = MODELS[name]
    model = apply_desap(build(), keep=6)
    rows = [_prompt(per_frame, (7, 8, 9, 10, 11)), _prompt(per_frame, (9,))]
    videos = _video(2, videos=2)
    ids, mask = pad(rows, left=True)
    together = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=videos, max_new_tokens=3,
                              do_sample=False)
    for i, row in enumerate(rows):
        alone_ids = torch.tensor([row])
        alone = model.generate(input_ids=alone_ids, pixel_values_videos=videos[i:i + 1], max_new_tokens=3,
                               do_sample=False)
        assert together[i, -3:].tolist() == alone[0, -3:].tolist()
        logits = model(input_ids=alone_ids, pixel_values_videos=videos[i:i + 1]).logits
        assert alone[0, -3] == logits[0, -1].argmax()


@pytest.mark.parametrize("name", MODELS)
def test_remove_desap_restores_and_a_short_clip_passes_whole(name):
    model, per_frame, ids, video, before = _unpatched_run(name, seed=3)
    apply_desap(model, keep=FRAMES * per_frame + 1, merge=False)   # keep means at most
    assert torch.equal(model(input_ids=ids, pixel_values_videos=video).logits, before)
    remove_desap(model)
    assert "forward" not in model.__dict__ and "get_video_features" not in model.model.__dict__
    assert torch.equal(model(input_ids=ids, pixel_values_videos=video).logits, before)
