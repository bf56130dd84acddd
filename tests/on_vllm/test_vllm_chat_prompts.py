"""The prompts users send, through ``vllm serve`` and the OpenAI chat API, each checkpoint speaking
its family's chat template (LLaVA's ``USER: ... ASSISTANT:``; Qwen's ChatML, Qwen2.5-VL's with its
default system prompt), with DeSAP's default chat markers (read from that template). Per request,
position by position against transformers with ``apply_desap(chat=tokenizer)`` on the prompt the
same template renders: the prompt's ids, each image's kept tokens and how many text tokens it read
(read from the server's workers through ``served_history``), and the greedy answer.

- the question after the image, the question before it: the same kept tokens;
- a system prompt: never counts (the same kept tokens as without it);
- two images with words between and after them: both read every word of their turn;
- a second turn: the first image's kept tokens stay as they were, and its prefix is cached;
- Qwen2.5-VL and Qwen3-VL: OpenAI ``video_url`` requests (an mp4 data URL written with OpenCV),
  alone and beside an image, four at once, each pruned by its question.
"""
import base64
import threading
from pathlib import Path

import numpy as np
import pytest
import servers

from engines import as_vllm_video_prompt, rendered_chat, save_image, transformers_run

QUESTION = "what is the color of the sky ?"
SYSTEM = "describe the picture on the left"
# a first turn long enough to fill a 32-token block past the image, so that its prefix can be cached
LONG_QUESTION = " ".join(["what is the color of the sky and where is the dog on the left of the picture ?"] * 2)
FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl")
# each family's two images: on LLaVA-NeXT two 112 x 56 ones, whose budget is keep (a square one's crop
# equals its base image, which ties exactly: docs/vllm.md; a taller one keeps more for its newlines)
IMAGES = {"llava": ("square", "other"), "llava_next": ("wide", "wide2"), "qwen2_5_vl": ("large", "wide"),
          "qwen3_vl": ("large", "wide")}
VIDEO_FAMILIES = servers.VIDEO_FAMILIES


def _data_url(path: str, kind: str) -> str:
    return f"data:{kind};base64," + base64.b64encode(open(path, "rb").read()).decode()


def _image(path: str) -> dict:
    return {"type": "image_url", "image_url": {"url": _data_url(path, "image/png")}}


def _video(path: str) -> dict:
    return {"type": "video_url", "video_url": {"url": _data_url(path, "video/mp4")}}


def _text(words: str) -> dict:
    return {"type": "text", "text": words}


def write_mp4(folder: Path, name: str, frames: int, width: int, height: int, seed: int, fps: float = 2.0) -> dict:
    """An mp4 of random frames written with OpenCV, and the frames and metadata vLLM's OpenCV video
    loader reads back from it (decoded here the same way, so transformers sees the same pixels)."""
    import cv2

    path = folder / f"{name}.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    rng = np.random.default_rng(seed)
    for _ in range(frames):
        writer.write((rng.random((height, width, 3)) * 255).astype("uint8"))
    writer.release()
    capture = cv2.VideoCapture(str(path))
    decoded = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(decoded) == frames
    np.save(folder / f"{name}.npy", np.stack(decoded))
    return {"mp4": str(path), "frames": str(folder / f"{name}.npy"),
            "metadata": {"fps": fps, "duration": frames / fps, "total_num_frames": frames,
                         "frames_indices": list(range(frames)), "video_backend": "opencv"}}


@pytest.fixture
def images(server, checkpoints, tmp_path):
    """The server's family's two images."""
    return [checkpoints[name] if name in checkpoints else save_image(tmp_path, name, 112, 56, 8)
            for name in IMAGES[server.family]]


def _expected(server: servers.Server, messages: list, media, max_tokens: int = 6) -> dict:
    """transformers with apply_desap and the template's markers (``engines.as_engine_defaults``) on
    the prompt the template renders (a Qwen3 video's span as DeSAP's vLLM plugin lays it out:
    ``as_vllm_video_prompt``)."""
    kind, folder = server.family, server.folder
    want = transformers_run(kind, folder, rendered_chat(folder, messages), media, server.options,
                            max_tokens=max_tokens)
    if kind == "qwen3_vl" and isinstance(media, dict) and "video" in media:
        want["prompt_ids"] = as_vllm_video_prompt(want["prompt_ids"])
    return want


def _check(server: servers.Server, messages: list, media, words: int) -> list:
    """Send ``messages`` to a server with empty caches; the prompt, kept tokens and answer must be
    transformers'; every image read ``words`` text tokens. Returns the records."""
    server.fresh()
    status, reply = server.chat(messages)
    assert status == 200, reply
    records = server.records()
    want = _expected(server, messages, media)
    assert reply["prompt_token_ids"] == want["prompt_ids"]
    assert [r.indices.tolist() for r in records] == want["indices"]
    assert [r.text_tokens for r in records] == [words] * len(records)
    assert reply["choices"][0]["token_ids"] == want["output_ids"]
    return records


@pytest.mark.parametrize("server", FAMILIES, indirect=True)
def test_the_question_counts_before_or_after_the_image_and_a_system_prompt_never(server, images):
    image = images[0]
    question_words = len(QUESTION.split())
    after = _check(server, [{"role": "user", "content": [_image(image), _text(QUESTION)]}], image,
                   question_words)
    before = _check(server, [{"role": "user", "content": [_text(QUESTION), _image(image)]}], image,
                    question_words)
    system = _check(server, [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": [_image(image), _text(QUESTION)]}], image, question_words)
    assert after == before == system


@pytest.mark.parametrize("server", FAMILIES, indirect=True)
def test_two_images_read_the_words_between_and_after_them(server, images):
    first, second = images
    words = ("show me", "and", "how many people are there ?")
    content = [_text(words[0]), _image(first), _text(words[1]), _image(second), _text(words[2])]
    _check(server, [{"role": "user", "content": content}], [first, second], len(" ".join(words).split()))


@pytest.mark.parametrize("server", FAMILIES, indirect=True)
def test_a_second_turn_leaves_the_first_images_kept_tokens_and_cache_as_they_were(server, images):
    image = images[0]
    turn = [{"role": "user", "content": [_image(image), _text(LONG_QUESTION)]}]
    first = _check(server, turn, image, len(LONG_QUESTION.split()))
    status, reply = server.chat(turn + [{"role": "assistant", "content": "a cat"},
                                        {"role": "user", "content": "and the dog ?"}])
    assert status == 200, reply
    again = server.records()
    # the image and its turn come from the caches: either the encoder did not run again, or it kept
    # exactly what it kept the first time
    assert again in ([], first)
    # the first turn's blocks, past the image, come from the prefix cache
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(server.folder)
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    image_end = max(i for i, t in enumerate(reply["prompt_token_ids"]) if t == image_token) + 1
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= image_end
    want = _expected(server, turn + [{"role": "assistant", "content": "a cat"},
                                     {"role": "user", "content": "and the dog ?"}], image)
    assert want["indices"] == [first[0].indices.tolist()] and reply["prompt_token_ids"] == want["prompt_ids"]


@pytest.mark.parametrize("server", VIDEO_FAMILIES, indirect=True)
def test_openai_video_requests_alone_and_beside_an_image_four_at_once(server, images, tmp_path):
    side = 64 if server.family == "qwen3_vl" else 56
    video = write_mp4(tmp_path, "clip", 4, 2 * side, side, 21)
    image = images[0]
    server.fresh()
    requests = [[{"role": "user", "content": [_video(video["mp4"]), _text(QUESTION)]}],
                [{"role": "user", "content": [_text("read the text on the sign"), _image(image), _video(video["mp4"])]}]]
    replies = [None] * 4

    def send(i):
        replies[i] = server.chat(requests[i % 2])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [status for status, _ in replies] == [200] * 4, replies
    records = server.records()   # each video and image pruned by its question, within keep
    assert records and all(0 < len(r.indices) <= server.options["keep"] and r.text_tokens > 0 for r in records)
    for i, messages in enumerate(requests):
        media = {"video": {"frames": video["frames"], "metadata": video["metadata"]},
                 **({"image": image} if i == 1 else {})}
        want = _expected(server, messages, media)
        for status, reply in replies[i::2]:
            assert reply["prompt_token_ids"] == want["prompt_ids"]
            assert reply["choices"][0]["token_ids"] == want["output_ids"]
