"""The fuzzer's cases (``fuzz.py``), without an engine: made from the seed alone, and a few hundred
seeds span the space the fuzzer promises (every engine and method, keep 1 and a refused keep,
Qwen's max_pixels above the default and images past the rotary cache, videos long and short, text
around the media, system prompts, turns and follow-ups), each within its engine's limits."""
import fuzz
from engines import ENGINE

SEEDS = range(400)


def test_a_case_is_made_from_its_seed_alone():
    assert [fuzz.generate(s) for s in SEEDS] == [fuzz.generate(s) for s in SEEDS]
    assert len({fuzz.generate(s) for s in SEEDS}) == len(SEEDS)


def test_the_seeds_span_the_space_within_each_engines_limits():
    cases = [fuzz.generate(s) for s in SEEDS]
    assert {c.engine for c in cases} == set(fuzz.ENGINES)
    assert {c.method for c in cases} == set(fuzz.METHODS)
    assert any(c.keep == 1 for c in cases) and any(c.refused_keep for c in cases) and any(c.keep is None for c in cases)
    media = [(c, p) for c in cases for m in c.messages for p in m.parts if not isinstance(p, str)]
    for case in cases:
        limits = case.settings.get("limit_mm_per_prompt", ENGINE["limit_mm_per_prompt"])
        items = [p for m in case.messages for p in m.parts if not isinstance(p, str)]
        assert items
        assert sum(isinstance(p, fuzz.Picture) for p in items) <= limits.get("image", 0)
        assert sum(isinstance(p, fuzz.Clip) for p in items) <= limits.get("video", 0)
        assert case.messages[-1].role == "user"
        assert all(m.role == "user" for m in case.messages if any(not isinstance(p, str) for p in m.parts))
    qwen = [c for c in cases if c.family in fuzz.TOKEN_SIDE]
    # above the checkpoint's default (16 tokens), and an image long enough to pass 512 positions with it
    assert any(c.max_pixels and c.max_pixels > 16 * fuzz.TOKEN_SIDE[c.family] ** 2 for c in qwen)
    assert any(c.max_pixels and max(p.width, p.height) // fuzz.TOKEN_SIDE[c.family] > 512
               and p.width * p.height <= c.max_pixels for c, p in media if isinstance(p, fuzz.Picture) and c in qwen)
    assert {p.frames for _, p in media if isinstance(p, fuzz.Clip)} >= {1, 2, 160}
    assert any(isinstance(c.messages[0].parts[0], str) and c.messages[0].role == "system" for c in cases)
    assert any(len([m for m in c.messages if m.role == "user"]) == 3 for c in cases)
    assert any(c.follow_up for c in cases)
    # words before, between and after media in one turn
    turns = [m.parts for c in cases for m in c.messages if m.role == "user"]
    assert any(len(t) >= 5 and isinstance(t[0], str) and isinstance(t[-1], str) for t in turns)
