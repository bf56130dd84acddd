"""apply_desap on tiny random-weight Qwen3.5 and Qwen3.5-MoE models: Qwen3-VL's tower without
DeepStack, a language model of linear-attention (gated delta rule) and full-attention layers, run
on CPU in float32."""
import functools

import pytest

from desap_ops.testing.tiny import tiny_qwen3_5

from .qwen_checks import (check_batch_equals_rows, check_generate_matches_forward,
                          check_keep_all_leaves_logits_unchanged, check_one_budget_per_clip,
                          check_reference_operator_and_positions, check_remove_restores)

BUILDS = {"dense": tiny_qwen3_5, "moe": functools.partial(tiny_qwen3_5, moe=True)}


@pytest.mark.parametrize("variant", BUILDS)
@pytest.mark.parametrize("media", ["image", "video", "image+video"])
def test_keep_all_without_merge_leaves_logits_unchanged(variant, media):
    check_keep_all_leaves_logits_unchanged(BUILDS[variant], media)


@pytest.mark.parametrize("variant", BUILDS)
@pytest.mark.parametrize("media", ["image", "video"])
def test_language_model_gets_the_reference_operator_and_original_positions(variant, media, monkeypatch):
    check_reference_operator_and_positions(BUILDS[variant], monkeypatch, media, levels_expected=0)


def test_one_budget_per_clip_frame_major_and_keep_means_at_most():
    check_one_budget_per_clip(tiny_qwen3_5)


@pytest.mark.parametrize("media", ["video", "image+video"])
def test_generate_matches_forward(media):
    check_generate_matches_forward(tiny_qwen3_5, media)


def test_left_padded_batch_of_an_image_row_and_a_video_row_equals_its_rows():
    check_batch_equals_rows(tiny_qwen3_5)


def test_remove_desap_restores():
    check_remove_restores(tiny_qwen3_5)
