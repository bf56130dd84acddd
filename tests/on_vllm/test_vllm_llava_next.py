"""DeSAP in vLLM's LLaVA-NeXT (AnyRes crops, image-newline tokens counted toward keep), against
transformers with apply_desap on the same checkpoint."""
from engines import PROMPTS, run_engine, transformers_run

OPTIONS = {"keep": 12, "task_ratio": 0.5}


def test_same_kept_tokens_and_greedy_output_as_apply_desap_for_two_image_shapes(checkpoints, tmp_path):
    folder = checkpoints["llava_next"]
    requests = [(PROMPTS[0], checkpoints["wide"]), (PROMPTS[1], checkpoints["odd"]),
                (PROMPTS[2], checkpoints["wide"])]
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": OPTIONS}}, requests)
    expected = [transformers_run("llava_next", folder, p, i, OPTIONS) for p, i in requests]
    assert expected[0]["indices"] != expected[2]["indices"]   # one image, two prompts, two choices
    for out, want in zip(got["rounds"][0], expected):
        assert out["prompt_token_ids"] == want["prompt_ids"]
        assert out["output_token_ids"] == want["output_ids"]
    (rank,) = got["ranks"]
    assert rank["class"] == "DesapLlavaNextForConditionalGeneration"
    assert sorted(tuple(r["indices"]) for r in rank["history"]) == sorted(tuple(e["indices"][0]) for e in expected)
