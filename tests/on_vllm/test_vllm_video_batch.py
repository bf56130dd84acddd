"""Videos of different lengths in one ``embed_multimodal`` call. vLLM's V2 runner batches every item
of one modality the scheduler brings together, so one call can hold videos of different frame
counts (and frame rates): each must keep the tokens, embeddings and positions it keeps alone. The
model is built in this process (``in_process``), its inputs batched by vLLM's own code."""
import numpy as np
import pytest
import torch

from engines import QWEN_VIDEO
from in_process import batched, desap_model, processed_items

OPTIONS = {"keep": 5}


def _video(frames: int, width: int, height: int, seed: int, fps: float):
    pixels = (np.random.default_rng(seed).random((frames, height, width, 3)) * 255).astype("uint8")
    return pixels, {"fps": fps, "duration": frames / fps, "total_num_frames": frames,
                    "frames_indices": list(range(frames)), "video_backend": "opencv"}


@pytest.mark.parametrize("kind, sizes", [("qwen2_5_vl", (112, 56)), ("qwen3_vl", (128, 64))])
def test_two_videos_of_different_lengths_in_one_call_keep_what_each_keeps_alone(checkpoints, kind, sizes):
    from desap_ops.integrations.vllm.mrope import CHANNELS, decode_fields

    width, height = sizes
    # 4 frames at 2 fps and 8 at 1 fps: 2 and 4 frame groups, each its own time scale
    videos = [_video(4, width, height, 1, 2.0), _video(8, height, height, 2, 1.0)]
    prompt = f"USER: {QWEN_VIDEO} w60 {QWEN_VIDEO} what happens in this clip ? ASSISTANT:"
    with desap_model(checkpoints[kind], OPTIONS, limit_mm_per_prompt={"video": 2}) as (config, model):
        items = processed_items(config.model_config, prompt, {"video": videos})["video"]
        grids = [item["video_grid_thw"].data.tolist() for item in items]
        assert grids[0][0] != grids[1][0]   # different frame counts

        calls = []
        hook = model.visual.register_forward_pre_hook(lambda module, args: calls.append(1))
        together = model.embed_multimodal(**batched("video", items))
        assert len(calls) == 1   # both videos in one tower call
        history = list(model.desap_history)
        alone = [model.embed_multimodal(**batched("video", [item]))[0] for item in items]
        hook.remove()
        alone_history = list(model.desap_history)[len(history):]

    assert len(together) == len(alone) == 2
    for mixed, single in zip(together, alone, strict=True):
        assert mixed.shape == single.shape
        assert torch.equal(decode_fields(mixed[:, -CHANNELS:]), decode_fields(single[:, -CHANNELS:]))   # positions
        torch.testing.assert_close(mixed[:, :-CHANNELS], single[:, :-CHANNELS], rtol=1e-5, atol=1e-5)   # float32
    assert [r.indices.tolist() for r in history] == [r.indices.tolist() for r in alone_history]
    assert all(len(r.indices) == OPTIONS["keep"] for r in history)
