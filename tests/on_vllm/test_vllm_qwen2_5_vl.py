"""DeSAP in vLLM's Qwen2.5-VL, against transformers with apply_desap on the same checkpoint: the
kept tokens, the prompt, and greedy output, which goes wrong if a kept token or the text after an
image gets another rotary position than transformers gives it."""
from engines import METHODS, QWEN_IMAGE, QWEN_PROMPTS, run_engine, transformers_run, with_method

OPTIONS = {"keep": 6, "task_ratio": 0.5}
TWO_IMAGES = f"USER: {QWEN_IMAGE} {QWEN_IMAGE} how many people are there ? ASSISTANT:"
# prompts longer than one 32-token block, so that the next round finds the block cached
LONGER = ("find the small dog and the large cat on the left of the blue tree in the corner ? ASSISTANT:",
          "count the red car and the green sign on the right of the person in the center ? ASSISTANT:",
          "describe the picture and show me the small object in the center and the face ? ASSISTANT:")


TP_OPTIONS = {"keep": 5, "task_ratio": "auto", "text_budget": 3}
# the engines each test runs its jobs on, in order (conftest.py starts them ahead)
ENGINES = {
    "test_same_kept_tokens_positions_and_greedy_output_as_apply_desap_with_tall_wide_and_two_images":
        [("qwen2_5_vl", {"hf_overrides": {"desap": OPTIONS}, "block_size": 32})],
    "test_without_the_desap_key_vllm_runs_its_own_qwen_unchanged": [("qwen2_5_vl", {})],
    "test_tensor_parallel_ranks_keep_the_same_tokens_as_apply_desap":
        [("qwen2_5_vl", {"hf_overrides": {"desap": TP_OPTIONS}}, 2)],
}


def _distinct(records):
    return sorted({tuple(r.indices.tolist()) for r in records})


def _expected_indices(expected):
    return sorted({tuple(indices) for e in expected for indices in e["indices"]})


def _rows(positions, start=0):
    return [row[start:] for row in positions[-3:]]   # (t, h, w); transformers may put text positions first


def _step_running(forwards, rows):
    """The forward in which ``rows`` (positions of consecutive tokens) ran as one run; None if none."""
    want = list(zip(*rows))
    for step, positions in enumerate(forwards):
        columns = list(zip(*positions))
        if any(columns[c:c + len(want)] == want for c in range(len(columns) - len(want) + 1)):
            return step
    return None


def test_same_kept_tokens_positions_and_greedy_output_as_apply_desap_with_tall_wide_and_two_images(checkpoints,
                                                                                                  tmp_path):
    folder = checkpoints["qwen2_5_vl"]
    prompts = [p.replace("ASSISTANT:", more) for p, more in zip((QWEN_PROMPTS[0], QWEN_PROMPTS[1], TWO_IMAGES), LONGER)]
    requests = [(prompts[0], checkpoints["large"]), (prompts[1], checkpoints["large"]),
                (prompts[2], [checkpoints["tall"], checkpoints["wide"]])]
    # blocks of 32 tokens (the CPU attention's least): round 2 finds the images in the prefix cache
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": OPTIONS}, "block_size": 32}, requests, rounds=2,
                     positions=True)
    expected = [transformers_run("qwen2_5_vl", folder, p, i, OPTIONS) for p, i in requests]

    assert expected[0]["indices"] != expected[1]["indices"]   # one image, two prompts, two choices
    for outputs in got["rounds"]:
        for out, want in zip(outputs, expected):
            assert out["prompt_token_ids"] == want["prompt_ids"]
            assert out["output_token_ids"] == want["output_ids"]
    (rank,) = got["ranks"]
    assert rank["class"] == "DesapQwen2_5_VLForConditionalGeneration"
    assert _distinct(rank["history"]) == _expected_indices(expected)

    # round 1: each prompt runs at transformers' positions, and its first new token one past their top
    for want in expected:
        step = _step_running(got["positions"][0], _rows(want["positions"]))
        assert step is not None
        top = max(map(max, _rows(want["positions"])))
        assert (top + 1,) * 3 in zip(*got["positions"][0][step + 1])
    # round 2: the uncached rest of each prompt; its positions were set on arrival, before any encoder ran
    cached = [out["num_cached_tokens"] for out in got["rounds"][1]]
    assert min(cached) >= 32
    for want, hits in zip(expected, cached):
        assert _step_running(got["positions"][1], _rows(want["positions"], hits)) is not None


def test_without_the_desap_key_vllm_runs_its_own_qwen_unchanged(checkpoints, tmp_path):
    folder = checkpoints["qwen2_5_vl"]
    requests = [(QWEN_PROMPTS[0], checkpoints["large"]), (TWO_IMAGES, [checkpoints["tall"], checkpoints["wide"]])]
    got = run_engine(tmp_path, folder, {}, requests)
    (rank,) = got["ranks"]
    assert rank["class"] == "Qwen2_5_VLForConditionalGeneration" and rank["history"] == []
    for out, (prompt, image) in zip(got["rounds"][0], requests):
        want = transformers_run("qwen2_5_vl", folder, prompt, image)
        assert out["prompt_token_ids"] == want["prompt_ids"]   # every token of every image
        assert out["output_token_ids"] == want["output_ids"]


def test_tensor_parallel_ranks_keep_the_same_tokens_as_apply_desap(checkpoints, tmp_path):
    folder = checkpoints["qwen2_5_vl"]
    options = TP_OPTIONS
    # every method, per request, on the two images in turn (the ranks' signals are all-reduced)
    asked = [(QWEN_PROMPTS[2 * (i % 2)], with_method(checkpoints[("large", "large2")[i % 2]], method), method)
             for i, method in enumerate(METHODS)]
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": options}}, [(p, m) for p, m, _ in asked], tp=2)
    expected = [transformers_run("qwen2_5_vl", folder, p, m, {**options, "method": method}) for p, m, method in asked]
    first, second = got["ranks"]   # each rank holds 2 of the encoder's 4 heads
    assert first["history"] == second["history"] and len(first["history"]) == len(METHODS)
    assert _distinct(first["history"]) == _expected_indices(expected)
    for out, want in zip(got["rounds"][0], expected):
        assert out["output_token_ids"] == want["output_ids"]
