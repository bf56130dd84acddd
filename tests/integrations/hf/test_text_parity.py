"""Both engines read the same text for every image and video (docs/algorithm.md, "The text an
image reads"): ``apply_desap`` reads it from the prompt transformers' processor expanded, vLLM's
plugin (``vllm.processor.prompt_texts``) from the prompt before its processor expands it. Here both
run on the same request, and each item's text ids must be equal:

- a Qwen3-VL video, with and without a question, beside an image in its turn: the timestamp the
  processor writes before each frame group is never the user's words, in both of transformers'
  layouts (the prompt's own vision markers around the frames, transformers < 5.2x; collapsed, after);
- a one-group Qwen3-VL clip (2 frames), the prompt as transformers' processor writes it, with
  ``chat`` a tokenizer: its one timestamp is found as the tokenizer spells one, with no second
  timestamp to learn it from (a two-group clip by the same rule); the finder itself with the
  checkpoints' word-level tokenizer and a byte-level BPE split as Qwen2's tokenizer splits;
- a two-turn LLaVA-NeXT chat at a ``keep`` below each image's newline budget, and above its
  tokens: each image reads its own turn."""
import functools
from types import SimpleNamespace

import pytest
import torch

from desap_ops.integrations import ChatMarkers, apply_desap, last_prune
from desap_ops.integrations.common.prompt import config_ignored_ids
from desap_ops.integrations.hf import text
from desap_ops.integrations.hf.qwen3_vl import TIMESTAMP_FORMAT, timestamp_before, timestamp_shape, video_frame_text
from desap_ops.integrations.vllm.processor import prompt_texts
from desap_ops.testing.checkpoint import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, qwen_tokenizer
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
    assert [r.text_tokens for r in last_prune(model)] == [len(t) for t in served]


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


def qwen2_split_bpe():
    """A byte-level BPE split as Qwen2's tokenizer splits (one token a digit, punctuation runs
    apart from words), with merges that spell " seconds" as one token and glue a timestamp's
    ``<`` to a space or a question mark before it, as a real vocabulary can."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("\u0120", "s"), ("\u0120s", "e"), ("\u0120se", "c"), ("\u0120sec", "o"), ("\u0120seco", "n"),
              ("\u0120secon", "d"), ("\u0120second", "s"), ("?", "<"), ("\u0120", "<")]   # \u0120: a space
    for a, b in merges:
        vocab[a + b] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def test_a_timestamp_is_found_as_the_tokenizer_spells_it_at_every_width(qwen3_vl):
    checkpoint, bpe = qwen_tokenizer(qwen3_vl.config), qwen2_split_bpe()
    # the checkpoints' word-level tokenizer: "<0.5" and "seconds>" are two unknown words
    assert timestamp_shape(checkpoint) == ((), frozenset(), (checkpoint.unk_token_id,) * 2)
    shape = timestamp_shape(bpe)
    assert timestamp_shape(SimpleNamespace(tokenizer=bpe)) == shape   # a processor: its tokenizer
    assert bpe.convert_ids_to_tokens(list(shape.prefix + shape.suffix)) == ["<", "\u0120seconds", ">"]
    assert sorted(bpe.convert_ids_to_tokens(list(shape.digits))) == list(".0123456789")
    for seconds in (0.5, 10.5, 100.0):
        stamp = TIMESTAMP_FORMAT.format(seconds)
        size = len(f"{seconds:.1f}") + 3   # a token a digit and the point, "<", " seconds", ">"
        for before, glued in (("user\n", 0), ("clip 3", 0), ("end.", 0), ("what?", 1), ("what ", 1)):
            ids = bpe.encode(before + stamp, add_special_tokens=False)
            # a "<" merged with the user's "?" or space holds their characters: it stays text
            assert timestamp_before(ids, shape) == size - glued, (before, stamp)
            assert timestamp_before(bpe.encode(before, add_special_tokens=False), shape) == 0
        ids = checkpoint.encode("what is the image ? " + stamp, add_special_tokens=False)
        assert timestamp_before(ids, timestamp_shape(checkpoint)) == 2
    assert timestamp_before(bpe.encode("a seconds>", add_special_tokens=False), shape) == 0   # no seconds
    # one frame group without the prompt's wrapper: its timestamp by the shape, the words before stay text
    tail = bpe.encode("what ?\n" + TIMESTAMP_FORMAT.format(100.0), add_special_tokens=False)
    ids = torch.tensor([[OPEN, USER, *tail, START, QWEN_VIDEO, QWEN_VIDEO, END, 35]])
    written = video_frame_text(ids, None, QWEN_VIDEO, [2], START, END, shape)[0].nonzero()[:, 0].tolist()
    assert written == list(range(2 + len(tail) - 8, 2 + len(tail) + 1)) + [2 + len(tail) + 3]


def processor_video(frames: list, fps: float, tokens: int) -> str:
    """The text transformers' Qwen3-VL processor writes for a video of ``frames`` (indices into a
    clip of ``fps``, two a group) of ``tokens`` tokens a group (its own code, fed what it reads)."""
    from transformers import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    writer = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                             video_token=VIDEO_PAD, vision_start_token=VISION_START, vision_end_token=VISION_END)
    writer._calculate_timestamps = functools.partial(Qwen3VLProcessor._calculate_timestamps, writer)
    metadata = VideoMetadata(total_num_frames=frames[-1] + 1, fps=fps, frames_indices=frames)
    grid = torch.tensor([[len(frames) // 2, 2, 2 * tokens]])   # 2 x 2 patches a token
    return Qwen3VLProcessor.replace_video_token(writer, {"video_grid_thw": grid, "video_metadata": [metadata]}, 0)


# a group's time: the mean of its two frames'; the tokenizer's spelling serves clips of more groups
# too (the first timestamp shorter than the second: 9.5 s, 11.5 s)
@pytest.mark.parametrize("frames,seconds", [([0, 1], 0.5), ([99, 101], 100.0), ([9, 10, 11, 12], 9.5)],
                         ids=["0.5s", "100.0s", "two-groups"])
@pytest.mark.parametrize("question", ["none", "after", "before"])
@pytest.mark.parametrize("image_first", [False, True], ids=["video-first", "image-first"])
def test_a_one_group_clips_timestamp_is_never_an_items_text_given_the_tokenizer(qwen3_vl, monkeypatch, frames,
                                                                                seconds, question, image_first):
    tokenizer = qwen_tokenizer(qwen3_vl.config)
    model = apply_desap(qwen3_vl, keep=3, chat=tokenizer)
    markers = model._desap.options.chat
    seen = spy_texts(monkeypatch)
    video = processor_video(frames, 1.0, 4)
    assert video.startswith(TIMESTAMP_FORMAT.format(seconds) + VISION_START)   # transformers' spelling
    words = "what is in the image ? "
    media = ["video", "image"][::-1] if image_first else ["video", "image"]
    parts = ([{"type": "text", "text": words}] if question == "before" else []) + [{"type": m} for m in media] + \
        ([{"type": "text", "text": words}] if question == "after" else [])
    sent_text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                              tokenize=False)
    wrapper = VISION_START + VIDEO_PAD + VISION_END
    assert sent_text.count(wrapper) == 1
    # transformers >= 5.20: the processor's frames replace the prompt's own wrapper (collapsed)
    written = sent_text.replace(wrapper, video).replace(IMAGE_PAD, IMAGE_PAD * 4)
    ids = torch.tensor([tokenizer.encode(written, add_special_tokens=False)])
    groups = len(frames) // 2
    assert int((ids == START).sum()) == 1 + groups   # the image's wrapper and each frame group's
    data = pixels([IMAGE_GRID, ("video", groups, 4, 4)], seed=3)
    model(input_ids=ids, mm_token_type_ids=(ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int(), **data)

    sent = tokenizer.encode(sent_text, add_special_tokens=False)
    ignored = config_ignored_ids(model.config, model.generation_config)
    served = prompt_texts(sent, QWEN_IMAGE, 1, ignored, markers) + prompt_texts(sent, QWEN_VIDEO, 1, ignored,
                                                                                 markers, "video")
    assert seen == list(served)   # the image, then the video
    asked = () if question == "none" else tuple(tokenizer.encode(words, add_special_tokens=False))
    assert served == (asked,) * 2
    assert [r.text_tokens for r in last_prune(model)] == [len(t) for t in served]


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
    assert [r.text_tokens for r in last_prune(model)] == [len(t) for t in served]
