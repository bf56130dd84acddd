"""DeSAP on Qwen2.5-VL videos in vLLM, against transformers with apply_desap on the same checkpoint:
one budget per video across all its frames (``keep`` means at most: a short video passes whole),
the kept tokens at their own (t, h, w) positions with the video's time scale, and the text after a
video where transformers puts it (past the larger of its height and width; vLLM's own Qwen2.5-VL
also counts its time). A video alone, a video and an image in one prompt, a short video; in one
batch twice (the second time from vLLM's processor cache), and prefilled in chunks of 5 tokens;
each request under its own pruning method (``engines.METHODS`` in turn)."""
import pytest

from engines import (METHODS, QWEN_IMAGE, QWEN_KEEP_6, assert_batched_positions, assert_same_answers,
                     assert_same_as_transformers, run_engine, save_video, spread_methods, transformers_run)

OPTIONS = {"keep": 6}
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = 151, 152
PROMPTS = (f"USER: {QWEN_VIDEO} what is the color of the sky ? ASSISTANT:",
           f"USER: {QWEN_VIDEO} {QWEN_IMAGE} read the text on the sign ASSISTANT:",
           f"USER: {QWEN_VIDEO} how many people are there ? ASSISTANT:")
CHUNKED = {"hf_overrides": {"desap": OPTIONS}, "limit_mm_per_prompt": {"image": 1, "video": 1},
           "enable_chunked_prefill": True, "max_num_batched_tokens": 5, "max_num_seqs": 2}
assert QWEN_KEEP_6["hf_overrides"]["desap"] == OPTIONS
# the engines each test runs its job on (conftest.py starts them ahead; the first is shared)
ENGINES = {"test_videos_get_apply_desaps_tokens_positions_and_output_in_one_batch_and_from_the_cache":
           [("qwen2_5_vl", QWEN_KEEP_6)],
           "test_videos_prefilled_in_chunks_run_at_transformers_positions": [("qwen2_5_vl", CHUNKED)],
           "test_a_static_video_keeps_and_merges_the_same_tokens_under_every_method": [("qwen2_5_vl", CHUNKED)]}


@pytest.fixture(scope="module")
def cases(checkpoints, tmp_path_factory):
    """The requests and what apply_desap does with each. Videos (frames of two patches in time):
    6 frames 112 x 56 at 1 fps, 3 x 2 x 4 = 24 tokens at times 0, 4, 8 (past its extent, 4);
    4 frames 112 x 112 at 2 fps, 2 x 4 x 4 = 32 tokens; 2 frames 56 x 56, 4 tokens (under keep)."""
    videos = tmp_path_factory.mktemp("videos")
    folder = checkpoints["qwen2_5_vl"]
    media = [(PROMPTS[0], {"video": save_video(videos, "wide", 6, 112, 56, 11, fps=1.0)}),
             (PROMPTS[1], {"video": save_video(videos, "square", 4, 112, 112, 12), "image": checkpoints["large"]}),
             (PROMPTS[2], {"video": save_video(videos, "short", 2, 56, 56, 13)})]
    # each request its own method (engines.METHODS in turn): the media again and again, so that every
    # method prunes a video (the same video under several methods: one cache entry each)
    asked = spread_methods([media[i % len(media)] for i in range(len(METHODS))])
    assert {method for _, _, method in asked} == set(METHODS)
    return folder, [(p, m) for p, m, _ in asked], [
        transformers_run("qwen2_5_vl", folder, p, m, {**OPTIONS, "method": method}) for p, m, method in asked]


def _columns(forwards: list) -> list:
    return [column for positions in forwards for column in zip(*positions)]


def test_videos_get_apply_desaps_tokens_positions_and_output_in_one_batch_and_from_the_cache(cases, tmp_path):
    folder, requests, expected = cases
    counts = [(want["prompt_ids"].count(IMAGE_TOKEN), want["prompt_ids"].count(VIDEO_TOKEN)) for want in expected]
    # one budget per video; the short one whole
    assert counts == [[(0, 6), (6, 6), (0, 4)][i % 3] for i in range(len(expected))]
    assert expected[2]["indices"] == [[0, 1, 2, 3]]
    ids, (times, *_) = expected[0]["prompt_ids"], expected[0]["positions"][-3:]
    video = [i for i, t in enumerate(ids) if t == VIDEO_TOKEN]
    # the text after the first video starts past its extent (4), not past its time (0, 4, 8)
    assert times[video[-1] + 1] == times[video[0] - 1] + 1 + 4

    got = run_engine(tmp_path, folder, QWEN_KEEP_6, requests, rounds=2, positions=True)
    assert_same_answers(got, expected, "DesapQwen2_5_VLForConditionalGeneration")
    for round_ in got["positions"]:   # the second round's videos come from the processor cache
        assert_batched_positions(round_, expected)


def test_videos_prefilled_in_chunks_run_at_transformers_positions(cases, tmp_path):
    folder, requests, expected = cases
    got = run_engine(tmp_path, folder, CHUNKED, requests, positions=True, one_by_one=True)
    assert_same_answers(got, expected, "DesapQwen2_5_VLForConditionalGeneration")
    inside = 0
    for out, forwards, want in zip(got["rounds"][0], got["positions"][0], expected):
        rows = want["positions"][-3:]
        top = max(map(max, rows))
        decode = [(top + 1 + i,) * 3 for i in range(len(out["output_token_ids"]) - 1)]
        assert _columns(forwards) == list(zip(*rows)) + decode
        ends = [sum(len(f[0]) for f in forwards[:i + 1]) for i in range(len(forwards))]
        ids = want["prompt_ids"]
        inside += sum(0 < end < len(ids) and ids[end - 1] == ids[end] == VIDEO_TOKEN for end in ends)
    assert inside > 0   # some chunk ended inside a video's placeholders


def test_processor_gives_each_video_its_budget_and_text_and_a_hash_per_prompt(cases):
    from desap_ops.integrations.vllm import register

    register()
    import numpy as np
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    folder, requests, expected = cases
    config = ModelConfig(model=str(folder), hf_overrides={"desap": OPTIONS}, max_model_len=512,
                         limit_mm_per_prompt={"image": 1, "video": 1})
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    video = requests[0][1]["video"]
    data = (np.load(video["frames"]), video["metadata"])

    def process(prompt):
        return processor(prompt, processor.info.parse_mm_data({"video": data}))

    first, other = process(PROMPTS[0]), process(PROMPTS[2])
    assert first["prompt_token_ids"] == expected[0]["prompt_ids"]
    (item,) = first["mm_kwargs"]["video"]
    words = processor.info.get_tokenizer().convert_ids_to_tokens(item["desap_video_text_ids"].data.tolist())
    assert words == "what is the color of the sky ? ASSISTANT:".split()
    assert first["mm_hashes"]["video"] != other["mm_hashes"]["video"]   # one video, two prompts
    assert process(PROMPTS[0])["mm_hashes"] == first["mm_hashes"]


def test_a_static_video_keeps_and_merges_the_same_tokens_under_every_method(checkpoints, tmp_path):
    """A video whose frames are all one picture: each temporal patch makes the same tokens, so every
    token has bit-identical twins in the other patches. Every method, prefilled in chunks and a
    second time from the prefix cache, keeps and merges exactly what transformers does, and answers
    the same: twins tie exactly and go to the lower index (contract, "Exact ties")."""
    import numpy as np

    folder = checkpoints["qwen2_5_vl"]
    video = save_video(tmp_path, "static", 6, 112, 56, 14, fps=1.0)    # 3 temporal patches of 2 x 4 tokens
    frames = np.load(video["frames"])
    np.save(video["frames"], np.repeat(frames[:1], len(frames), axis=0))
    asked = [(PROMPTS[2 * (i % 2)], method, keep)   # the prompts with a video alone
             for i, (method, keep) in enumerate((m, k) for m in METHODS for k in (3, 6))]
    requests = [(prompt, {"video": video, "mm_processor_kwargs": {"desap": {"method": method, "keep": keep}}})
                for prompt, method, keep in asked]
    got = run_engine(tmp_path, folder, CHUNKED, requests, rounds=2, one_by_one=True)
    expected = [transformers_run("qwen2_5_vl", folder, prompt, {"video": video}, {**OPTIONS, "method": method, "keep": keep})
                for prompt, method, keep in asked]
    assert_same_as_transformers(got, expected, asked)
    # the twins: a token kept only where no earlier identical one was dropped, for the methods that score
    for want, (_, method, _) in zip(expected, asked):
        if method in ("desap", "divprune", "saliency", "similarity"):
            (indices,) = want["indices"]
            per_patch = 8
            assert all(i < per_patch or i - per_patch in indices for i in indices), (method, indices)
