"""The models the app runs, built from configs (no hub, random weights): the tiny ones for tests,
demos and smoke benches, and the 7B shapes the benchmarks time. ``MODELS`` names every one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IMAGE_TOKEN_ID = 100
VIDEO_TOKEN_ID = 101
PAD, BOS, EOS = 0, 1, 2
QWEN_IMAGE, QWEN_VIDEO = 151, 152


# --- tiny models (seeded, on CPU) -----------------------------------------------------------------

def _configs(image_size: int = 56, patch_size: int = 14, attn_implementation: str = "sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS)
    for config in (vision, text):
        config._attn_implementation = attn_implementation
    return vision, text


def _seeded(model_class, config, seed: int, attn_implementation: str) -> nn.Module:
    """``model_class(config)`` with weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).eval()


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", **vision) -> nn.Module:
    """LLaVA-1.5 layout: CLIP tower (4x4 = 16 patch tokens + [CLS]), feature layer -2, Llama LM."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision_config, text_config = _configs(attn_implementation=attn_implementation, **vision)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _seeded(LlavaForConditionalGeneration, config, seed, attn_implementation)


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """LLaVA-NeXT layout: AnyRes over 56-pixel crops, grids up to 2 x 2."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision_config, text_config = _configs(attn_implementation=attn_implementation)
    config = LlavaNextConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
    return _seeded(LlavaNextForConditionalGeneration, config, seed, attn_implementation)


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """Qwen2.5-VL layout: 14-pixel patches, 2 x 2 merge, window attention with one full-attention
    layer (index 1 of 3), multimodal rotary positions. pixel_values are (patches, 3 * 2 * 14 * 14)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3, tokens_per_second=2),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=160, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=153, vision_end_token_id=154)
    return _seeded(Qwen2_5_VLForConditionalGeneration, config, seed, attn_implementation)


def tiny_llava_next_video(seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """LLaVA-NeXT-Video layout: frames of 4 x 4 patches pooled 2 x 2 -> 4 tokens per frame."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    vision_config, text_config = _configs(attn_implementation=attn_implementation)
    config = LlavaNextVideoConfig(vision_config=vision_config, text_config=text_config,
                                  image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                                  spatial_pool_mode="average", spatial_pool_stride=2,
                                  image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
    return _seeded(LlavaNextVideoForConditionalGeneration, config, seed, attn_implementation)


def tiny_video_llava(seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """Video-LLaVA layout: frames of 4 x 4 patches, the video path keeps [CLS]: 17 tokens per frame."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    vision_config, text_config = _configs(attn_implementation=attn_implementation)
    config = VideoLlavaConfig(vision_config=vision_config, text_config=text_config,
                              image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _seeded(VideoLlavaForConditionalGeneration, config, seed, attn_implementation)


# --- the 7B shapes (module structure only: built on the meta device) -----------------------------

def _clip_vicuna(image_size: int):
    """CLIP ViT-L/14 at ``image_size`` and the Vicuna-7B language model of the LLaVA family."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=image_size, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
    return dict(vision_config=vision, text_config=text, vision_feature_layer=-2)


def llava_1_5_7b() -> nn.Module:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(LlavaConfig(**_clip_vicuna(336), image_token_id=32000,
                                                     vision_feature_select_strategy="default"))


def llava_next_7b() -> nn.Module:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration(LlavaNextConfig(
        **_clip_vicuna(336), image_token_id=32000, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]))


def llava_next_video_7b() -> nn.Module:
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    return LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(
        **_clip_vicuna(336), image_token_id=32001, video_token_id=32000, spatial_pool_stride=2,
        spatial_pool_mode="average"))


def video_llava_7b() -> nn.Module:
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    return VideoLlavaForConditionalGeneration(VideoLlavaConfig(**_clip_vicuna(224), image_token_index=32000,
                                                               video_token_index=32001))


def qwen2_5_vl_7b() -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2),
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653))


# --- the table --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    family: str                  # "llava", "llava_next", "qwen2_5_vl", "llava_next_video" or "video_llava"
    build: Callable[[], nn.Module]
    tiny: bool                   # tiny: seeded weights on CPU; else a 7B shape built on the meta device


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("llava", tiny_llava, True),
    "llava-1.5-7b": ModelSpec("llava", llava_1_5_7b, False),
    "llava-next-7b": ModelSpec("llava_next", llava_next_7b, False),
    "tiny-qwen2.5-vl": ModelSpec("qwen2_5_vl", tiny_qwen2_5_vl, True),
    "qwen2.5-vl-7b": ModelSpec("qwen2_5_vl", qwen2_5_vl_7b, False),
    "tiny-llava-next-video": ModelSpec("llava_next_video", tiny_llava_next_video, True),
    "llava-next-video-7b": ModelSpec("llava_next_video", llava_next_video_7b, False),
    "tiny-video-llava": ModelSpec("video_llava", tiny_video_llava, True),
    "video-llava-7b": ModelSpec("video_llava", video_llava_7b, False),
}


def build_model(name: str, device: str, dtype: torch.dtype) -> nn.Module:
    """``MODELS[name]`` on ``device`` in ``dtype``, in eval mode. The 7B shapes get weights drawn from
    N(0, 0.02) on the device (never all zeros), or none on ``meta``: they serve for timing only."""
    spec = MODELS[name]
    if spec.tiny:
        return spec.build().to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = spec.build().to(dtype=dtype)
    if device != "meta":
        model = model.to_empty(device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()
