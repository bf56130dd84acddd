"""DeSAP in vLLM's Qwen3-VL (dense and MoE), against transformers with apply_desap on the same
checkpoint: the kept tokens (DeepStack levels with them), the prompt, the rotary positions of every
prompt token and greedy output, for two prompts on one image, a video beside an image (and both again
under every other pruning method, per request), and under
tensor parallelism 2 (the MoE variant); vLLM's own class without ``desap``; the start-up refusals.

A Qwen3-VL video is, per frame, a timestamp text, a start marker, the frame's tokens and an end
marker. Which frames keep how many tokens is known only after the encoder, so in vLLM the video's
whole span is ``<|video_pad|>`` placeholders (its length that of transformers' pruned span) whose
embeddings the model writes: the prompt ids match transformers' everywhere else."""
import pytest

from engines import (METHODS, QWEN_IMAGE, QWEN_PROMPTS, QWEN_VIDEO, assert_alone_positions, assert_batched_positions,
                     assert_same_answers, qwen3_expected, qwen3_media, qwen3_requests, qwen3_video_span, rendered_chat,
                     run_engine, transformers_run, with_method)

OPTIONS = {"keep": 6}
VIDEO_TOKEN = 152
LIMITS = {"limit_mm_per_prompt": {"image": 1, "video": 1}}
ENGINE = {"hf_overrides": {"desap": OPTIONS}, **LIMITS}
CLASS = "DesapQwen3VLForConditionalGeneration"
BLOCK = 32   # prefix-cache block (the CPU attention takes multiples of 32)
CHUNKED = {**ENGINE, "block_size": BLOCK, "enable_chunked_prefill": True, "max_num_batched_tokens": 5,
           "max_num_seqs": 2}
TP_OPTIONS = {"keep": 5, "task_ratio": "auto", "text_budget": 3}
# the engines each test runs its job on (conftest.py starts them ahead)
ENGINES = {
    "test_images_and_videos_get_apply_desaps_tokens_positions_and_output_in_a_batch_and_from_the_cache":
        [("qwen3_vl", ENGINE)],
    "test_chunked_and_prefix_cached_prefills_run_at_transformers_positions": [("qwen3_vl", CHUNKED)],
    "test_moe_under_tensor_parallelism_keeps_apply_desaps_tokens_on_every_rank":
        [("qwen3_vl_moe", {**ENGINE, "hf_overrides": {"desap": TP_OPTIONS}}, 2)],
    "test_without_the_desap_key_vllm_runs_its_own_qwen3_vl_unchanged": [("qwen3_vl", LIMITS)],
    "test_a_videos_frame_timestamps_are_no_items_text": [("qwen3_vl", ENGINE)],
}


@pytest.fixture(scope="module")
def media(checkpoints, tmp_path_factory):
    """The dense and MoE checkpoints (the session's) and the media (``engines.qwen3_media``)."""
    return {"qwen3_vl": checkpoints["qwen3_vl"], "qwen3_vl_moe": checkpoints["qwen3_vl_moe"],
            **qwen3_media(tmp_path_factory.mktemp("qwen3_vl"))}


def test_images_and_videos_get_apply_desaps_tokens_positions_and_output_in_a_batch_and_from_the_cache(media,
                                                                                                      tmp_path):
    folder, base = media["qwen3_vl"], qwen3_requests(media)
    # then the other methods, per request, on an image and on a video beside an image in turn
    methods = [None] * len(base) + list(METHODS[1:])
    requests = base + [(prompt, with_method(item, method))
                       for (prompt, item), method in zip(([base[0], base[2]] * len(METHODS))[:len(METHODS) - 1],
                                                         METHODS[1:], strict=True)]
    expected = qwen3_expected("qwen3_vl", folder, requests, OPTIONS, methods)
    assert expected[0]["indices"] != expected[1]["indices"]   # one image, two prompts, two choices
    ids = expected[2]["transformers_ids"]
    span = qwen3_video_span(ids)
    frames = [ids[i + 1:].index(154) for i in span if ids[i] == 153]   # kept tokens per frame
    assert len(frames) == 3 and sum(frames) == OPTIONS["keep"]   # one budget for the clip
    assert ids[span.start:span.stop].count(VIDEO_TOKEN) == OPTIONS["keep"]
    assert expected[3]["indices"] == [[0, 1, 2, 3]]   # under keep: whole

    got = run_engine(tmp_path, folder, ENGINE, requests, rounds=2, positions=True)
    assert_same_answers(got, expected, CLASS)   # the second round from the processor and prefix caches
    for round_ in got["positions"]:
        assert_batched_positions(round_, expected)


def test_a_videos_frame_timestamps_are_no_items_text(media, tmp_path):
    """A chat turn holding a 3-group clip and an image and no words, and one holding the clip and
    a question: the timestamps transformers' processor writes before each frame group are no
    item's text, so each item reads what vLLM reads (nothing, then the question's 6 words) and
    keeps the same tokens."""
    folder = media["qwen3_vl"]
    silent = rendered_chat(folder, [{"role": "user", "content": [{"type": "video_url"}, {"type": "image_url"}]}])
    asked = rendered_chat(folder, [{"role": "user", "content": [
        {"type": "video_url"}, {"type": "text", "text": "what happens in this clip ?"}]}])
    requests = [(silent, {"video": media["wide"], "image": media["large2"]}), (asked, {"video": media["wide"]})]
    expected = qwen3_expected("qwen3_vl", folder, requests, OPTIONS)
    assert [want["text_tokens"] for want in expected] == [[0, 0], [6]]   # the image, then the video
    got = run_engine(tmp_path, folder, ENGINE, requests)
    assert_same_answers(got, expected, CLASS)
    (rank,) = got["ranks"]
    assert (sorted((tuple(r.indices.tolist()), r.text_tokens) for r in rank["history"])
            == sorted((tuple(k), n) for want in expected for k, n in zip(want["indices"], want["text_tokens"])))


def test_chunked_and_prefix_cached_prefills_run_at_transformers_positions(media, tmp_path):
    """Prefill in chunks of 5 tokens, each request alone, every prompt twice (the second time from
    its blocks in the prefix cache): chunks end inside a video's span, whose rows the model writes,
    and every prompt still runs at transformers' positions with its tokens and output."""
    folder = media["qwen3_vl"]
    requests = qwen3_requests(media)[2:] + [
        (f"USER: w60 w61 w62 {QWEN_VIDEO} w63 {QWEN_IMAGE} how many people are there ? ASSISTANT:",
         {"video": media["wide"], "image": media["large"]})]
    expected = qwen3_expected("qwen3_vl", folder, requests, OPTIONS)
    got = run_engine(tmp_path, folder, CHUNKED, requests, rounds=2, positions=True, one_by_one=True)
    assert_same_answers(got, expected, CLASS)
    inside = 0
    for outputs, forwards in zip(got["rounds"], got["positions"]):
        for out, steps, want in zip(outputs, forwards, expected):
            span = qwen3_video_span(want["transformers_ids"])
            inside += sum(span.start < end < span.stop for end in assert_alone_positions(out, steps, want))
    assert inside > 0
    assert max(out["num_cached_tokens"] for out in got["rounds"][1]) >= BLOCK   # the second round reused blocks


def test_moe_under_tensor_parallelism_keeps_apply_desaps_tokens_on_every_rank(media, tmp_path):
    folder = media["qwen3_vl_moe"]
    options = TP_OPTIONS
    requests = [(QWEN_PROMPTS[0], media["large"]), qwen3_requests(media)[2]]
    expected = qwen3_expected("qwen3_vl_moe", folder, requests, options)
    got = run_engine(tmp_path, folder, {**ENGINE, "hf_overrides": {"desap": options}}, requests, tp=2)
    first, second = got["ranks"]   # each rank holds 2 of the tower's 4 heads
    assert first["class"] == "DesapQwen3VLMoeForConditionalGeneration"
    assert first["history"] == second["history"] and len(first["history"]) == 3
    assert sorted(tuple(r.indices.tolist()) for r in first["history"]) == sorted(
        tuple(k) for want in expected for k in want["indices"])
    for out, want in zip(got["rounds"][0], expected):
        assert out["prompt_token_ids"] == want["prompt_ids"]
        assert out["output_token_ids"] == want["output_ids"]


def test_without_the_desap_key_vllm_runs_its_own_qwen3_vl_unchanged(media, tmp_path):
    folder = media["qwen3_vl"]
    requests = qwen3_requests(media)[1:3]
    got = run_engine(tmp_path, folder, LIMITS, requests)
    (rank,) = got["ranks"]
    assert rank["class"] == "Qwen3VLForConditionalGeneration" and rank["history"] == []
    for out, (prompt, item) in zip(got["rounds"][0], requests):
        want = transformers_run("qwen3_vl", folder, prompt, item)
        assert out["prompt_token_ids"] == want["prompt_ids"]   # every token, every timestamp
        assert out["output_token_ids"] == want["output_ids"]


def _speculative(config, parallel):
    from vllm.config import SpeculativeConfig

    return {"speculative_config": SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_max=2,
                                                    target_model_config=config, target_parallel_config=parallel)}


def _lora(config, parallel):
    from vllm.config import LoRAConfig

    return {"lora_config": LoRAConfig(enable_tower_connector_lora=True)}


@pytest.mark.parametrize("model, parallel, more, message", [
    ({"video_pruning_rate": 0.5}, {}, None, "does not run together with video_pruning_rate"),
    ({}, {"pipeline_parallel_size": 2}, None, "pipeline_parallel_size must be 1"),
    ({"mm_encoder_tp_mode": "data"}, {}, None, 'mm_encoder_tp_mode="data"'),
    ({}, {}, _speculative, r"speculative decoding \(speculative_config\) is not supported"),
    ({}, {}, _lora, r"\(enable_tower_connector_lora\) is not supported"),
    ({"enable_prompt_embeds": True}, {}, None, "enable_prompt_embeds is not supported"),
])
def test_engine_settings_desap_cannot_run_are_refused_when_vllm_builds_the_config(media, model, parallel, more,
                                                                                  message):
    from vllm.config import ModelConfig, ParallelConfig, VllmConfig

    from desap_ops.integrations.vllm import register

    register()   # as vLLM's plugin loading does in an engine's process

    def build(desap):
        overrides = {"desap": OPTIONS} if desap else {}
        config = ModelConfig(model=str(media["qwen3_vl"]), hf_overrides=overrides, max_model_len=512, **model)
        layout = ParallelConfig(**parallel)
        return VllmConfig(model_config=config, parallel_config=layout, **(more(config, layout) if more else {}))

    build(desap=False)   # vLLM alone accepts the setting
    with pytest.raises(ValueError, match=message):
        build(desap=True)
