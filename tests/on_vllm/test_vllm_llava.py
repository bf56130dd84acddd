"""DeSAP in vLLM's LLaVA-1.5, against transformers with apply_desap on the same checkpoint."""
from engines import PROMPTS, run_engine, transformers_run

OPTIONS = {"keep": 6, "task_ratio": 0.5}


def _distinct(records):
    return sorted({tuple(r["indices"]) for r in records})


def test_same_kept_tokens_and_greedy_output_as_apply_desap_two_prompts_on_one_image_in_one_batch(checkpoints,
                                                                                                 tmp_path):
    folder = checkpoints["llava"]
    requests = [(PROMPTS[0], checkpoints["square"]), (PROMPTS[1], checkpoints["square"]),
                (PROMPTS[2], checkpoints["other"])]
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": OPTIONS}}, requests, rounds=2)
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


# the options beyond the paper, by apply_desap's names, here with two ranks
BEYOND = {"keep": 6, "task_ratio": "auto", "text_budget": 3}


def test_tensor_parallel_ranks_keep_the_same_tokens_as_one_rank_and_as_apply_desap(checkpoints, tmp_path):
    folder = checkpoints["llava"]
    requests = [(PROMPTS[0], checkpoints["square"]), (PROMPTS[1], checkpoints["other"])]
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": BEYOND}}, requests, tp=2)
    expected = [transformers_run("llava", folder, p, i, BEYOND) for p, i in requests]
    first, second = got["ranks"]
    assert first["history"] == second["history"] and len(first["history"]) == 2
    assert _distinct(first["history"]) == sorted({tuple(e["indices"][0]) for e in expected})
    for out, want in zip(got["rounds"][0], expected):
        assert out["output_token_ids"] == want["output_ids"]
