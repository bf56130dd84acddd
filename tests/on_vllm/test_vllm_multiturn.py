"""A multi-turn chat keeps vLLM's caches with DeSAP's ``chat`` option: an image's text is only its
own user turn's words (in apply_desap and in the vLLM processor alike), so the second turn gives
the image the same text, the same hash and the same kept tokens as the first, and finds the first
turn's blocks in the prefix cache past the image. Without ``chat`` the image's text runs to the end
of the prompt: the second turn changes it, the image is a new cache entry and the prefix-cache hit
stops before it (this shows the test tells the two apart).

Turn 1: 40 words, then "USER: <image> {question} ASSISTANT:". Turn 2: turn 1, its answer, then
"USER: {follow-up} ASSISTANT:". Each turn is checked against transformers with apply_desap
(``chat=tokenizer``) on the same prompt: prompt ids, kept indices, greedy tokens and the positions
of every forward. The turns go to one engine one after the other, with 32-token blocks.
"""
import pytest

from engines import run_engine, transformers_run

KEEP, BLOCK, IMAGE_TOKEN = 6, 32, 100
PREAMBLE = " ".join(f"w{i}" for i in range(56, 96))   # 40 filler words
QUESTION = "what is the color of the sky and where is the dog on the left of the picture ?"
FOLLOW_UP = "where is the red car ?"
TURN_1 = f"{PREAMBLE} USER: <image> {QUESTION} ASSISTANT:"


def _engine(chat: bool) -> dict:
    return {"hf_overrides": {"desap": {"keep": KEEP, "task_ratio": 0.5, "chat": chat}},
            "block_size": BLOCK, "enable_prefix_caching": True}


# the engines the tests' fixture runs its jobs on, in order (conftest.py starts them ahead)
ENGINES = {"test_with_chat_markers_the_second_turn_reuses_the_first_turns_blocks_past_the_image":
           [("llava", _engine(True)), ("llava", _engine(False))]}


def _turns(folder, image, chat):
    """(options, [turn 1, turn 2], their apply_desap runs); turn 2 holds apply_desap's turn-1 answer,
    which the engine must give too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    options = {"keep": KEEP, "task_ratio": 0.5, "chat": tokenizer if chat else None}
    first = transformers_run("llava", folder, TURN_1, image, options)
    answer = tokenizer.decode(first["output_ids"], skip_special_tokens=True)
    assert answer.strip() and not {"USER:", "ASSISTANT:"} & set(answer.split()), answer   # one answer, no turn
    turn_2 = f"{TURN_1} {answer} USER: {FOLLOW_UP} ASSISTANT:"
    return options, [TURN_1, turn_2], [first, transformers_run("llava", folder, turn_2, image, options)]


def _common(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """Per mode (with chat markers or not): the turns, apply_desap's runs and the engine's run."""
    folder, image = checkpoints["llava"], checkpoints["square"]
    out = {}
    for chat in (True, False):
        options, prompts, want = _turns(folder, image, chat)
        got = run_engine(tmp_path_factory.mktemp("chat" if chat else "plain"), folder, _engine(chat),
                         [(p, image) for p in prompts], positions=True, one_by_one=True)
        out[chat] = (prompts, want, got)
    return out


def _same_as_apply_desap(prompts, want, got) -> list:
    """Each turn's prompt ids, greedy tokens and positions are apply_desap's; the prefix-cache hits."""
    (outputs,), (forwards,) = got["rounds"], got["positions"]
    hits = []
    for out, seen, w, prompt in zip(outputs, forwards, want, prompts):
        ids = w["prompt_ids"]
        assert out["prompt_token_ids"] == ids, prompt
        assert ids.count(IMAGE_TOKEN) == KEEP
        assert out["output_token_ids"] == w["output_ids"], prompt
        # the turn ran from its cache hit on, at the positions transformers gives the pruned prompt
        cached = out["num_cached_tokens"]
        decode = list(range(len(ids), len(ids) + len(out["output_token_ids"]) - 1))
        assert [p for f in seen for p in f] == w["positions"][0][cached:] + decode, prompt
        hits.append(cached)
    return hits


def _expected_hits(want) -> int:
    """Turn 2's hit when turn 1's blocks all match: the full blocks of what turn 1 computed (its
    prompt and all its answer but the last token) that turn 2 starts with, short of turn 2's last token."""
    first, second = want[0]["prompt_ids"], want[1]["prompt_ids"]
    computed = first + want[0]["output_ids"][:-1]
    return min(_common(computed, second), len(second) - 1) // BLOCK * BLOCK


def test_with_chat_markers_the_second_turn_reuses_the_first_turns_blocks_past_the_image(runs):
    prompts, want, got = runs[True]
    first, second = _same_as_apply_desap(prompts, want, got)
    assert first == 0
    # the image's text is its own turn's words: the same kept tokens in both turns
    assert want[0]["indices"] == want[1]["indices"]
    ids = want[0]["prompt_ids"]
    last_image = max(i for i, t in enumerate(ids) if t == IMAGE_TOKEN)
    assert second == _expected_hits(want)
    assert second >= len(ids) // BLOCK * BLOCK > last_image   # every full block of turn 1's prompt, past the image
    # the image was wholly in the cache: the encoder ran once, for turn 1
    (rank,) = got["ranks"]
    assert [r.indices.tolist() for r in rank["history"]] == want[0]["indices"]


def test_without_chat_markers_the_second_turn_is_a_new_image_entry_and_hits_less(runs):
    prompts, want, got = runs[False]
    first, second = _same_as_apply_desap(prompts, want, got)
    assert first == 0
    ids = want[0]["prompt_ids"]
    first_image = ids.index(IMAGE_TOKEN)
    # the blocks before the image match, the image's block does not: its text changed with turn 2
    assert second == first_image // BLOCK * BLOCK < runs[True][2]["rounds"][0][1]["num_cached_tokens"]
    (rank,) = got["ranks"]
    assert [r.indices.tolist() for r in rank["history"]] == want[0]["indices"] + want[1]["indices"]
