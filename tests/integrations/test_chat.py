"""Which tokens of a templated chat count as an image's text: the user's words, no markers, no answers."""
import pytest
import torch
from integration_prompts import (CHAT, CHATML_SPECIALS, CHATML_TEMPLATE, LLAVA_SPECIALS, LLAVA_TEMPLATE, N,
                                 USER_WORDS, chat_ids, llava_pixels, pad, word_tokenizer)

from desap_ops.testing.tiny import IMAGE_TOKEN_ID as IMG, QWEN_IMAGE, tiny_llava, tiny_qwen2_5_vl
from desap_ops.integrations import ChatMarkers, apply_desap, last_prune
from desap_ops.integrations.chat import as_chat_markers, user_text, user_turns
from desap_ops.integrations.prompt import TEXT_BLIND, ignored_token_ids
from desap_ops.integrations.sequence import image_text_tokens

STYLES = {  # style -> (tokenizer, image token, tiny model)
    "llava": (word_tokenizer(LLAVA_SPECIALS, LLAVA_TEMPLATE), IMG, tiny_llava),
    "chatml": (word_tokenizer(CHATML_SPECIALS, CHATML_TEMPLATE), QWEN_IMAGE, tiny_qwen2_5_vl),
}
QWEN_GRID, QWEN_TOKENS = [1, 8, 8], 16


def _ids(tokenizer, text):
    return tuple(tokenizer.convert_tokens_to_ids(text.split()))


def test_from_tokenizer_reads_the_llava_markers_as_plain_words():
    tokenizer = STYLES["llava"][0]
    markers = ChatMarkers.from_tokenizer(tokenizer)
    assert markers == ChatMarkers(user=(_ids(tokenizer, "USER :"),), assistant=(_ids(tokenizer, "ASSISTANT :"),))


def test_from_tokenizer_reads_the_chatml_markers_from_a_processor():
    tokenizer = STYLES["chatml"][0]

    class Processor:   # a processor holds its tokenizer as .tokenizer
        pass

    processor = Processor()
    processor.tokenizer = tokenizer
    markers = ChatMarkers.from_tokenizer(processor)
    assert markers.user == (_ids(tokenizer, "<|im_start|> user"),)
    assert markers.assistant == (_ids(tokenizer, "<|im_start|> assistant"),)
    assert markers.other == (_ids(tokenizer, "<|im_end|>"), _ids(tokenizer, "<|im_start|> system"))
    assert as_chat_markers(processor) == markers and as_chat_markers(markers) is markers


def test_the_sentencepiece_spellings_of_a_marker_are_all_kept():
    class Pieces:   # SentencePiece spells "USER:" after a space with a leading piece of its own
        def get_vocab(self):
            return {}

        def encode(self, text, add_special_tokens=True):
            assert not add_special_tokens
            words = {"USER:": [10, 11], " USER:": [9, 10, 11], "ASSISTANT:": [12, 11], " ASSISTANT:": [12, 11]}
            return words[text]

    assert ChatMarkers.from_tokenizer(Pieces()) == ChatMarkers(user=((10, 11), (9, 10, 11)), assistant=((12, 11),))


@pytest.mark.parametrize("style", STYLES)
def test_a_templated_multi_turn_chat_gives_the_image_exactly_the_user_words(style):
    tokenizer, image, build = STYLES[style]
    ids = torch.tensor([chat_ids(tokenizer, CHAT, image, per_image=3)])
    chat = ChatMarkers.from_tokenizer(tokenizer)
    text, mask = image_text_tokens(ids, None, image, [3], ignored_token_ids(build()), user_turns(ids, chat))
    assert text[0][mask[0]].tolist() == list(_ids(tokenizer, " ".join(USER_WORDS)))
    # without the markers, every token after the image counts: answers and role words included
    text, mask = image_text_tokens(ids, None, image, [3], ignored_token_ids(build()))
    assert len(text[0][mask[0]]) > len(USER_WORDS)


def test_each_image_reads_only_its_own_turn():
    chat = ChatMarkers(user=((20, 21),), assistant=((22, 21),))
    # USER: <img> 7 ASSISTANT: 8 USER: 9 <img> 10 ASSISTANT: 11: the second image's turn asks 9
    # before it and 10 after it, and both count
    ids = torch.tensor([[20, 21, 50, 50, 7, 22, 21, 8, 20, 21, 9, 50, 50, 10, 22, 21, 11]])
    assert user_turns(ids, chat).tolist() == [[-1, -1, 1, 1, 1, -1, -1, -1, -1, -1, 2, 2, 2, 2, -1, -1, -1]]
    text, mask = image_text_tokens(ids, None, 50, [2, 2], set(), user_turns(ids, chat))
    assert [row[m].tolist() for row, m in zip(text, mask)] == [[7], [9, 10]]
    # an image outside every user turn (inside an answer) has no text
    text, mask = image_text_tokens(ids[:, 5:9].clone().index_fill_(1, torch.tensor([2]), 50), None, 50, [1], set(),
                                   user_turns(ids[:, 5:9], chat))
    assert not mask.any()


def test_an_answer_runs_to_the_next_user_turn_or_the_end_of_the_row():
    chat = ChatMarkers(user=((20, 21),), assistant=((22, 21),), other=((30,),))
    ids = torch.tensor([[5, 21, 22, 21, 6, 20, 7, 30, 20, 21, 8, 22, 21, 9, 9],     # an answer cut off at the end
                        [0, 0, 0, 0, 0, 0, 5, 20, 21, 7, 21, 22, 22, 21, 6]])    # left padding
    assert user_text(ids, chat).tolist() == [
        [True, True, False, False, False, False, False, False, False, False, True, False, False, False, False],
        [True] * 7 + [False, False, True, True, True, False, False, False]]
    assert user_text(ids[:, :1], chat).tolist() == [[True], [True]]    # a row shorter than every marker


@pytest.mark.parametrize("chat", ["USER:", ChatMarkers, [(1, 2)]])
def test_a_chat_that_is_no_markers_or_tokenizer_is_refused(chat):
    model = tiny_llava()
    with pytest.raises(TypeError, match="chat must be None, a ChatMarkers, a tokenizer or a processor"):
        apply_desap(model, keep=4, chat=chat)
    assert not hasattr(model, "_desap")
    with pytest.raises(TypeError, match="needs a tokenizer or a processor"):
        ChatMarkers.from_tokenizer(chat)


@pytest.mark.parametrize("fields, error, match", [
    (dict(user="USER:", assistant=()), TypeError, "ChatMarkers.user"),
    (dict(user=((1, 2),), assistant=((),)), ValueError, "ChatMarkers.assistant"),
    (dict(user=(), assistant=(), other=((1.0,),)), ValueError, "ChatMarkers.other"),
    (dict(user=(), assistant=(), other=(3,)), TypeError, "ChatMarkers.other"),
])
def test_chat_markers_are_checked(fields, error, match):
    with pytest.raises(error, match=match):
        ChatMarkers(**fields)
    assert ChatMarkers(user=[[1, 2]], assistant=[]).user == ((1, 2),)


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
    with_chat = last_prune(model)
    # the same image followed by nothing but the user's words, without chat markers
    placeholders = N if style == "llava" else QWEN_TOKENS
    bare = torch.tensor([[image] * placeholders + list(_ids(tokenizer, " ".join(USER_WORDS)))])
    apply_desap(model, keep=5)
    model(**_inputs(style, bare))
    alone = last_prune(model)
    assert torch.equal(with_chat.task_scores[0], alone.task_scores[0])
    assert torch.equal(with_chat.indices[0], alone.indices[0])


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
def test_the_question_counts_before_or_after_the_image_and_a_text_blind_prune_is_told(style, caplog):
    """With the template's markers the image reads its turn's words wherever they stand (the
    ChatML template keeps the parts' order; LLaVA's puts images first); an image without words is
    recorded as text-blind (text_tokens 0) and warned about once per model."""
    tokenizer, _, build = STYLES[style]
    model = apply_desap(build(), keep=5, chat=tokenizer)
    image, question = {"type": "image"}, {"type": "text", "text": " ".join(USER_WORDS)}
    records = {}
    for name, parts in (("image first", [image, question]), ("question first", [question, image]),
                        ("no question", [image]), ("no question again", [image])):
        model(**_inputs(style, torch.tensor([_prompt(style, [{"role": "user", "content": parts}])])))
        records[name] = last_prune(model)
    first, second = records["image first"], records["question first"]
    assert torch.equal(first.indices[0], second.indices[0]) and torch.equal(first.task_scores[0], second.task_scores[0])
    assert int(first.text_tokens[0]) == int(second.text_tokens[0]) == len(USER_WORDS)
    assert int(records["no question"].text_tokens[0]) == 0 == int(records["no question again"].text_tokens[0])
    assert [r.message for r in caplog.records].count(TEXT_BLIND) == 1


def test_without_markers_a_question_before_the_image_counts_where_nothing_follows_it():
    tokenizer, image, build = STYLES["llava"]
    model = apply_desap(build(), keep=5)
    question = list(_ids(tokenizer, " ".join(USER_WORDS)))
    records = []
    for ids in ([image] * N + question, question + [image] * N):
        model(**_inputs("llava", torch.tensor([ids])))
        records.append(last_prune(model))
        assert int(records[-1].text_tokens[0]) == len(USER_WORDS)
    assert torch.equal(records[0].task_scores[0], records[1].task_scores[0])
    assert torch.equal(records[0].indices[0], records[1].indices[0])


@pytest.mark.parametrize("template, system", [("QWEN2_5_TEMPLATE", True), ("QWEN3_TEMPLATE", False),
                                              ("LLAVA_TEMPLATE", False)])
def test_markers_are_read_from_the_checkpoints_chat_templates(template, system):
    """The markers the tiny checkpoints' templates (Qwen's ChatML, Qwen2.5-VL's with its default
    system prompt; LLaVA's words) give, and the turns they cut a rendered conversation into: the
    image reads its own turn's words, before and after it, and nothing of the system prompt."""
    from desap_ops.testing import checkpoint
    from desap_ops.integrations.chat import template_markers

    chatml = template != "LLAVA_TEMPLATE"
    specials = {checkpoint.IMAGE_PAD: 151, checkpoint.VISION_START: 153, checkpoint.VISION_END: 154,
                checkpoint.IM_START: 159, checkpoint.IM_END: 158} if chatml else 100
    words = dict(zip(checkpoint.CHATML_WORDS, (157, 156, 155))) if chatml else None
    tokenizer = checkpoint.build_tokenizer(160, specials, chat_template=getattr(checkpoint, template), words=words)
    texts = template_markers(tokenizer, tokenizer.chat_template)
    if chatml:
        assert texts == {"user": ("<|im_start|>user\n",), "assistant": ("<|im_start|>assistant\n",),
                         "other": ("<|im_end|>\n", "<|im_start|>system\n")}
    else:
        assert texts["user"] == ("USER: ",) and texts["assistant"] == ("ASSISTANT:",)
    image = 151 if chatml else 100
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image"},
                                             {"type": "text", "text": "the color ?"}]},
                {"role": "assistant", "content": "a cat"}, {"role": "user", "content": "where is the dog ?"}]
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True),
                                         add_special_tokens=False)])
    assert bool((ids == tokenizer.convert_tokens_to_ids("are")).any()) == system   # Qwen2.5-VL's system prompt
    text, mask = image_text_tokens(ids, None, image, [1], {image, 153, 154}, user_turns(ids, ChatMarkers.from_tokenizer(tokenizer)))
    assert tokenizer.convert_ids_to_tokens(text[0][mask[0]].tolist()) == "what is the color ?".split()
