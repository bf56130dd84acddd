"""The M-RoPE positions the vLLM plugin gives Qwen2.5-VL prompts (``integrations/vllm/mrope.py``),
against transformers' own ``get_rope_index``. Pure torch: runs without vLLM."""
import pytest
import torch

from desap_ops.cli.models import QWEN_IMAGE as IMG, tiny_qwen2_5_vl
from desap_ops.integrations.vllm.mrope import Media, media_positions, prompt_positions

START, END = 153, 154
# one wide and one tall image (grids in patches; 2 x 2 patches make a token): 2 x 6 and 6 x 2 tokens
GRIDS = [[1, 4, 12], [1, 12, 4]]


def _prompt(lengths):
    ids = [1, 5]
    offsets = []
    for length, between in zip(lengths, ([7, 8], [9, 10, 11])):
        ids.append(START)
        offsets.append(len(ids))
        ids += [IMG] * length + [END] + between
    return ids, offsets


def _transformers_positions(ids):
    model = tiny_qwen2_5_vl()
    input_ids = torch.tensor([ids])
    positions, deltas = model.model.get_rope_index(input_ids, mm_token_type_ids=(input_ids == IMG).int(),
                                                   image_grid_thw=torch.tensor(GRIDS))
    return positions[:, 0], int(deltas[0])


def _media(offsets, lengths):
    return [Media(offset, length, media_positions(t, h // 2, w // 2))
            for offset, length, (t, h, w) in zip(offsets, lengths, GRIDS)]


def test_unpruned_prompt_positions_are_transformers_positions():
    ids, offsets = _prompt([12, 12])
    expected, delta = _transformers_positions(ids)
    got, got_delta = prompt_positions(len(ids), _media(offsets, [12, 12]))
    assert torch.equal(got, expected) and got_delta == delta


@pytest.mark.parametrize("kept", [([0, 5, 11], [1, 2, 10]), ([6, 7, 8], [0, 3, 4])])
def test_pruned_prompt_text_positions_are_final_and_kept_tokens_take_their_original_ones(kept):
    full_ids, full_offsets = _prompt([12, 12])
    full, _ = _transformers_positions(full_ids)
    ids, offsets = _prompt([3, 3])
    got, _ = prompt_positions(len(ids), _media(offsets, [3, 3]))

    # what apply_desap feeds the language model: the original positions of the tokens it keeps
    columns = [i for i, t in enumerate(full_ids) if t != IMG]
    for offset, indices in zip(full_offsets, kept):
        columns += [offset + i for i in indices]
    wanted = full[:, sorted(columns)]
    is_text = torch.tensor(ids) != IMG
    assert torch.equal(got[:, is_text], wanted[:, is_text])   # text is final before the encoder runs

    # the encoder's position channels, placed the way vLLM's recompute step places them
    for offset, indices, medium in zip(offsets, kept, _media(offsets, [3, 3])):
        base = int(got[0, offset - 1]) + 1          # after <|vision_start|>
        got[:, offset:offset + 3] = medium.positions[:3, indices] + base
    assert torch.equal(got, wanted)


def test_media_positions_scale_time_and_give_the_extent():
    positions = media_positions(3, 2, 5, t_factor=0.5)
    assert positions.shape == (4, 30)
    assert positions[0].unique().tolist() == [0, 1]          # int(0.5 * t) for t = 0, 1, 2
    assert positions[3].unique().tolist() == [5]            # the widest axis
    assert media_positions(1, 6, 2)[3, 0] == 6               # a tall image: its height, not its width
