"""DeSAP in vLLM's LLaVA-NeXT (AnyRes crops, image-newline tokens counted toward keep), against
transformers with apply_desap on the same checkpoint, under every pruning method (per request)."""
import pytest

import test_vllm_llava_sweep
from engines import (BUILDERS, METHODS, PROMPTS, assert_same_as_transformers, run_engine, save_image,
                     transformers_run, with_method)

OPTIONS = {"keep": 12, "task_ratio": 0.5}
ENGINE = {"hf_overrides": {"desap": OPTIONS}}
ENGINES = {"test_same_kept_tokens_and_greedy_output_as_apply_desap_for_two_image_shapes": [("llava_next", ENGINE)],
           "test_each_image_of_a_two_turn_chat_reads_its_own_turn_where_its_newlines_pass_keep":
           [("llava_next", ENGINE)],
           "test_a_crop_equal_to_its_base_image_keeps_and_merges_the_same_tokens_under_every_method":
           lambda batched: [("llava_next", ENGINE if batched else test_vllm_llava_sweep._engine("llava_next"))]}
# (conftest.py starts them ahead)


def test_same_kept_tokens_and_greedy_output_as_apply_desap_for_two_image_shapes(checkpoints, tmp_path):
    folder = checkpoints["llava_next"]
    # every method, per request; the first prompt on the wide image under three of them: one prompt,
    # one placeholder count, three cache entries
    asked = [(PROMPTS[0], "wide", "desap"), (PROMPTS[1], "odd", "first"), (PROMPTS[2], "wide", "desap"),
             (PROMPTS[0], "wide", "random"), (PROMPTS[1], "odd", "saliency"), (PROMPTS[2], "wide", "similarity"),
             (PROMPTS[0], "wide", "divprune"), (PROMPTS[1], "odd", "largest-norm"),
             (PROMPTS[2], "wide", "dart-input"), (PROMPTS[0], "odd", "cdpruner-lm"),
             (PROMPTS[1], "wide", "visionzip"),
             (PROMPTS[2], "odd", "hiprune")]
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
    # divprune keeps what DivPrune by hand keeps on the rows the language model receives
    (divprune,) = [i for i, (_, _, method) in enumerate(asked) if method == "divprune"]
    (kept,) = expected[divprune]["indices"]
    prompt, image, _ = asked[divprune]
    assert kept == naive_divprune_kept(folder, prompt, checkpoints[image], len(kept))
    (rank,) = got["ranks"]
    assert rank["class"] == "DesapLlavaNextForConditionalGeneration"
    assert sorted({tuple(r.indices.tolist()) for r in rank["history"]}) == sorted({tuple(e["indices"][0]) for e in expected})


def naive_divprune_kept(folder, prompt: str, image_file: str, keep: int) -> list:
    """DivPrune by hand (float64, tests/methods) on the image's packed rows after the projector,
    newlines aside: the rows its authors' code selects on, read off the checkpoint in transformers."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from methods.test_method_builtins import naive_divprune

    model, processor = BUILDERS["llava_next"](0), AutoProcessor.from_pretrained(folder)
    inputs = processor(text=prompt, images=[Image.open(image_file).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        (packed,) = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                   image_sizes=inputs["image_sizes"]).pooler_output
    rows = packed[~(packed == model.model.image_newline).all(dim=1)]
    kept = naive_divprune(rows, keep)
    assert kept is not None, "a near-tie in DivPrune's choice on this image"
    return kept


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


@pytest.mark.parametrize("batched", [False, True], ids=["chunked-alone", "batched"])
def test_a_crop_equal_to_its_base_image_keeps_and_merges_the_same_tokens_under_every_method(batched, checkpoints,
                                                                                           tmp_path):
    """The 56 x 56 image: its one AnyRes crop is the base image, so its tokens come in bit-identical
    pairs (twins). Every method, at three budgets, each request alone and prefilled in chunks of 5
    tokens, or all in one batch (the encoder then prunes several images at once, with other rounding
    than transformers' one at a time), and a second time from the caches, keeps and merges exactly
    what transformers does, and answers the same: twins tie exactly and go to the lower index
    (contract, "Exact ties"), whatever each engine's rounding."""
    folder, image = checkpoints["llava_next"], checkpoints["square"]
    # batched: each method and budget on two prompts, which the encoder prunes together
    asked = [(PROMPTS[(i + j) % len(PROMPTS)], method, keep)
             for i, (method, keep) in enumerate((m, k) for m in METHODS for k in (3, 8, 12))
             for j in range(2 if batched else 1)]
    requests = [(prompt, {"image": image, "mm_processor_kwargs": {"desap": {"method": method, "keep": keep}}})
                for prompt, method, keep in asked]
    engine = ENGINE if batched else test_vllm_llava_sweep._engine("llava_next")
    got = run_engine(tmp_path, folder, engine, requests, rounds=2, one_by_one=not batched)
    expected = [transformers_run("llava_next", folder, prompt, image, {**OPTIONS, "method": method, "keep": keep})
                for prompt, method, keep in asked]
    assert expected[[a[1:] for a in asked].index(("divprune", 3))]["indices"] == [[0]]
    assert_same_as_transformers(got, expected, asked)
