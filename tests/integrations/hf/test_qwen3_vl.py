"""apply_desap on tiny random-weight Qwen3-VL and Qwen3-VL-MoE models (DeepStack included)."""
import functools

import pytest

from desap_ops.testing.tiny import tiny_qwen3_vl

from .qwen_checks import (check_batch_equals_rows, check_generate_matches_forward,
                          check_keep_all_leaves_logits_unchanged, check_one_budget_per_clip,
                          check_reference_operator_and_positions, check_remove_restores)

BUILDS = {"dense": tiny_qwen3_vl, "moe": functools.partial(tiny_qwen3_vl, moe=True)}


@pytest.mark.parametrize("variant", BUILDS)
@pytest.mark.parametrize("media", ["image", "video", "image+video"])
def test_keep_all_without_merge_leaves_logits_unchanged(variant, media):
    check_keep_all_leaves_logits_unchanged(BUILDS[variant], media)


@pytest.mark.parametrize("variant", BUILDS)
@pytest.mark.parametrize("media", ["image", "video"])
def test_language_model_gets_the_reference_operator_deepstack_group_means_and_original_positions(
        variant, media, monkeypatch):
    check_reference_operator_and_positions(BUILDS[variant], monkeypatch, media, levels_expected=2)


def test_one_budget_per_clip_frame_major_and_keep_means_at_most():
    check_one_budget_per_clip(tiny_qwen3_vl)


@pytest.mark.parametrize("media", ["video", "image+video"])
def test_generate_matches_forward(media):
    check_generate_matches_forward(tiny_qwen3_vl, media)


def test_left_padded_batch_of_an_image_row_and_a_video_row_equals_its_rows():
    check_batch_equals_rows(tiny_qwen3_vl)


def test_remove_desap_restores():
    check_remove_restores(tiny_qwen3_vl)
