"""DeSAP in vLLM's LLaVA-NeXT (AnyRes crops, image-newline tokens counted toward keep), against
transformers with apply_desap on the same checkpoint, under every pruning method (per request)."""
from engines import METHODS, PROMPTS, run_engine, save_image, transformers_run, with_method

OPTIONS = {"keep": 12, "task_ratio": 0.5}
ENGINE = {"hf_overrides": {"desap": OPTIONS}}
ENGINES = {"test_same_kept_tokens_and_greedy_output_as_apply_desap_for_two_image_shapes": [("llava_next", ENGINE)],
           "test_each_image_of_a_two_turn_chat_reads_its_own_turn_where_its_newlines_pass_keep":
           [("llava_next", ENGINE)]}   # conftest.py starts it ahead


def test_same_kept_tokens_and_greedy_output_as_apply_desap_for_two_image_shapes(checkpoints, tmp_path):
    folder = checkpoints["llava_next"]
    # every method, per request; the first prompt on the wide image under three of them: one prompt,
    # one placeholder count, three cache entries
    asked = [(PROMPTS[0], "wide", "desap"), (PROMPTS[1], "odd", "first"), (PROMPTS[2], "wide", "desap"),
             (PROMPTS[0], "wide", "random"), (PROMPTS[1], "odd", "saliency"), (PROMPTS[2], "wide", "similarity"),
             (PROMPTS[0], "wide", "divprune"), (PROMPTS[1], "odd", "largest-norm"), (PROMPTS[2], "odd", "hiprune")]
    assert {method for _, _, method in asked} == set(METHODS)
    requests = [(p, with_method(checkpoints[image], method)) for p, image, method in asked]
    # round 2 repeats every request in a new generate call: each image comes from vLLM's processor cache
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": OPTIONS}}, requests, rounds=2)
    expected = [transformers_run("llava_next", folder, p, checkpoints[image], {**OPTIONS, "method": method})
                for p, image, method in asked]
    assert expected[0]["indices"] != expected[2]["indices"]   # one image, two prompts, two choices
    assert len({tuple(expected[i]["indices"][0]) for i in (0, 3, 6)}) == 3   # one prompt, three methods, three choices
    for outputs in got["rounds"]:
        for out, want in zip(outputs, expected):
            assert out["prompt_token_ids"] == want["prompt_ids"]
            assert out["output_token_ids"] == want["output_ids"]
    (rank,) = got["ranks"]
    assert rank["class"] == "DesapLlavaNextForConditionalGeneration"
    assert sorted({tuple(r.indices.tolist()) for r in rank["history"]}) == sorted({tuple(e["indices"][0]) for e in expected})


def test_each_image_of_a_two_turn_chat_reads_its_own_turn_where_its_newlines_pass_keep(checkpoints, tmp_path):
    """Two user turns, each with a 90 x 90 image and its own words, at a request's ``keep`` of 4:
    each image's budget (its kept tokens and its newlines) is more than 4, and each image still
    reads its own turn's words (5, then 4) in both engines, and keeps the same tokens."""
    folder, keep = checkpoints["llava_next"], 4
    prompt = "USER: <image> w60 w61 w62 w63 w64 ASSISTANT: w70 w71 USER: <image> w65 w66 w67 w68 ASSISTANT:"
    images = [save_image(tmp_path, f"ninety{i}", 90, 90, 20 + i) for i in range(2)]
    request = {"image": images, "mm_processor_kwargs": {"desap": {"keep": keep}}}
    got = run_engine(tmp_path, folder, ENGINE, [(prompt, request)])
    (want,) = [transformers_run("llava_next", folder, prompt, images, {**OPTIONS, "keep": keep})]
    # the newlines take each image to 2 keep or more: with keep placeholders per image, both images'
    # would lie in the first image's run
    assert want["prompt_ids"].count(100) >= 4 * keep
    assert want["text_tokens"] == [5, 4]
    ((out,),) = got["rounds"]
    assert out["prompt_token_ids"] == want["prompt_ids"]
    assert out["output_token_ids"] == want["output_ids"]
    (rank,) = got["ranks"]
    kept = [(r.indices.tolist(), r.text_tokens) for r in rank["history"]]
    assert kept == list(zip(want["indices"], want["text_tokens"]))


def test_a_repeated_image_and_prompt_is_served_from_the_processor_cache_with_the_same_placeholders(checkpoints):
    # the second call finds the image in the cache and processes no item: the placeholder count
    # must not be read from the (empty) list of items processed now
    from PIL import Image
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.cache.base import MultiModalProcessorOnlyCache

    from desap_ops.integrations.vllm import register

    register()
    config = ModelConfig(model=str(checkpoints["llava_next"]), hf_overrides={"desap": OPTIONS}, max_model_len=512)
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    cache = MultiModalProcessorOnlyCache(config)
    items = processor.info.parse_mm_data({"image": Image.open(checkpoints["wide"]).convert("RGB")})
    first, second = (processor(PROMPTS[0], items, cache=cache) for _ in range(2))
    assert first["prompt_token_ids"] == second["prompt_token_ids"]
    assert first["prompt_token_ids"].count(config.hf_config.image_token_index) == OPTIONS["keep"]
    assert first["mm_hashes"] == second["mm_hashes"]
