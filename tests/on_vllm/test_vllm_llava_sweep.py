"""DeSAP's LLaVA-1.5 and LLaVA-NeXT in vLLM over a fixed grid of prompts, against transformers with
apply_desap on the same checkpoint: text before the first image from none to 45 tokens (the
checkpoint tokenizer's words), one or two images per prompt (LLaVA-NeXT: 112 x 56, 56 x 112,
60 x 100 and 112 x 112; two images glued with no text between them), prefill in chunks of 5
tokens and from the prefix cache. Every prompt must get the same prompt ids, kept indices and
greedy output as apply_desap, run every forward at transformers' positions, and the engine must
stay up. The prompts take the pruning methods in turn (per request: ``engines.METHODS``).

One engine per model: each request goes alone (so its forwards are its own), every prompt twice;
the second time it starts from its 32-token blocks in the prefix cache (32: the smallest block the
CPU attention takes), so it gets exactly ``(len - 1) // 32 * 32`` cached tokens. The grid places
chunk ends and cache-hit ends right before an image, inside an image's placeholders, right after
an image and between two images; ``test_the_grid_puts_chunk_and_cache_ends_everywhere`` computes
where they fall without an engine, and the engine tests check the same from the forwards they ran.
"""
import pytest

from engines import METHODS, run_engine, spread_methods, transformers_run

CHUNK, BLOCK = 5, 32
IMAGE_TOKEN = 100
QUESTION = "how many people are {} ? ASSISTANT:"   # 7 tokens, one a word of the prompt's own
# the tokenizer's filler words (ids 54-127 but the image token's): a preamble starts at its own
# word in every prompt, so no two prompts share a first block and the first round gets no cache hit
FILLER = [f"w{i}" for i in range(54, 128) if i != IMAGE_TOKEN]


def _words(n: int, start: int) -> str:
    return " ".join(FILLER[(start + i) % len(FILLER)] for i in range(n))


def _prompt(preamble: int, images: int, between: int = 2, start: int = 0) -> str:
    """``preamble`` words, USER:, the images (``between`` words between two), the question. Each
    prompt has its own ``start``: its question has a word of its own, so no image has the same text
    (and hash) in two prompts, and the first round encodes every image once, in order. (Two images
    of one prompt read the same words, their turn's: the same image twice would be one cache entry.)"""
    parts = ([_words(preamble, start)] if preamble else []) + ["USER:", "<image>"]
    if images == 2:
        parts += ([_words(between, start + 50)] if between else []) + ["<image>"]
    return " ".join(parts + [QUESTION.format(_words(1, start + 70))])


# per model: keep, and (prompt, images); the comments say where token 32 or 64 (the last cached
# block's end in the second round) falls. LLaVA: 6 placeholders an image, LLaVA-NeXT: 12.
# LLaVA-NeXT's 56 x 56 image (its one AnyRes crop is the base image: its tokens come in bit-identical
# pairs) runs on this engine under every method in test_vllm_llava_next.py (exact ties).
GRIDS = {
    "llava": (6, [
        (_prompt(0, 1), ["square"]),
        (_prompt(0, 2, between=0, start=1), ["other", "square"]),            # glued images
        (_prompt(3, 2, start=3), ["square", "other"]),
        (_prompt(20, 2, between=8, start=6), ["other", "square"]),           # 32: between the images
        (_prompt(28, 1, start=9), ["other"]),                                # 32: inside the image
        (_prompt(31, 1, start=12), ["square"]),                              # 32: right before the image
        (_prompt(25, 2, between=3, start=15), ["square", "other"]),          # 32: right after the first image
        (_prompt(40, 2, between=14, start=18), ["other", "square"]),         # 64: inside the second image
        (_prompt(45, 1, start=21), ["square"]),                              # 32: in the preamble
        (_prompt(45, 2, between=4, start=24), ["square", "other"]),          # 64: after both images
    ]),
    "llava_next": (12, [
        (_prompt(0, 1), ["wide"]),
        (_prompt(0, 2, between=1, start=1), ["tall", "wide"]),               # 32: the prompt's last token
        (_prompt(5, 2, between=3, start=3), ["odd", "large"]),               # 32: inside the second image
        (_prompt(15, 2, between=10, start=6), ["wide", "tall"]),             # 32: between the images
        (_prompt(25, 1, start=9), ["large"]),                                # 32: inside the image
        (_prompt(31, 1, start=12), ["odd"]),                                 # 32: right before the image
        (_prompt(19, 2, between=0, start=15), ["tall", "wide"]),             # 32: between two glued images
        (_prompt(40, 2, between=6, start=18), ["large", "odd"]),             # 64: inside the second image
        (_prompt(51, 1, start=21), ["tall"]),                                # 64: right after the image
    ]),
}
KINDS = ("before an image", "inside an image", "after an image", "between two images")


def _engine(kind: str) -> dict:
    return {"hf_overrides": {"desap": {"keep": GRIDS[kind][0], "task_ratio": 0.5}}, "block_size": BLOCK,
            "enable_chunked_prefill": True, "max_num_batched_tokens": CHUNK, "max_num_seqs": 2,
            "enable_prefix_caching": True}


# the engine each test runs its job on (conftest.py starts it ahead)
ENGINES = {"test_chunked_and_prefix_cached_prefills_match_apply_desap": lambda kind: [(kind, _engine(kind))]}


def _spans(ids: list, keep: int) -> list:
    """(start, end) of each image's placeholders: runs of the image token, ``keep`` to an image
    (two glued images make one run)."""
    spans, i = [], 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN:
            spans.append((i, i + keep))
            i += keep
        else:
            i += 1
    return spans


def _kinds(ids: list, end: int, keep: int) -> set:
    """Where a prefill that stops before token ``end`` stops, relative to the prompt's images."""
    spans = _spans(ids, keep)
    kinds = set()
    if any(s == end for s, _ in spans) and ids[end - 1] != IMAGE_TOKEN:
        kinds.add("before an image")
    if any(s < end < e for s, e in spans):
        kinds.add("inside an image")
    if any(e == end for _, e in spans) and ids[end] != IMAGE_TOKEN:
        kinds.add("after an image")
    if any(e <= end for _, e in spans) and any(s >= end for s, _ in spans):
        kinds.add("between two images")
    return kinds


def _cached(length: int) -> int:
    """The prefix-cache hit of a prompt seen before: its full blocks, the last token recomputed."""
    return (length - 1) // BLOCK * BLOCK


def _planned_ends(length: int, hits: int) -> list:
    """Where each prefill forward of a request alone ends, with ``hits`` tokens from the cache, when
    every chunk but the last is CHUNK tokens (the engine test checks the chunks it ran)."""
    return list(range(hits + CHUNK, length, CHUNK)) + [length]


def _tally(prompts: list, keep: int, ends_of) -> dict:
    """Per kind of place, how many chunk ends and cache-hit ends fall there over ``prompts``."""
    seen = {f"{what} {kind}": 0 for what in ("chunk", "cache") for kind in KINDS}
    for ids in prompts:
        for round_ in (0, 1):
            hits, ends = ends_of(ids, round_)
            for end in [hits] + ends:
                if 0 < end < len(ids):
                    for kind in _kinds(ids, end, keep):
                        seen[f"{'cache' if end == hits else 'chunk'} {kind}"] += 1
    return seen


@pytest.fixture(scope="module")
def expected(checkpoints):
    out, start, methods = {}, 0, set()
    for kind, (keep, grid) in GRIDS.items():
        options = {"keep": keep, "task_ratio": 0.5}
        # each prompt asks for its own method, the families going on where the one before stopped
        # (every method at least once over both), against apply_desap with that method
        asked = spread_methods([(prompt, [checkpoints[name] for name in names]) for prompt, names in grid], start)
        start, methods = start + len(asked), methods | {method for _, _, method in asked}
        out[kind] = (options, [(p, media) for p, media, _ in asked],
                     [transformers_run(kind, checkpoints[kind], p, media, {**options, "method": method})
                      for p, media, method in asked])
    assert methods == set(METHODS)
    return out


@pytest.mark.parametrize("kind", GRIDS)
def test_the_grid_puts_chunk_and_cache_ends_everywhere(expected, kind):
    """No engine: where the planned chunk ends and cache-hit ends fall in the pruned prompts."""
    options, _, want = expected[kind]
    prompts = [w["prompt_ids"] for w in want]
    for ids, w in zip(prompts, want):
        runs = [len(r) for r in "".join("i" if t == IMAGE_TOKEN else " " for t in ids).split()]
        assert sum(runs) == options["keep"] * len(w["indices"])   # keep placeholders an image
    # the first words differ: only a prompt's own second run finds its blocks in the cache
    assert len({tuple(ids[:BLOCK]) for ids in prompts if len(ids) > BLOCK}) == sum(len(ids) > BLOCK for ids in prompts)
    seen = _tally(prompts, options["keep"], lambda ids, r: (0, _planned_ends(len(ids), 0)) if r == 0 else
                  (_cached(len(ids)), _planned_ends(len(ids), _cached(len(ids)))))
    assert all(seen.values()), seen
    assert max(map(len, prompts)) > 2 * BLOCK and min(map(len, prompts)) < BLOCK


@pytest.mark.parametrize("kind", GRIDS)
def test_chunked_and_prefix_cached_prefills_match_apply_desap(expected, kind, checkpoints, tmp_path):
    options, requests, want = expected[kind]
    engine = _engine(kind)
    assert engine["hf_overrides"]["desap"] == options
    got = run_engine(tmp_path, checkpoints[kind], engine, requests, rounds=2, positions=True, one_by_one=True)

    actual_ends = {}
    for round_, outputs in enumerate(got["rounds"]):
        assert len(outputs) == len(want)   # the engine stayed up for every request
        for out, forwards, w, (prompt, _) in zip(outputs, got["positions"][round_], want, requests):
            ids, hits = w["prompt_ids"], out["num_cached_tokens"]
            case = (round_, prompt)
            assert out["prompt_token_ids"] == ids, case
            assert out["output_token_ids"] == w["output_ids"], case
            assert hits == (_cached(len(ids)) if round_ else 0), case
            # alone in the engine: its forwards are its prefill chunks from the cache hit on, then
            # one token each, at the positions transformers gives the pruned prompt
            (row,) = w["positions"]
            decode = list(range(len(ids), len(ids) + len(out["output_token_ids"]) - 1))
            assert [p for f in forwards for p in f] == row[hits:] + decode, case
            ends, end = [], hits
            for f in forwards[:len(forwards) - len(decode)]:
                end += len(f)
                ends.append(end)
            # a chunk is CHUNK tokens, but the last, and one the scheduler stops right before an
            # image whose encoder output has no room yet (the previous image's is still in use)
            starts = {s for s, _ in _spans(ids, options["keep"])}
            assert all(end - start == CHUNK or end == len(ids) or end in starts
                       for start, end in zip([hits] + ends, ends)), (case, ends)
            actual_ends[(tuple(ids), round_)] = (hits, ends)
    seen = _tally([w["prompt_ids"] for w in want], options["keep"], lambda ids, r: actual_ends[(tuple(ids), r)])
    assert all(seen.values()), seen

    (rank,) = got["ranks"]
    assert rank["class"] == {"llava": "DesapLlavaForConditionalGeneration",
                             "llava_next": "DesapLlavaNextForConditionalGeneration"}[kind]
    # the first round encodes every image once, request after request (no two images share a text,
    # so none a hash): each image's kept indices, in order; in the second round an image comes from
    # the caches or is encoded again
    first_round = [k for w in want for k in w["indices"]]
    assert [r.indices.tolist() for r in rank["history"][:len(first_round)]] == first_round
    assert {tuple(r.indices.tolist()) for r in rank["history"]} == {tuple(k) for k in first_round}
