"""apply_desap(ideal=True): each image's (or video's) first ``keep`` tokens, unscored and unmerged,
where DeSAP puts its kept tokens: the semantics of vLLM's ``"ideal": true``
(``vllm/model.py``: the first tokens in the model's order, LLaVA-NeXT's newlines kept, the Qwen
models' tokens at their original positions, DeepStack levels cut alike), with no pruning work: no
attention capture and no prompt text read (the autouse fixture refuses both). Expected values come from
the unpatched model's own features; tests/on_vllm/test_vllm_request_options.py runs vLLM's ideal
engine against this."""
import logging

import pytest
import torch

from desap_ops.testing.tiny import (IMAGE_TOKEN_ID as IMG, VIDEO_TOKEN_ID as VID, tiny_llava, tiny_llava_next,
                                  tiny_llava_next_video, tiny_qwen2_5_vl, tiny_qwen3_vl)
from desap_ops.integrations import apply_desap, last_prune

from ..prompts import llava_pixels, llava_prompt
from .fed import fed_rows, language_model_input
from .qwen_inputs import IMG as QWEN_IMG, inputs, tokens

N = 16   # tokens of an image of the tiny LLaVA


class PruningWork(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_pruning_work(monkeypatch):
    """The ideal costs no pruning work: in every test here, reading a tower's DeSAP signals (the
    tower capture every reader uses, ``common.signals.capture``) or the prompt's text for an image raises."""
    from desap_ops.integrations.common import signals
    from desap_ops.integrations.hf import text

    def refuse(*args, **kwargs):
        raise PruningWork("the ideal read DeSAP's signals or the prompt's text")

    for module, name in ((signals, "capture"), (text, "image_text_tokens")):
        monkeypatch.setattr(module, name, refuse)


def _check_first_tokens(records, tokens_per_item: list, keeps: list) -> None:
    """Each item's record: its first ``keep`` tokens, nothing merged, no task score, no saliency."""
    for record, n, keep in zip(records, tokens_per_item, keeps, strict=True):
        assert record.indices.tolist() == list(range(keep))
        assert record.assignment.tolist() == list(range(keep)) + [-1] * (n - keep)
        assert record.task_keep is None and record.task_scores is None   # no task score
        assert record.saliency is None and record.text_tokens == 0 and record.method == "first"


def test_llava_feeds_each_images_first_tokens_and_reads_no_text(caplog):
    keep, pixels = 5, llava_pixels()
    model, full = apply_desap(tiny_llava(), keep=keep, ideal=True), tiny_llava()
    ids = torch.tensor([llava_prompt([5], 2, [])])   # no text after the images: still no text-blind warning
    with language_model_input(model) as seen, torch.no_grad(), caplog.at_level(logging.WARNING):
        model(input_ids=ids, pixel_values=pixels)
        features = full.model.get_image_features(pixel_values=pixels).pooler_output
    expected = torch.cat([image[:keep] for image in features])
    torch.testing.assert_close(fed_rows(seen, IMG), expected, rtol=1e-5, atol=1e-6)
    _check_first_tokens(last_prune(model), [N, N], [keep, keep])
    assert not caplog.records


def test_llava_next_keeps_every_newline_and_the_first_visual_tokens_in_packed_order():
    keep, sizes = 30, torch.tensor([[56, 112], [112, 112]])   # 48 + 4 newlines, 80 + 8 newlines
    pixels = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    model, full = apply_desap(tiny_llava_next(), keep=keep, ideal=True), tiny_llava_next()
    with torch.no_grad():
        got = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        packed = full.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    newline = full.model.image_newline
    for image, whole in zip(got, packed):
        is_newline = (whole == newline).all(dim=1)
        visual = (~is_newline).nonzero()[:, 0]
        kept = is_newline.clone()
        kept[visual[:keep - int(is_newline.sum())]] = True   # the newlines count toward keep
        assert image.shape[0] == keep
        torch.testing.assert_close(image, whole[kept], rtol=1e-5, atol=1e-6)
    _check_first_tokens(last_prune(model), [48, 80], [keep - 4, keep - 8])   # the visual tokens, newlines apart


def test_a_video_keeps_its_first_tokens_frame_major():
    keep, frames, per_frame = 6, 3, 4   # the tiny LLaVA-NeXT-Video pools each frame to 2 x 2
    video = torch.randn(1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    model, full = apply_desap(tiny_llava_next_video(), keep=keep, ideal=True), tiny_llava_next_video()
    ids = torch.tensor([[1, 5] + [VID] * (frames * per_frame) + [7, 8]])
    with language_model_input(model) as seen, torch.no_grad():
        model(input_ids=ids, pixel_values_videos=video)
        # positional: transformers 5.16 names the argument pixel_values, 5.25 pixel_values_videos
        clip = full.model.get_video_features(video).pooler_output
    # 5.16: a tuple of (frames, T, C) per video; 5.25: (videos, frames * T, C)
    first = clip[0].reshape(-1, clip[0].shape[-1])
    torch.testing.assert_close(fed_rows(seen, VID), first[:keep], rtol=1e-5, atol=1e-6)
    _check_first_tokens(last_prune(model), [frames * per_frame], [keep])


@pytest.mark.parametrize("build, levels", [(tiny_qwen2_5_vl, 0), (tiny_qwen3_vl, 2)])
def test_qwen_feeds_the_first_tokens_at_their_original_positions_and_deepstack_levels_alike(build, levels):
    keep, medium = 7, ("image", 8, 12)   # 24 tokens
    data = inputs([medium], seed=5, timestamps=levels > 0, after=(7, 8, 9))
    model, full = apply_desap(build(), keep=keep, ideal=True), build()
    with language_model_input(model) as seen, torch.no_grad():
        model(**data)
        features = full.model.get_image_features(data["pixel_values"], data["image_grid_thw"])
    fed = seen.input_ids[0] == QWEN_IMG
    torch.testing.assert_close(seen.inputs_embeds[0][fed], features.pooler_output[0][:keep], rtol=1e-5, atol=1e-6)
    deepstack = list(getattr(features, "deepstack_features", None) or [])
    assert len(deepstack) == levels == len(seen.deepstack_visual_embeds or [])
    for level, fed_level in zip(deepstack, seen.deepstack_visual_embeds or []):
        whole = level[0] if isinstance(level, (list, tuple)) else level   # per image (>= 5.18) or one tensor
        torch.testing.assert_close(fed_level, whole[:keep], rtol=1e-5, atol=1e-6)
    ids = data["input_ids"]
    positions, _ = full.model.get_rope_index(ids, mm_token_type_ids=data["mm_token_type_ids"],
                                             image_grid_thw=data["image_grid_thw"])
    placeholders = (ids[0] == QWEN_IMG).nonzero()[:, 0]
    columns = sorted((ids[0] != QWEN_IMG).nonzero()[:, 0].tolist() + placeholders[:keep].tolist())
    assert torch.equal(seen.position_ids[-3:, 0], positions[:, 0, columns])
    _check_first_tokens(last_prune(model), [tokens(medium)], [keep])


@pytest.mark.parametrize("ideal", [False, True])
def test_llava_runs_its_tower_with_no_capture_and_embeds_no_text_only_under_the_ideal(ideal):
    """Under the fixture DeSAP itself fails (the refusal bites); the ideal runs, recording no
    saliency (None) and no text read."""
    model = apply_desap(tiny_llava(), keep=5, ideal=ideal)
    ids = torch.tensor([llava_prompt([5], 1, [7, 8])])
    with torch.no_grad():
        if not ideal:
            with pytest.raises(PruningWork):
                model(input_ids=ids, pixel_values=llava_pixels()[:1])
            return
        model(input_ids=ids, pixel_values=llava_pixels()[:1])
    (record,) = last_prune(model)
    assert record.saliency is None and record.text_tokens == 0


@pytest.mark.parametrize("build", [tiny_qwen2_5_vl, tiny_qwen3_vl])
@pytest.mark.parametrize("ideal", [False, True])
def test_qwen_runs_its_tower_with_no_capture_and_embeds_no_text_only_under_the_ideal(build, ideal):
    medium = ("image", 8, 12)
    data = inputs([medium], seed=6, timestamps=build is tiny_qwen3_vl, after=(7, 8, 9))
    model = apply_desap(build(), keep=7, ideal=ideal)
    with torch.no_grad():
        if not ideal:
            with pytest.raises(PruningWork):
                model(**data)
            return
        model(**data)
    (record,) = last_prune(model)
    assert record.saliency is None and record.text_tokens == 0 and len(record.assignment) == tokens(medium)
