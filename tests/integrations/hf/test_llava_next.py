"""apply_desap on a tiny random-weight LLaVA-NeXT (AnyRes crops, image-newline tokens)."""
import pytest
import torch

from desap_ops import reference
from desap_ops.testing.tiny import IMAGE_TOKEN_ID as IMG, tiny_llava_next
from desap_ops.integrations import apply_desap, last_prune
from desap_ops.integrations.common import pruning
from helpers import assert_twins_settled

from ..prompts import llava_prompt, pad
from .fed import fed_rows, language_model_input

NEXT_SIZES = torch.tensor([[56, 112], [112, 112]])
NEXT_TOKENS = [52, 88]      # packed tokens (base 16 + unpadded grid + one newline per grid row)
NEXT_NEWLINES = [4, 8]


@pytest.fixture
def next_pixels():
    return torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def test_next_keep_all_without_merge_leaves_logits_unchanged(next_pixels):
    model = tiny_llava_next()
    ids = torch.tensor([llava_prompt([5], 1, [7, 8], per_image=NEXT_TOKENS[1])])
    args = dict(pixel_values=next_pixels[1:], image_sizes=NEXT_SIZES[1:])
    expected = model(input_ids=ids, **args).logits
    apply_desap(model, keep=NEXT_TOKENS[1], merge=False)
    torch.testing.assert_close(model(input_ids=ids, **args).logits, expected, rtol=1e-6, atol=1e-6)


def test_next_sends_exactly_keep_tokens_with_newlines_in_place(next_pixels):
    keep = 20
    model = apply_desap(tiny_llava_next(), keep=keep)
    rows = [llava_prompt([5], 1, [7, 8], per_image=NEXT_TOKENS[0]), llava_prompt([6], 1, [9], per_image=NEXT_TOKENS[1])]
    ids, mask = pad(rows, left=True)
    with language_model_input(model) as seen:
        model(input_ids=ids, pixel_values=next_pixels, image_sizes=NEXT_SIZES, attention_mask=mask)
    newline = model.model.image_newline
    for i, count in enumerate(NEXT_NEWLINES):
        rows_of_image = fed_rows(seen, IMG, row=i)
        assert rows_of_image.shape[0] == keep
        is_newline = (rows_of_image == newline).all(dim=-1)
        assert int(is_newline.sum()) == count
        assert len(last_prune(model)[i].indices) == keep - count
        assert last_prune(model)[i].task_keep == (keep - count + 1) // 2    # floor(0.5 K + 0.5), K visual
    assert is_newline[-1]  # the last grid row ends with its newline
    batch = model.generate(input_ids=ids, pixel_values=next_pixels, image_sizes=NEXT_SIZES, attention_mask=mask,
                           max_new_tokens=3, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), pixel_values=next_pixels[i:i + 1],
                               image_sizes=NEXT_SIZES[i:i + 1], max_new_tokens=3, do_sample=False)
        assert batch[i, -3:].tolist() == alone[0, -3:].tolist()


def test_a_layout_whose_newlines_exceed_keep_keeps_them_and_one_visual_token(next_pixels):
    model = apply_desap(tiny_llava_next(), keep=2)      # the image has 4 newlines
    ids = torch.tensor([llava_prompt([5], 1, [7], per_image=NEXT_TOKENS[0])])
    with language_model_input(model) as seen:
        model(input_ids=ids, pixel_values=next_pixels[:1], image_sizes=NEXT_SIZES[:1])
    rows = fed_rows(seen, IMG)
    assert rows.shape[0] == NEXT_NEWLINES[0] + 1
    assert int((rows == model.model.image_newline).all(dim=-1).sum()) == NEXT_NEWLINES[0]
    assert [len(r.indices) for r in last_prune(model)] == [1]


def test_an_image_with_no_more_tokens_than_keep_passes_whole(next_pixels):
    model = tiny_llava_next()
    ids = torch.tensor([llava_prompt([5], 1, [7, 8], per_image=NEXT_TOKENS[0])])
    args = dict(pixel_values=next_pixels[:1], image_sizes=NEXT_SIZES[:1])
    expected = model(input_ids=ids, **args).logits
    apply_desap(model, keep=NEXT_TOKENS[0] + 10, merge=False)
    torch.testing.assert_close(model(input_ids=ids, **args).logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["desap", "saliency", "similarity", "divprune", "first"])
@pytest.mark.parametrize("keep", [3, 12])
def test_a_crop_equal_to_its_base_image_settles_its_twin_tokens_by_index(method, keep, monkeypatch):
    """A 56 x 56 image's one crop equal to its base image: its 32 candidate tokens come in 16
    bit-identical pairs (twins). Of each pair a method keeps the lower index first, a dropped copy
    merges into its pair's lower kept copy, and nothing merges into the higher of two kept copies:
    ties between twins are exact (contract, "Exact ties"), so vLLM keeps the same."""
    seen = []

    def spy(chosen, inputs, merge, run=pruning.run_method):
        seen.append(inputs)
        return run(chosen, inputs, merge)

    monkeypatch.setattr(pruning, "run_method", spy)
    pixels = torch.randn(1, 2, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    pixels[:, 1] = pixels[:, 0]
    model = apply_desap(tiny_llava_next(), keep=keep, method=method, merge=True)   # the merge rule too
    ids = torch.tensor([llava_prompt([5], 1, [7, 8], per_image=36)])   # 32 tokens and 4 newlines
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[56, 56]]))
    ((inputs,), (record,)) = seen, last_prune(model)
    assert reference.first_twin(inputs.hidden).tolist() == [list(range(16)) * 2]
    assert_twins_settled(inputs.hidden, record.indices[None], record.assignment[None])
    if method == "divprune" and keep == 3:   # one visual token: the farthest from its nearest, all at 0
        assert record.indices.tolist() == [0]
