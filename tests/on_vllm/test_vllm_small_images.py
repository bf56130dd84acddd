"""``keep`` means at most in vLLM as in apply_desap (``sequence.image_budget``): an image with no
more tokens than ``keep`` passes whole, with its own placeholder count, against transformers with
apply_desap on the same checkpoint, under every pruning method (per request)."""
from engines import METHODS, PROMPTS, QWEN_IMAGE, QWEN_KEEP_6, run_engine, transformers_run, with_method
from test_vllm_qwen2_5_vl import _rows, _step_running


SMALL_ONLY = f"USER: {QWEN_IMAGE} what is the color of the sky ? ASSISTANT:"
# the engines each test runs its job on (conftest.py starts them ahead; the first is shared)
ENGINES = {"test_qwen_small_image_passes_whole_next_to_a_pruned_one_at_transformers_positions":
           [("qwen2_5_vl", QWEN_KEEP_6)],
           "test_llava_keep_above_the_images_tokens_sends_every_token":
           [("llava", {"hf_overrides": {"desap": {"keep": 20}}})]}


def test_qwen_small_image_passes_whole_next_to_a_pruned_one_at_transformers_positions(checkpoints, tmp_path):
    folder = checkpoints["qwen2_5_vl"]
    options = QWEN_KEEP_6["hf_overrides"]["desap"]
    prompt = f"USER: {QWEN_IMAGE} {QWEN_IMAGE} which one is larger ? ASSISTANT:"
    # the pair under every method (per request), then the small image alone (the engine's method)
    asked = [(prompt, with_method([checkpoints["square"], checkpoints["large"]], method), method)
             for method in METHODS] + [(SMALL_ONLY, checkpoints["square"], "desap")]   # 4 tokens (whole), 16 (to 6)
    requests = [(p, media) for p, media, _ in asked]
    got = run_engine(tmp_path, folder, QWEN_KEEP_6, requests, positions=True)
    expected = [transformers_run("qwen2_5_vl", folder, p, i, {**options, "method": method}) for p, i, method in asked]

    from transformers import AutoConfig

    image_token = AutoConfig.from_pretrained(folder).image_token_id
    assert [out["prompt_token_ids"].count(image_token) for out in got["rounds"][0]] == [4 + 6] * len(METHODS) + [4]
    for out, want in zip(got["rounds"][0], expected):
        assert out["prompt_token_ids"] == want["prompt_ids"]
        assert out["output_token_ids"] == want["output_ids"]
    (rank,) = got["ranks"]
    kept = sorted(tuple(r.indices.tolist()) for r in rank["history"])
    assert kept == sorted(tuple(indices) for e in expected for indices in e["indices"])
    assert kept.count((0, 1, 2, 3)) == len(METHODS) + 1   # the small image, under every method: every token, in order
    for want in expected:   # each prompt runs at transformers' positions, its first new token one past their top
        step = _step_running(got["positions"][0], _rows(want["positions"]))
        assert step is not None
        top = max(map(max, _rows(want["positions"])))
        assert (top + 1,) * 3 in zip(*got["positions"][0][step + 1])


def test_llava_keep_above_the_images_tokens_sends_every_token(checkpoints, tmp_path):
    folder = checkpoints["llava"]
    options = {"keep": 20}   # the tiny LLaVA has 16 tokens per image
    # every method, per request, on the two images in turn
    asked = [(PROMPTS[i % 3], with_method(checkpoints[("square", "other")[i % 2]], method), method)
             for i, method in enumerate(METHODS)]
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": options}}, [(p, m) for p, m, _ in asked])
    expected = [transformers_run("llava", folder, p, m, {**options, "method": method}) for p, m, method in asked]
    for out, want in zip(got["rounds"][0], expected, strict=True):
        assert out["prompt_token_ids"].count(100) == 16
        assert out["prompt_token_ids"] == want["prompt_ids"]
        assert out["output_token_ids"] == want["output_ids"]
    (rank,) = got["ranks"]
    assert [r.indices.tolist() for r in rank["history"]] == [list(range(16))] * len(METHODS)
    assert [e["indices"][0] for e in expected] == [list(range(16))] * len(METHODS)
