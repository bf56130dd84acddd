"""No request reads past the rotary cache. A pruned prompt is short, but its kept tokens keep their
original M-RoPE positions, which run far past its length: on a Qwen3-VL checkpoint of 64 positions
(``max_position_embeddings``), images larger than the checkpoint's default ``max_pixels`` and a
video are served at transformers' positions past 64 (DeSAP's Qwen models get vLLM's rotary cache
of 4 x 64 positions), and a prompt that would still pass it is refused by the processor with a
ValueError naming the limit, while the engine goes on serving."""
import pytest
from PIL import Image

from engines import (QWEN_IMAGE, QWEN_VIDEO, assert_alone_positions, qwen3_expected, run_engine, save_image,
                     save_video)
from in_process import process

KIND = "qwen3_vl_64"
OPTIONS = {"keep": 2}
ENGINE = {"hf_overrides": {"desap": OPTIONS}, "max_model_len": 64, "limit_mm_per_prompt": {"image": 2, "video": 1}}
ENGINES = {"test_prompts_past_the_rotary_cache_are_refused_and_the_rest_served_at_transformers_positions":
           [(KIND, ENGINE)]}
TWO_IMAGES = f"USER: {QWEN_IMAGE} {QWEN_IMAGE} what is the color of the sky ? ASSISTANT:"
VIDEO = f"USER: {QWEN_VIDEO} how many people are there ? ASSISTANT:"


def test_prompts_past_the_rotary_cache_are_refused_and_the_rest_served_at_transformers_positions(checkpoints,
                                                                                               tmp_path):
    folder = checkpoints[KIND]
    # 2048 x 32 pixels: 1 x 64 tokens, 4 times the checkpoint's default max_pixels (16384)
    wide = [save_image(tmp_path, f"wide{i}", 2048, 32, 40 + i) for i in range(2)]
    wider = [save_image(tmp_path, f"wider{i}", 4096, 64, 42 + i) for i in range(2)]   # 2 x 128 tokens each
    served = [(TWO_IMAGES, {"image": wide, "mm_processor_kwargs": {"max_pixels": 65536}}),
              (VIDEO, {"video": save_video(tmp_path, "clip", 4, 2048, 32, 44)})]   # 2 frame groups of 1 x 64
    refused = [(TWO_IMAGES, {"image": wider, "mm_processor_kwargs": {"max_pixels": 262144}}),
               (VIDEO, {"video": save_video(tmp_path, "long", 16, 2048, 32, 45)})]   # 8 frame groups, 1 x 32 each
    requests = [served[0], refused[0], served[1], refused[1], served[0]]   # the engine serves after each refusal
    expected = qwen3_expected(KIND, folder, served, OPTIONS)
    assert all(max(map(max, want["positions"])) > 64 for want in expected)   # past max_position_embeddings

    got = run_engine(tmp_path, folder, ENGINE, requests, positions=True, one_by_one=True, refusals=True)
    outputs, forwards = got["rounds"][0], got["positions"][0]
    for i in (1, 3):
        assert outputs[i]["refused"] == "ValueError", outputs[i]   # the processor's: a 400, not the engine's end
        message = outputs[i]["message"]
        assert "past the model's 256 (max_position_embeddings 64 x 4)" in message and not forwards[i], message
    for i, want in zip((0, 2, 4), (expected[0], expected[1], expected[0])):
        out = outputs[i]
        assert out["prompt_token_ids"] == want["prompt_ids"] and out["output_token_ids"] == want["output_ids"], i
        assert_alone_positions(out, forwards[i], want)
    (rank,) = got["ranks"]
    assert rank["class"] == "DesapQwen3VLForConditionalGeneration"
    # the images again: from the processor and encoder caches (the processor checks them from its
    # summaries: vLLM's processor cache gives their fields back only once), pruned once
    assert sorted(tuple(r.indices.tolist()) for r in rank["history"]) == sorted(
        tuple(k) for want in expected for k in want["indices"])


def test_items_from_the_processor_cache_are_checked_from_their_summaries_or_processed_again(checkpoints, tmp_path):
    """vLLM's processor cache (the LRU sender cache an engine's front end runs) gives an item's fields
    back only the first time: the processor checks an item it has seen from its summary, and one
    whose summary it no longer holds by processing the request again without the cache."""
    from vllm.config import ModelConfig, VllmConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.cache import processor_cache_from_config

    from desap_ops.integrations.vllm import register

    register()
    config = VllmConfig(model_config=ModelConfig(model=str(checkpoints[KIND]), hf_overrides={"desap": OPTIONS},
                                                 max_model_len=64, limit_mm_per_prompt={"image": 2}))
    processor = MULTIMODAL_REGISTRY.create_processor(config.model_config)
    cache = processor_cache_from_config(config)
    assert type(cache).__name__ == "LruKeyReplicatedSenderCache"
    images = {size: [Image.open(save_image(tmp_path, f"{size}{i}", *size, 50 + i)).convert("RGB") for i in range(2)]
              for size in ((2048, 32), (4096, 64))}
    served = (TWO_IMAGES, {"image": images[2048, 32]}, {"max_pixels": 65536})
    refused = (TWO_IMAGES, {"image": images[4096, 64]}, {"max_pixels": 262144})

    first = process(processor, *served, cache=cache)
    assert all(item is not None for item in first["mm_kwargs"]["image"])
    for forget in (False, True):
        if forget:
            processor.desap_summaries.clear()   # as if evicted: processed again, without the cache
        again = process(processor, *served, cache=cache)
        assert again["prompt_token_ids"] == first["prompt_token_ids"]
        assert all((item is not None) == forget for item in again["mm_kwargs"]["image"])
    with pytest.raises(ValueError, match="past the model's 256"):
        process(processor, *refused, cache=cache)
    for forget in (False, True):   # refused again from the cache: from its summary, then processed again
        if forget:
            processor.desap_summaries.clear()
        with pytest.raises(ValueError, match="past the model's 256"):
            process(processor, *refused, cache=cache)
