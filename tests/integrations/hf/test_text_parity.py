"""Both engines read the same text for every image and video (docs/algorithm.md, "The text an
image reads"): ``apply_desap`` reads it from the prompt transformers' processor expanded, vLLM's
plugin (``vllm.processor.prompt_texts``) from the prompt before its processor expands it. Here both
run on the same request, and each item's text ids must be equal:

- a Qwen3-VL video, with and without a question, beside an image in its turn: the timestamp the
  processor writes before each frame group is never the user's words, in both of transformers'
  layouts (the prompt's own vision markers around the frames, transformers < 5.2x; collapsed, after);
- a two-turn LLaVA-NeXT chat at a ``keep`` below each image's newline budget, and above its
  tokens: each image reads its own turn."""
import pytest
import torch

from desap_ops.integrations import ChatMarkers, apply_desap, last_prune
from desap_ops.integrations.common.prompt import config_ignored_ids
from desap_ops.integrations.hf import text
from desap_ops.integrations.hf.qwen3_vl import video_frame_text
from desap_ops.integrations.vllm.processor import prompt_texts
from desap_ops.testing.tiny import (IMAGE_TOKEN_ID as LLAVA_IMAGE, QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_END as END,
                                    QWEN_VISION_START as START, tiny_llava_next, tiny_qwen3_vl)

from .qwen_inputs import pixels

# a ChatML-like chat in the tiny models' ids: "<|im_start|> user", "<|im_start|> assistant", "<|im_end|>"
OPEN, CLOSE, USER, ASSISTANT = 155, 156, 70, 71
CHAT = ChatMarkers(user=[(OPEN, USER)], assistant=[(OPEN, ASSISTANT)], other=[(CLOSE,)])
QUESTION = [40, 41, 42, 43, 44, 45]   # "what happens in this clip ?"
LT, DOT, SECONDS, GT = 60, 62, 64, 65


def timestamp(seconds: float) -> list:
    """``<{seconds:.1f} seconds>`` as a Qwen tokenizer splits it: one token per digit."""
    digits = [80 + int(d) for d in f"{seconds:.1f}".replace(".", "")]
    return [LT, *digits[:-1], DOT, digits[-1], SECONDS, GT]


def qwen3_video(times: list, frame_tokens: int, wrapped: bool) -> list:
    """A video's ids as transformers' Qwen3-VL processor writes them: each frame group its
    timestamp and its tokens between vision markers; ``wrapped``: inside the prompt's own markers."""
    frames = sum((timestamp(t) + [START] + [QWEN_VIDEO] * frame_tokens + [END] for t in times), [])
    return [START, *frames, END] if wrapped else frames


def turn(*parts) -> list:
    return [OPEN, USER, *sum(parts, []), CLOSE]


def spy_texts(monkeypatch) -> list:
    """The text ids ``apply_desap`` reads for each item of each call, in the order it reads them."""
    seen, original = [], text.image_text_tokens

    def spy(*args, **kwargs):
        ids, mask = original(*args, **kwargs)
        seen.extend(tuple(int(t) for t in row[m]) for row, m in zip(ids, mask))
        return ids, mask
    monkeypatch.setattr(text, "image_text_tokens", spy)
    return seen


@pytest.fixture(scope="module")
def qwen3_vl():
    return tiny_qwen3_vl()


@pytest.fixture(scope="module")
def llava_next():
    return tiny_llava_next()


VIDEO_GRID, IMAGE_GRID = ("video", 2, 4, 4), ("image", 4, 4)   # 2 frame groups of 4 tokens; 4 tokens


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "collapsed"])
@pytest.mark.parametrize("chat", [CHAT, None], ids=["chat", "plain"])
@pytest.mark.parametrize("question", [QUESTION, []], ids=["question", "none"])
@pytest.mark.parametrize("image_first", [False, True], ids=["video-first", "image-first"])
def test_a_qwen3_videos_frame_timestamps_are_never_an_items_text(qwen3_vl, monkeypatch, wrapped, chat, question,
                                                                 image_first):
    model = apply_desap(qwen3_vl, keep=3, chat=chat)   # replaces the previous test's patch
    # collapsed: a first timestamp shorter than the second (the harder case to find; both widths:
    # the test below)
    times = [0.5, 1.5] if wrapped else [9.5, 10.5]
    seen = spy_texts(monkeypatch)
    image = [START] + [QWEN_IMAGE] * 4 + [END]
    media = [qwen3_video(times, 4, wrapped), image]
    sent_media = [[START, QWEN_VIDEO, END], [START, QWEN_IMAGE, END]]
    if image_first:
        media, sent_media = media[::-1], sent_media[::-1]
    ids = turn(*media, question) + [OPEN, ASSISTANT]
    data = pixels([IMAGE_GRID, VIDEO_GRID], seed=3)
    inputs = torch.tensor([ids])
    model(input_ids=inputs, mm_token_type_ids=(inputs == QWEN_IMAGE).int() + 2 * (inputs == QWEN_VIDEO).int(), **data)

    # vLLM: the same turn before its processor expanded the video
    sent = turn(*sent_media, question) + [OPEN, ASSISTANT]
    ignored = config_ignored_ids(model.config, model.generation_config)
    served = prompt_texts(sent, QWEN_IMAGE, 1, ignored, chat) + prompt_texts(sent, QWEN_VIDEO, 1, ignored, chat,
                                                                             "video")
    assert seen == list(served)   # the image, then the video
    if chat is not None:
        assert served == (tuple(question),) * 2
    assert [int(n) for n in last_prune(model).text_tokens] == [len(t) for t in served]


def test_every_timestamp_is_found_in_either_layout_and_only_for_frames():
    for times in ([0.5, 1.5, 2.5], [9.5, 10.5]):
        for wrapped in (True, False):
            video = qwen3_video(times, 2, wrapped)
            ids = torch.tensor([[OPEN, USER, 33, 34, *video, 35, CLOSE]])
            written = video_frame_text(ids, None, QWEN_VIDEO, [2 * len(times)], START, END)
            first = 4 + wrapped   # after the opener, two words and the prompt's own marker
            last = len(ids[0]) - 3 - wrapped   # the last frame's end marker
            expected = [i for i in range(first, last + 1) if int(ids[0, i]) != QWEN_VIDEO]
            assert written[0].nonzero()[:, 0].tolist() == expected
    # one frame group without the prompt's wrapper (and Qwen2.5-VL's layout): its markers alone,
    # the words before it stay text (nothing to learn a timestamp's tokens from)
    ids = torch.tensor([[OPEN, USER, 33, START, QWEN_VIDEO, QWEN_VIDEO, END, 35]])
    assert video_frame_text(ids, None, QWEN_VIDEO, [2], START, END)[0].nonzero()[:, 0].tolist() == [3, 6]


# LLaVA-NeXT: a 56 x 112 image packs 52 tokens, 4 of them newlines (test_llava_next)
NEXT_SIZE, NEXT_TOKENS = [56, 112], 52
LLAVA_USER, LLAVA_ASSISTANT = (30,), (31,)
LLAVA_CHAT = ChatMarkers(user=[LLAVA_USER], assistant=[LLAVA_ASSISTANT])


# keep 2: each image sends 5 (its 4 newlines and a visual token), so a layout of keep placeholders
# per image would put both images in the first image's run; 60: more than the image's 52
@pytest.mark.parametrize("keep", [2, 12, 60])
@pytest.mark.parametrize("chat", [LLAVA_CHAT, None], ids=["chat", "plain"])
def test_llava_next_images_of_a_chat_read_their_own_turns_at_any_keep(llava_next, monkeypatch, keep, chat):
    model = apply_desap(llava_next, keep=keep, chat=chat)
    seen = spy_texts(monkeypatch)
    first, second, answer = [40, 41, 42, 43, 44], [45, 46, 47, 48], [50, 51]

    def prompt(per_image):
        return [1, 30, *[LLAVA_IMAGE] * per_image, *first, 31, *answer, 30, *[LLAVA_IMAGE] * per_image, *second, 31]
    pixel_values = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    model(input_ids=torch.tensor([prompt(NEXT_TOKENS)]), pixel_values=pixel_values,
          image_sizes=torch.tensor([NEXT_SIZE, NEXT_SIZE]))
    ignored = config_ignored_ids(model.config, model.generation_config)
    served = prompt_texts(prompt(1), LLAVA_IMAGE, 2, ignored, chat)
    assert seen == list(served)
    if chat is not None:
        assert served == (tuple(first), tuple(second))
    assert [int(n) for n in last_prune(model).text_tokens] == [len(t) for t in served]
