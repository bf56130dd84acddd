"""``generate`` under apply_desap returns what the unpatched model's generate returns: the caller's
own prompt ids, then the new tokens. Checked with the model cards' own decode idioms, for every
family, with and without padding, beams and ``num_return_sequences``."""
import functools

import pytest
import torch

from desap_ops.testing.tiny import (QWEN_IMAGE, VIDEO_TOKEN_ID, tiny_llava, tiny_llava_next,
                                  tiny_llava_next_video, tiny_qwen2_5_vl, tiny_qwen3_5, tiny_qwen3_vl, tiny_video_llava)
from desap_ops.integrations import apply_desap

from ..prompts import llava_pixels, llava_prompt, pad

NEXT_SIZES, NEXT_TOKENS = torch.tensor([[56, 112], [112, 112]]), [52, 88]
FRAMES = 3


def _qwen_ids(grid_h, grid_w, after):
    return [1, 5, 153] + [QWEN_IMAGE] * (grid_h * grid_w // 4) + [154] + after


def _qwen_pixels(grids, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(h * w, 3 * 2 * 14 * 14, generator=gen) for h, w in grids])


def _batch(rows, left, **extra):
    ids, mask = pad(rows, left=left)
    return dict(input_ids=ids, attention_mask=mask, **extra)


# family -> (build, keep, rows' token lists, the vision inputs of each row (concatenated in a batch))
def _cases():
    video = torch.randn(2, FRAMES, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    next_pixels = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    qwen_grids = [(8, 12), (8, 8)]
    qwen_rows = [_qwen_ids(8, 12, [7, 8, 9, 10, 11]), _qwen_ids(8, 8, [9])]

    def qwen_vision(rows):
        return dict(pixel_values=torch.cat([_qwen_pixels([qwen_grids[r]], r) for r in rows]),
                    image_grid_thw=torch.tensor([[1, *qwen_grids[r]] for r in rows]))

    return {
        "llava": (tiny_llava, 4, [llava_prompt([5], 1, [7, 8, 9, 10]), llava_prompt([6, 3], 1, [9])],
                  lambda rows: dict(pixel_values=llava_pixels()[rows])),
        "llava-next": (tiny_llava_next, 20, [llava_prompt([5], 1, [7, 8], per_image=NEXT_TOKENS[0]),
                                             llava_prompt([6], 1, [9, 10, 11], per_image=NEXT_TOKENS[1])],
                       lambda rows: dict(pixel_values=next_pixels[rows], image_sizes=NEXT_SIZES[rows])),
        "qwen2.5-vl": (tiny_qwen2_5_vl, 5, qwen_rows, qwen_vision),
        "qwen3-vl": (tiny_qwen3_vl, 5, qwen_rows, qwen_vision),
        "qwen3-vl-moe": (functools.partial(tiny_qwen3_vl, moe=True), 5, qwen_rows, qwen_vision),
        "qwen3.5": (tiny_qwen3_5, 5, qwen_rows, qwen_vision),
        "qwen3.5-moe": (functools.partial(tiny_qwen3_5, moe=True), 5, qwen_rows, qwen_vision),
        "llava-next-video": (tiny_llava_next_video, 5,
                             [[1, 5] + [VIDEO_TOKEN_ID] * (FRAMES * 4) + [7, 8, 9], [1] + [VIDEO_TOKEN_ID] * (FRAMES * 4) + [9]],
                             lambda rows: dict(pixel_values_videos=video[rows])),
        "video-llava": (tiny_video_llava, 5,
                        [[1, 5] + [VIDEO_TOKEN_ID] * (FRAMES * 17) + [7, 8, 9], [1] + [VIDEO_TOKEN_ID] * (FRAMES * 17) + [9]],
                        lambda rows: dict(pixel_values_videos=video[rows])),
    }


CASES = _cases()


def _inputs(name, rows, left=True):
    build, keep, prompts, vision = CASES[name]
    extra = vision(rows)
    batch = _batch([prompts[r] for r in rows], left, **extra)
    if name.startswith("qwen"):
        batch["mm_token_type_ids"] = (batch["input_ids"] == QWEN_IMAGE).int()
    return batch


@pytest.fixture(scope="module")
def models():
    return {name: apply_desap(build(), keep=keep) for name, (build, keep, _, _) in CASES.items()}


@pytest.mark.parametrize("name", CASES)
def test_the_model_card_idiom_gives_the_answer(models, name):
    model = models[name]
    inputs = _inputs(name, [0])
    generated_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # LLaVA's card: generated_ids[:, inputs.input_ids.shape[1]:]
    answer = generated_ids[:, inputs["input_ids"].shape[1]:]
    # Qwen2.5-VL's card: each row trimmed by its own input length
    trimmed = [out[len(ids):] for ids, out in zip(inputs["input_ids"], generated_ids)]
    assert torch.equal(generated_ids[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert answer.shape == (1, 3) and torch.equal(trimmed[0], answer[0])
    # the first new token is the patched forward's greedy choice
    assert answer[0, 0] == model(**inputs).logits[0, -1].argmax()


@pytest.mark.parametrize("name", CASES)
def test_a_padded_batch_returns_its_own_prompt_then_each_rows_answer(models, name):
    model = models[name]
    batch = _inputs(name, [0, 1], left=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :width], batch["input_ids"])
    for r in range(2):
        alone = _inputs(name, [r])
        answer = model.generate(**alone, max_new_tokens=3, do_sample=False)[:, alone["input_ids"].shape[1]:]
        assert out[r, width:].tolist() == answer[0].tolist()


@pytest.mark.parametrize("name", ["llava", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "video-llava"])
def test_beams_and_several_sequences_repeat_each_prompt(models, name):
    model = models[name]
    batch = _inputs(name, [0, 1], left=True)
    width = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=3, num_return_sequences=2,
                         return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape[0] == 4
    assert torch.equal(out.sequences[:, :width], batch["input_ids"].repeat_interleave(2, dim=0))
    for r in range(2):
        alone = _inputs(name, [r])
        single = model.generate(**alone, max_new_tokens=3, do_sample=False, num_beams=3, num_return_sequences=2)
        assert out.sequences[2 * r:2 * r + 2, width:].tolist() == single[:, alone["input_ids"].shape[1]:].tolist()


def test_sampled_sequences_keep_the_prompt(models):
    inputs = _inputs("llava", [0])
    torch.manual_seed(0)
    out = models["llava"].generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=3)
    assert out.shape == (3, inputs["input_ids"].shape[1] + 2)
    assert torch.equal(out[:, :-2], inputs["input_ids"].expand(3, -1))
