"""``desap bench e2e`` for Qwen2.5-VL and the video models (LLaVA-NeXT-Video, Video-LLaVA).

Same three prefills and the same JSON as :mod:`desap_ops.e2e`: the full model, the model with
``apply_desap(keep=K)``, and the ideal (the model fed K tokens per image or video with no pruning
work: its own features cut to the first K, and for Qwen2.5-VL those tokens' original positions,
computed before timing). FLOPs are counted on the real forward passes, so these models take
``--device cpu`` or ``cuda`` (not meta: the prompt surgery reads token ids).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import benchmarking
from .integrations import apply_desap, remove_desap
from .integrations.sequence import first_placeholders, shrink_placeholders
from .cli.models import tiny_llava_next_video, tiny_qwen2_5_vl, tiny_video_llava

MODELS = ("tiny-qwen2.5-vl", "qwen2.5-vl-7b", "tiny-llava-next-video", "llava-next-video-7b",
          "tiny-video-llava", "video-llava-7b")
TEXT_TOKENS = 32
FRAMES = {"tiny": 3, "real": 8}


def _real_model(name: str, dtype: torch.dtype):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, VideoLlavaConfig, VideoLlavaForConditionalGeneration)

    if name == "qwen2.5-vl-7b":
        config = Qwen2_5_VLConfig(
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2),
            text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064, rope_scaling={"type": "mrope",
                                                                                    "mrope_section": [16, 24, 24]}),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        size = 336 if name == "llava-next-video-7b" else 224
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=size, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
        if name == "llava-next-video-7b":
            config = LlavaNextVideoConfig(vision_config=vision, text_config=text, image_token_id=32001,
                                          video_token_id=32000, vision_feature_layer=-2, spatial_pool_stride=2,
                                          spatial_pool_mode="average")
            cls = LlavaNextVideoForConditionalGeneration
        else:
            config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                                      video_token_index=32001, vision_feature_layer=-2)
            cls = VideoLlavaForConditionalGeneration
    with torch.device("meta"):
        return cls(config).to(dtype=dtype)


def build_model(name: str, device: str, dtype: torch.dtype):
    tiny = {"tiny-qwen2.5-vl": tiny_qwen2_5_vl, "tiny-llava-next-video": tiny_llava_next_video,
            "tiny-video-llava": tiny_video_llava}
    if name in tiny:
        return tiny[name]().to(device=device, dtype=dtype)
    model = _real_model(name, dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def make_batch(model, name: str, batch: int, device: str, dtype: torch.dtype):
    """(inputs, tokens per image or video, placeholder id, features method name)."""
    gen = torch.Generator().manual_seed(0)
    config = model.config
    vocab = min(1000, config.text_config.vocab_size)
    text = torch.randint(3, vocab, (batch, TEXT_TOKENS), generator=gen)
    if "qwen" in name:
        side = 8 if name.startswith("tiny") else 48          # 672 x 672 pixels for the 7B shape
        tokens = side * side // 4
        token_id = config.image_token_id
        text[(text == token_id) | (text >= 150)] = 3
        ids = torch.cat([torch.ones(batch, 1, dtype=torch.long),
                         torch.full((batch, 1), config.vision_start_token_id),
                         torch.full((batch, tokens), token_id),
                         torch.full((batch, 1), config.vision_end_token_id), text], dim=1)
        pixels = torch.randn(batch * side * side, 3 * 2 * 14 * 14, generator=gen)
        inputs = dict(input_ids=ids, pixel_values=pixels.to(dtype), image_grid_thw=torch.tensor([[1, side, side]] * batch),
                      mm_token_type_ids=(ids == token_id).int())
        return {k: v.to(device) for k, v in inputs.items()}, tokens, token_id, "get_image_features"
    frames = FRAMES["tiny" if name.startswith("tiny") else "real"]
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    per_frame = (side // config.spatial_pool_stride) ** 2 if "next" in name else side * side + 1
    tokens = frames * per_frame
    token_id = config.video_token_id
    text[text == token_id] = 3
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, tokens), token_id), text], dim=1)
    videos = torch.randn(batch, frames, 3, vision.image_size, vision.image_size, generator=gen)
    inputs = dict(input_ids=ids, pixel_values_videos=videos.to(dtype))
    return {k: v.to(device) for k, v in inputs.items()}, tokens, token_id, "get_video_features"


@contextmanager
def ideal_inputs(model, inputs: dict, tokens: int, keep: int, token_id: int, method: str):
    """The ideal call's inputs, with the model's own features cut to the first ``keep``."""
    inner = model.model
    original = getattr(inner, method)

    def cut(*args, **kwargs):
        out = original(*args, **kwargs)
        pooled = out.pooler_output
        if isinstance(pooled, (list, tuple)):
            out.pooler_output = [f[:keep] for f in pooled]
        else:  # per video (Video-LLaVA returns one row per frame)
            out.pooler_output = pooled.reshape(inputs["input_ids"].shape[0], -1, pooled.shape[-1])[:, :keep]
        return out

    ids = inputs["input_ids"]
    flags = first_placeholders([tokens] * ids.shape[0], keep, ids.device)
    positions = None
    if "mm_token_type_ids" in inputs:   # Qwen2.5-VL: the first K tokens keep their original positions
        positions, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"])
    shrunk = shrink_placeholders(flags, token_id, 0, ids, None, None, positions, inputs.get("mm_token_type_ids"))
    short = {**inputs, "input_ids": shrunk["input_ids"]}
    if positions is not None:
        short.update(position_ids=shrunk["position_ids"], mm_token_type_ids=shrunk["token_types"])
    setattr(inner, method, cut)
    try:
        yield short
    finally:
        delattr(inner, method)


def _flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def run(name: str, keeps: Optional[list], device: str, dtype_name: str, batch: int,
        progress: Callable[[str], None]) -> dict:
    from .__main__ import UsageError
    from .e2e import DTYPES

    if device == "meta":
        raise UsageError(f"--device meta counts FLOPs for llava-1.5-7b and llava-next-7b only; {name} "
                         "counts them on its real forward passes: use --device cpu or cuda")
    dtype = DTYPES[dtype_name]
    progress(f"building {name} on {device} ({dtype_name}, random weights)")
    model = build_model(name, device, dtype)
    inputs, tokens, token_id, method = make_batch(model, name, batch, device, dtype)
    keeps = keeps or sorted({tokens, tokens // 3, tokens // 4, tokens // 9} - {0}, reverse=True)
    if any(not 1 <= k <= tokens for k in keeps):
        raise UsageError(f"--keep values must lie in [1, {tokens}] for {name}, got {keeps}")
    result = {"environment": benchmarking.environment(device), "model": name, "weights": "random (timing only)",
              "device": device, "dtype": dtype_name, "batch": batch, "image_tokens": tokens,
              "text_tokens": TEXT_TOKENS, "rows": []}
    call = lambda args: model(**args, logits_to_keep=1)  # noqa: E731
    with torch.no_grad():
        progress("full model")
        full_ms = benchmarking.time_median_ms(lambda: call(inputs), device)
        full_flops = _flops(lambda: call(inputs))
        for keep in keeps:
            progress(f"keep {keep}")
            apply_desap(model, keep=keep)
            desap_ms = benchmarking.time_median_ms(lambda: call(inputs), device)
            desap_flops = _flops(lambda: call(inputs))
            remove_desap(model)
            with ideal_inputs(model, inputs, tokens, keep, token_id, method) as short:
                ideal_ms = benchmarking.time_median_ms(lambda: call(short), device)
                ideal_flops = _flops(lambda: call(short))
            result["rows"].append({
                "keep": keep, "flops": {"full": full_flops, "desap": desap_flops, "ideal": ideal_flops},
                "flops_reduction": full_flops / desap_flops, "full_ms": full_ms, "desap_ms": desap_ms,
                "ideal_ms": ideal_ms, "speedup": full_ms / desap_ms, "ideal_speedup": full_ms / ideal_ms,
                "overhead_ms": desap_ms - ideal_ms, "overhead_share": (desap_ms - ideal_ms) / desap_ms,
                "share_of_ideal_speedup": (full_ms / desap_ms) / (full_ms / ideal_ms)})
    return result
