"""Chat-template markers (``integrations/common/chat.py``): which tokens of a templated chat count as
an image's text, the user's words of its own turn, no markers, no answers."""
import pytest
import torch

from desap_ops.integrations.common.chat import ChatMarkers, as_chat_markers, template_markers, user_text, user_turns
from desap_ops.integrations.common.prompt import config_ignored_ids
from desap_ops.integrations.common.sequence import image_text_tokens

from ..prompts import CHAT, STYLES, USER_WORDS, chat_ids, token_ids


def test_from_tokenizer_reads_the_llava_markers_as_plain_words():
    tokenizer = STYLES["llava"][0]
    markers = ChatMarkers.from_tokenizer(tokenizer)
    assert markers == ChatMarkers(user=(token_ids(tokenizer, "USER :"),),
                                  assistant=(token_ids(tokenizer, "ASSISTANT :"),))


def test_from_tokenizer_reads_the_chatml_markers_from_a_processor():
    tokenizer = STYLES["chatml"][0]

    class Processor:   # a processor holds its tokenizer as .tokenizer
        pass

    processor = Processor()
    processor.tokenizer = tokenizer
    markers = ChatMarkers.from_tokenizer(processor)
    assert markers.user == (token_ids(tokenizer, "<|im_start|> user"),)
    assert markers.assistant == (token_ids(tokenizer, "<|im_start|> assistant"),)
    assert markers.other == (token_ids(tokenizer, "<|im_end|>"), token_ids(tokenizer, "<|im_start|> system"))
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
    chat, model = ChatMarkers.from_tokenizer(tokenizer), build()
    ignored = config_ignored_ids(model.config, model.generation_config)
    text, mask = image_text_tokens(ids, None, image, [3], ignored, user_turns(ids, chat))
    assert text[0][mask[0]].tolist() == list(token_ids(tokenizer, " ".join(USER_WORDS)))
    # without the markers, every token after the image counts: answers and role words included
    text, mask = image_text_tokens(ids, None, image, [3], ignored)
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


@pytest.mark.parametrize("template, system", [("QWEN2_5_TEMPLATE", True), ("QWEN3_TEMPLATE", False),
                                              ("LLAVA_TEMPLATE", False)])
def test_markers_are_read_from_the_checkpoints_chat_templates(template, system):
    """The markers the tiny checkpoints' templates (Qwen's ChatML, Qwen2.5-VL's with its default
    system prompt; LLaVA's words) give, and the turns they cut a rendered conversation into: the
    image reads its own turn's words, before and after it, and nothing of the system prompt."""
    from desap_ops.testing import checkpoint

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
    turns = user_turns(ids, ChatMarkers.from_tokenizer(tokenizer))
    text, mask = image_text_tokens(ids, None, image, [1], {image, 153, 154}, turns)
    assert tokenizer.convert_ids_to_tokens(text[0][mask[0]].tolist()) == "what is the color ?".split()


@pytest.mark.parametrize("chat", ["USER:", ChatMarkers, [(1, 2)]])
def test_from_tokenizer_refuses_what_is_no_tokenizer(chat):
    with pytest.raises(TypeError, match="needs a tokenizer or a processor"):
        ChatMarkers.from_tokenizer(chat)
