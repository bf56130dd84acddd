"""Tiny random-weight LLaVA models built from configs (no hub): for tests, demos and smoke benches."""
from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration)

IMAGE_TOKEN_ID = 100
PAD, BOS, EOS = 0, 1, 2
QWEN_IMAGE, QWEN_VIDEO = 151, 152


def _configs(image_size: int = 56, patch_size: int = 14, attn_implementation: str = "sdpa"):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS)
    for config in (vision, text):
        config._attn_implementation = attn_implementation
    return vision, text


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", **vision) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 layout: CLIP tower (4x4 = 16 patch tokens + [CLS]), feature layer -2, Llama LM."""
    vision_config, text_config = _configs(attn_implementation=attn_implementation, **vision)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa") -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT layout: AnyRes over 56-pixel crops, grids up to 2 x 2."""
    vision_config, text_config = _configs(attn_implementation=attn_implementation)
    config = LlavaNextConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval()


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa"):
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
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


VIDEO_TOKEN_ID = 101


def tiny_llava_next_video(seed: int = 0, attn_implementation: str = "sdpa"):
    """LLaVA-NeXT-Video layout: frames of 4 x 4 patches pooled 2 x 2 -> 4 tokens per frame."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    vision_config, text_config = _configs(attn_implementation=attn_implementation)
    config = LlavaNextVideoConfig(vision_config=vision_config, text_config=text_config,
                                  image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                                  spatial_pool_mode="average", spatial_pool_stride=2,
                                  image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaNextVideoForConditionalGeneration(config).eval()


def tiny_video_llava(seed: int = 0, attn_implementation: str = "sdpa"):
    """Video-LLaVA layout: frames of 4 x 4 patches, the video path keeps [CLS]: 17 tokens per frame."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    vision_config, text_config = _configs(attn_implementation=attn_implementation)
    config = VideoLlavaConfig(vision_config=vision_config, text_config=text_config,
                              image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return VideoLlavaForConditionalGeneration(config).eval()
