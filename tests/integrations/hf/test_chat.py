"""apply_desap with a chat's markers (``apply_desap(chat=...)``): each image is pruned for the user's
words of its own turn alone."""
import pytest
import torch

from desap_ops.testing.tiny import QWEN_IMAGE
from desap_ops.integrations import ChatMarkers, apply_desap, last_prune

from ..prompts import CHAT, STYLES, USER_WORDS, N, chat_ids, llava_pixels, pad, token_ids

QWEN_GRID, QWEN_TOKENS = [1, 8, 8], 16


@pytest.mark.parametrize("chat", ["USER:", ChatMarkers, [(1, 2)]])
def test_a_chat_that_is_no_markers_or_tokenizer_is_refused(chat):
    model = STYLES["llava"][2]()
    with pytest.raises(TypeError, match="chat must be None, a ChatMarkers, a tokenizer or a processor"):
        apply_desap(model, keep=4, chat=chat)
    assert not hasattr(model, "_desap")


def _inputs(style, ids, first=0):
    """Model inputs for the style's tiny model: images ``first``, ``first + 1``, ... for the rows of
    ``ids``, which already hold their placeholders."""
    images = slice(first, first + ids.shape[0])
    if style == "llava":
        return dict(input_ids=ids, pixel_values=llava_pixels()[images])
    _, h, w = QWEN_GRID
    pixels = torch.randn(2, h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, pixel_values=pixels[images].flatten(0, 1),
                image_grid_thw=torch.tensor([QWEN_GRID] * ids.shape[0]), mm_token_type_ids=(ids == QWEN_IMAGE).int())


def _prompt(style, messages):
    tokenizer, image, _ = STYLES[style]
    return chat_ids(tokenizer, messages, image, N if style == "llava" else QWEN_TOKENS)


@pytest.mark.parametrize("style", STYLES)
def test_apply_desap_with_a_chat_prunes_for_the_user_words_alone(style):
    tokenizer, image, build = STYLES[style]
    model = apply_desap(build(), keep=5, chat=tokenizer)
    model(**_inputs(style, torch.tensor([_prompt(style, CHAT)])))
    (with_chat,) = last_prune(model)
    # the same image followed by nothing but the user's words, without chat markers
    placeholders = N if style == "llava" else QWEN_TOKENS
    bare = torch.tensor([[image] * placeholders + list(token_ids(tokenizer, " ".join(USER_WORDS)))])
    apply_desap(model, keep=5)
    model(**_inputs(style, bare))
    (alone,) = last_prune(model)
    assert torch.equal(with_chat.task_scores, alone.task_scores)
    assert torch.equal(with_chat.indices, alone.indices)


@pytest.mark.parametrize("style", STYLES)
def test_generate_with_a_chat_matches_forward_and_batches_equal_rows(style):
    tokenizer, _, build = STYLES[style]
    model = apply_desap(build(), keep=5, chat=tokenizer, text_budget=3, task_ratio="auto")
    rows = [_prompt(style, CHAT), _prompt(style, CHAT[:1])]
    batch, mask = pad(rows, left=True)
    together = model.generate(**_inputs(style, batch), attention_mask=mask, max_new_tokens=3, do_sample=False)
    for i, row in enumerate(rows):
        inputs = _inputs(style, torch.tensor([row]), first=i)
        alone = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert together[i, -3:].tolist() == alone[0, -3:].tolist()
        assert alone[0, -3] == model(**inputs).logits[0, -1].argmax()


@pytest.mark.parametrize("style", STYLES)
def test_the_question_counts_before_or_after_the_image_and_a_text_blind_prune_is_told(style):
    """With the template's markers the image reads its turn's words wherever they stand (the
    ChatML template keeps the parts' order; LLaVA's puts images first); an image without words is
    recorded as text-blind (text_tokens 0) and the model notes it has warned (the warning itself:
    tests/integrations/common/test_record.py)."""
    tokenizer, _, build = STYLES[style]
    model = apply_desap(build(), keep=5, chat=tokenizer)
    image, question = {"type": "image"}, {"type": "text", "text": " ".join(USER_WORDS)}
    records = {}
    for name, parts in (("image first", [image, question]), ("question first", [question, image]),
                        ("no question", [image]), ("no question again", [image])):
        model(**_inputs(style, torch.tensor([_prompt(style, [{"role": "user", "content": parts}])])))
        (records[name],) = last_prune(model)
    first, second = records["image first"], records["question first"]
    assert torch.equal(first.indices, second.indices) and torch.equal(first.task_scores, second.task_scores)
    assert first.text_tokens == second.text_tokens == len(USER_WORDS)
    assert records["no question"].text_tokens == 0 == records["no question again"].text_tokens
    assert model._desap.records.told_text_blind


def test_without_markers_a_question_before_the_image_counts_where_nothing_follows_it():
    tokenizer, image, build = STYLES["llava"]
    model = apply_desap(build(), keep=5)
    question = list(token_ids(tokenizer, " ".join(USER_WORDS)))
    records = []
    for ids in ([image] * N + question, question + [image] * N):
        model(**_inputs("llava", torch.tensor([ids])))
        records += last_prune(model)
        assert records[-1].text_tokens == len(USER_WORDS)
    assert torch.equal(records[0].task_scores, records[1].task_scores)
    assert torch.equal(records[0].indices, records[1].indices)
