"""The vision tower within vLLM's encoder budget. The scheduler charges a pruned image its
placeholders (at most ``keep``), so one ``embed_multimodal`` call can bring many more images than
vLLM planned its encoder memory for; the DeSAP model runs the tower on micro-batches of at most
``max_num_encoder_input_tokens`` full-size tokens (what vLLM charges the images without DeSAP).
A forward pre-hook on the tower records each call in the worker (``tower_probe.py``); the output
still equals transformers with apply_desap on the same checkpoint."""
import pytest

from engines import QWEN_IMAGE, run_engine, save_image, transformers_run

# short prompts: many requests fit one scheduler step, so one embed_multimodal call brings many images
PROMPTS = ("USER: <image> sky ? ASSISTANT:", "USER: <image> sign ASSISTANT:", "USER: <image> people ? ASSISTANT:")
CASES = {  # kind: (options, max_num_batched_tokens, image (width, height), full tokens per image)
    "llava": ({"keep": 4}, 64, (56, 56), 16),
    "llava_next": ({"keep": 12}, 128, (112, 56), 52),    # 48 visual and 4 image-newline tokens, 3 crops
    "qwen2_5_vl": ({"keep": 4}, 64, (112, 112), 16),     # 64 patches merged 2 x 2
}

WATCH = ("tower_probe:watch_tower", "tower_probe:tower_seen")
# the engine core in the LLM's own process: it steps only once every request is in, so the first
# step brings as many images as the token budget holds. In its own process it may step on the first
# request alone while the rest arrive, and under load no step brought more than the budget.
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _engine(kind: str) -> dict:
    options, budget, _, _ = CASES[kind]
    return {"hf_overrides": {"desap": options}, "max_num_batched_tokens": budget}


# each case's engine, started ahead by the pool (conftest.py); the tower's hook stays in its workers,
# so no other job shares it: no other test asks for these settings
ENGINES = {"test_the_tower_never_sees_more_than_the_encoder_budget_and_outputs_match_apply_desap":
           lambda kind: [(kind, _engine(kind), 1, IN_PROCESS)]}


def _full_tokens(kind, call, per_image):
    """Full-size tokens of the images in one tower call."""
    if kind == "qwen2_5_vl":
        return sum(t * h * w for t, h, w in call["grid"]) // 4
    crops = 3 if kind == "llava_next" else 1
    assert call["rows"] % crops == 0
    return call["rows"] // crops * per_image


@pytest.mark.parametrize("kind", list(CASES))
def test_the_tower_never_sees_more_than_the_encoder_budget_and_outputs_match_apply_desap(checkpoints, tmp_path,
                                                                                        kind):
    options, budget, (width, height), per_image = CASES[kind]
    folder = checkpoints[kind]
    images = [save_image(tmp_path, f"image{i}", width, height, 20 + i) for i in range(4)]
    prompts = [p.replace("<image>", QWEN_IMAGE) for p in PROMPTS] if kind == "qwen2_5_vl" else PROMPTS
    requests = [(p, i) for i in images for p in prompts]
    got = run_engine(tmp_path, folder, _engine(kind), requests, max_tokens=2, watch=WATCH,
                     env=IN_PROCESS)
    (seen,) = got["watched"]

    calls = [_full_tokens(kind, call, per_image) for call in seen["tower"]]
    assert sum(calls) == len(requests) * per_image          # every image through the tower once
    assert max(calls) <= budget, calls
    # the scheduler did bring more than the budget in one call (else this test proves nothing)
    assert max(seen["embed"]) * per_image > budget, seen["embed"]

    (rank,) = got["ranks"]
    assert len(rank["history"]) == len(requests)
    kept = sorted(tuple(r.indices.tolist()) for r in rank["history"])
    expected = [transformers_run(kind, folder, p, i, options, max_tokens=2) for p, i in requests]
    assert kept == sorted(tuple(e["indices"][0]) for e in expected)
    for out, want in zip(got["rounds"][0], expected):
        assert out["prompt_token_ids"] == want["prompt_ids"]
        assert out["output_token_ids"] == want["output_ids"]
