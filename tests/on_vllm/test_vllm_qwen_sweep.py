"""DeSAP's Qwen2.5-VL in vLLM over a fixed grid of prompts, against transformers with apply_desap on
the same checkpoint: text before the images from none to more than 40 tokens (Qwen's own system
prompt among them: the checkpoint's tokenizer knows Qwen's chat markers and role words, few of the
system prompt's other words, which become <unk>), one to three images of three shapes, an image with no
<|vision_start|> before it, prefill in small chunks and from the prefix cache. Every prompt must run
at transformers' rotary positions in every forward, with the same prompt ids, kept tokens and
greedy output, and the engine must stay up. The requests take the pruning methods in turn.

Two engines: one prefills in chunks of 5 tokens, each request alone, every prompt twice (the
second time from its 32-token blocks in the prefix cache); chunk ends and cache boundaries fall
right before and right after <|vision_start|>, inside an image and between two images (checked).
The other runs the grid unchunked in a single batch."""
import pytest

from engines import (METHODS, QWEN_IMAGE, QWEN_KEEP_6, assert_alone_positions, assert_batched_positions,
                     assert_same_answers, run_engine, spread_methods, transformers_run)

OPTIONS = {"keep": 6}
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"   # 10 tokens here
CHUNK, BLOCK = 5, 32
IMAGE_TOKEN, VISION_START = 151, 153


def _words(n: int, first: int = 60) -> str:
    return " ".join(f"w{first + i}" for i in range(n))


def _prompt(preamble: str, images: int, between: int = 1) -> str:
    parts = [preamble] if preamble else []
    for i in range(images):
        parts += [QWEN_IMAGE] + ([_words(between, 100 + 10 * i)] if i < images - 1 and between else [])
    return " ".join(parts + ["how many people are there ? ASSISTANT:"])


# (prompt, images); the comment gives where token 32 (the prefix-cache boundary) falls
GRID = [
    (_prompt("", 1), ["large"]),
    (_prompt("", 2, between=0), ["tall", "wide"]),                                  # images glued by their markers
    (_prompt(SYSTEM, 2), ["large", "tall"]),
    (_prompt(SYSTEM + _words(3), 3), ["wide", "large", "tall"]),
    (_prompt(SYSTEM + _words(18), 2, between=4), ["tall", "large"]),   # 32: between the images, before <vs>
    (_prompt(SYSTEM + _words(18), 1), ["wide"]),                       # 32: inside the image
    (_prompt(_words(31), 2), ["large", "wide"]),                       # 32: right after <vs>
    (_prompt(_words(32), 3), ["tall", "wide", "large2"]),              # 32: right before <vs>
    (_prompt(SYSTEM + _words(37), 2), ["wide", "tall"]),               # 47 tokens before the first image
    (_prompt(_words(45, first=61), 1), ["large2"]),
    ("<|image_pad|> " + _prompt(_words(3), 1), ["wide", "large"]),     # the first image: token 0, no <vs>
    (_prompt(SYSTEM + _words(18), 1), ["wide"]),                       # GRID[5] again, under another method
]
# the requests take the pruning methods in turn (per request: engines.METHODS). GRID[11] repeats
# GRID[5], whose first 32-token block holds image placeholders, under another method: its prompt
# ids are the same, and yet in the first round it must find nothing in the prefix cache (the method
# is part of the image's hash, so of the block's)
REPEAT, REPEATED = 11, 5


CHUNKED = {"hf_overrides": {"desap": OPTIONS}, "block_size": BLOCK, "enable_chunked_prefill": True,
           "max_num_batched_tokens": CHUNK, "max_num_seqs": 2, "limit_mm_per_prompt": {"image": 3}}
UNCHUNKED = QWEN_KEEP_6
assert UNCHUNKED["hf_overrides"]["desap"] == OPTIONS
# the engines each test runs its job on (conftest.py starts them ahead; the second is shared)
ENGINES = {"test_chunked_and_prefix_cached_prefills_run_at_transformers_positions": [("qwen2_5_vl", CHUNKED)],
           "test_unchunked_batch_runs_at_transformers_positions": [("qwen2_5_vl", UNCHUNKED)]}


def _kinds(ids: list, end: int) -> set:
    """Where a chunk that ends before token ``end`` ends, relative to the images."""
    images = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN]
    kinds = set()
    if ids[end] == VISION_START:
        kinds.add("before <vs>")
    if ids[end - 1] == VISION_START:
        kinds.add("after <vs>")
    if ids[end - 1] == IMAGE_TOKEN and ids[end] == IMAGE_TOKEN:
        kinds.add("inside an image")
    elif any(i < end for i in images) and any(i >= end for i in images):
        kinds.add("between images")
    return kinds


def _expected(checkpoints):
    folder = checkpoints["qwen2_5_vl"]
    asked = spread_methods([(prompt, [checkpoints[name] for name in names]) for prompt, names in GRID])
    assert {method for _, _, method in asked} == set(METHODS)
    assert GRID[REPEAT] == GRID[REPEATED] and asked[REPEAT][2] != asked[REPEATED][2]
    return folder, [(p, media) for p, media, _ in asked], [
        transformers_run("qwen2_5_vl", folder, p, media, {**OPTIONS, "method": method}) for p, media, method in asked]


@pytest.fixture(scope="module")
def expected(checkpoints):
    return _expected(checkpoints)


def test_chunked_and_prefix_cached_prefills_run_at_transformers_positions(expected, tmp_path):
    folder, requests, expected = expected
    got = run_engine(tmp_path, folder, CHUNKED, requests, rounds=2, positions=True, one_by_one=True)
    assert_same_answers(got, expected, "DesapQwen2_5_VLForConditionalGeneration")
    # one prompt, two methods: the same ids, two prefix-cache entries (no hit in the first round)
    assert expected[REPEAT]["prompt_ids"] == expected[REPEATED]["prompt_ids"]
    assert expected[REPEAT]["indices"] != expected[REPEATED]["indices"]
    assert got["rounds"][0][REPEAT]["num_cached_tokens"] == 0

    seen = {"before <vs>": 0, "after <vs>": 0, "inside an image": 0, "between images": 0}
    for round_, outputs in enumerate(got["rounds"]):
        for out, forwards, want in zip(outputs, got["positions"][round_], expected):
            ids, hits = want["prompt_ids"], out["num_cached_tokens"]
            assert (hits > 0) == (round_ == 1 and len(ids) > BLOCK)
            ends = assert_alone_positions(out, forwards, want)
            for end in ends:
                if 0 < end < len(ids):
                    for kind in _kinds(ids, end):
                        seen[kind] += 1
    assert all(seen.values()), seen
    assert sorted(out["num_cached_tokens"] for out in got["rounds"][1])[-1] >= 2 * BLOCK


def test_unchunked_batch_runs_at_transformers_positions(expected, tmp_path):
    folder, requests, expected = expected
    got = run_engine(tmp_path, folder, UNCHUNKED, requests, positions=True)
    assert_same_answers(got, expected, "DesapQwen2_5_VLForConditionalGeneration")
    assert_batched_positions(got["positions"][0], expected)
