"""DeSAP in vLLM's LLaVA-1.5, against transformers with apply_desap on the same checkpoint."""
from engines import METHODS, PROMPTS, run_engine, transformers_run, with_method

OPTIONS = {"keep": 6, "task_ratio": 0.5}
# the options beyond the paper, by apply_desap's names, here with two ranks
BEYOND = {"keep": 6, "task_ratio": "auto", "text_budget": 3}
# test_vllm_multiturn.py's engine without chat markers (32-token blocks, prefix caching), which
# this one shares: the prompts here are shorter than a block, so round 2 finds none of their blocks
# cached, as with the CPU backend's default (128-token) blocks
SHARED = {"hf_overrides": {"desap": OPTIONS}, "block_size": 32, "enable_prefix_caching": True}
# the engines each test runs its jobs on, in order (conftest.py starts them ahead)
ENGINES = {
    "test_same_kept_tokens_and_greedy_output_as_apply_desap_two_prompts_on_one_image_in_one_batch":
        [("llava", SHARED)],
    "test_without_the_desap_key_vllm_runs_its_own_model_unchanged": [("llava", {})],
    "test_tensor_parallel_ranks_keep_the_same_tokens_as_one_rank_and_as_apply_desap":
        [("llava", {"hf_overrides": {"desap": BEYOND}}, 2)],
}


def _distinct(records):
    return sorted({tuple(r.indices.tolist()) for r in records})


def test_same_kept_tokens_and_greedy_output_as_apply_desap_two_prompts_on_one_image_in_one_batch(checkpoints,
                                                                                                 tmp_path):
    folder = checkpoints["llava"]
    requests = [(PROMPTS[0], checkpoints["square"]), (PROMPTS[1], checkpoints["square"]),
                (PROMPTS[2], checkpoints["other"])]
    got = run_engine(tmp_path, folder, SHARED, requests, rounds=2)
    assert all(out["num_cached_tokens"] == 0 for outputs in got["rounds"] for out in outputs)
    expected = [transformers_run("llava", folder, p, i, OPTIONS) for p, i in requests]

    # one image, two prompts: the prompts keep different tokens (else this test would prove nothing)
    assert expected[0]["indices"] != expected[1]["indices"]
    for outputs in got["rounds"]:   # round 2 runs with every cache warm
        for out, want in zip(outputs, expected):
            assert out["prompt_token_ids"] == want["prompt_ids"]          # keep placeholders, text as given
            assert out["output_token_ids"] == want["output_ids"]
    (rank,) = got["ranks"]
    assert rank["class"] == "DesapLlavaForConditionalGeneration"
    assert _distinct(rank["history"]) == sorted({tuple(e["indices"][0]) for e in expected})


def test_without_the_desap_key_vllm_runs_its_own_model_unchanged(checkpoints, tmp_path):
    folder = checkpoints["llava"]
    requests = [(PROMPTS[0], checkpoints["square"]), (PROMPTS[1], checkpoints["other"])]
    got = run_engine(tmp_path, folder, {}, requests)
    (rank,) = got["ranks"]
    assert rank["class"] == "LlavaForConditionalGeneration" and rank["history"] == []
    for out, (prompt, image) in zip(got["rounds"][0], requests):
        want = transformers_run("llava", folder, prompt, image)
        assert out["prompt_token_ids"] == want["prompt_ids"]   # all 16 placeholders
        assert out["output_token_ids"] == want["output_ids"]


def test_tensor_parallel_ranks_keep_the_same_tokens_as_one_rank_and_as_apply_desap(checkpoints, tmp_path):
    folder = checkpoints["llava"]
    # every method, per request, on the two images in turn (the ranks' signals are all-reduced)
    asked = [(PROMPTS[i % 2], with_method(checkpoints[("square", "other")[i % 2]], method), method)
             for i, method in enumerate(METHODS)]
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": BEYOND}}, [(p, m) for p, m, _ in asked], tp=2)
    expected = [transformers_run("llava", folder, p, m, {**BEYOND, "method": method}) for p, m, method in asked]
    first, second = got["ranks"]
    assert first["history"] == second["history"] and len(first["history"]) == len(METHODS)
    assert _distinct(first["history"]) == sorted({tuple(e["indices"][0]) for e in expected})
    for out, want in zip(got["rounds"][0], expected):
        assert out["output_token_ids"] == want["output_ids"]
