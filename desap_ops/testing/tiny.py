"""Tiny models for the tests and the smoke benches: every supported family's layout at a few
thousand parameters, built from configs (no hub), weights drawn after ``torch.manual_seed(seed)``,
in eval mode on the CPU. Their token ids are the module's constants."""
from __future__ import annotations

import torch
from torch import nn

IMAGE_TOKEN_ID = 100
VIDEO_TOKEN_ID = 101
PAD, BOS, EOS = 0, 1, 2
QWEN_IMAGE, QWEN_VIDEO = 151, 152
QWEN_VISION_START, QWEN_VISION_END = 153, 154


def clip_and_llama_configs(image_size: int = 56, patch_size: int = 14, attn_implementation: str = "sdpa"):
    """The tiny CLIP tower (3 layers of width 32, 4 heads) and Llama language model (2 layers of width
    64, vocabulary 128) that every tiny LLaVA-family model shares."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS)
    for config in (vision, text):
        config._attn_implementation = attn_implementation
    return vision, text


def seeded(model_class, config, seed: int, attn_implementation: str) -> nn.Module:
    """``model_class(config)`` with weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).eval()


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", **vision) -> nn.Module:
    """LLaVA-1.5 layout: CLIP tower (4x4 = 16 patch tokens + [CLS]), feature layer -2, Llama LM."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision_config, text_config = clip_and_llama_configs(attn_implementation=attn_implementation, **vision)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return seeded(LlavaForConditionalGeneration, config, seed, attn_implementation)


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """LLaVA-NeXT layout: AnyRes over 56-pixel crops, grids up to 2 x 2."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision_config, text_config = clip_and_llama_configs(attn_implementation=attn_implementation)
    config = LlavaNextConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
    return seeded(LlavaNextForConditionalGeneration, config, seed, attn_implementation)


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
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END)
    return seeded(Qwen2_5_VLForConditionalGeneration, config, seed, attn_implementation)


def _tiny_qwen3(config_name: str, model_name: str, vision: dict, text: dict, seed: int,
                attn_implementation: str) -> nn.Module:
    """A Qwen3-generation model (Qwen3-VL, Qwen3.5 and their MoE) with the tiny Qwen tower: 14-pixel
    patches, 2 x 2 merge, full attention in its 3 blocks, a 4 x 4 learned position grid."""
    import transformers

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16, **vision)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=160, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **text)
    config = getattr(transformers, config_name)(
        vision_config=vision, text_config=text, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END)
    return seeded(getattr(transformers, model_name), config, seed, attn_implementation)


_QWEN3_VL_TEXT = dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3], "mrope_interleaved": True})
# Qwen3.5: a linear-attention (gated delta rule) layer, then a full-attention one; rotary on a quarter
# of each 32-wide head
_QWEN3_5_TEXT = dict(head_dim=32, layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                     linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                      "mrope_section": [2, 1, 1], "mrope_interleaved": True})
_TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa", moe: bool = False) -> nn.Module:
    """Qwen3-VL layout (``moe``: Qwen3-VL-MoE): DeepStack features from vision blocks 0 and 1 added
    after the first two language-model layers. pixel_values are (patches, 3 * 2 * 14 * 14)."""
    names = ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration") if moe else \
        ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")
    text = dict(_QWEN3_VL_TEXT, **(dict(_TINY_MOE, decoder_sparse_step=1) if moe else {}))
    return _tiny_qwen3(*names, dict(deepstack_visual_indexes=[0, 1]), text, seed, attn_implementation)


def tiny_qwen3_5(seed: int = 0, attn_implementation: str = "sdpa", moe: bool = False) -> nn.Module:
    """Qwen3.5 layout (``moe``: Qwen3.5-MoE): Qwen3-VL's tower without DeepStack, a language model
    of linear-attention and full-attention layers."""
    names = ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration") if moe else \
        ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration")
    text = dict(_QWEN3_5_TEXT, **(dict(_TINY_MOE, shared_expert_intermediate_size=32) if moe else {}))
    return _tiny_qwen3(*names, {}, text, seed, attn_implementation)


def tiny_llava_next_video(seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """LLaVA-NeXT-Video layout: frames of 4 x 4 patches pooled 2 x 2 -> 4 tokens per frame."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    vision_config, text_config = clip_and_llama_configs(attn_implementation=attn_implementation)
    config = LlavaNextVideoConfig(vision_config=vision_config, text_config=text_config,
                                  image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                                  spatial_pool_mode="average", spatial_pool_stride=2,
                                  image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
    return seeded(LlavaNextVideoForConditionalGeneration, config, seed, attn_implementation)


def tiny_video_llava(seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """Video-LLaVA layout: frames of 4 x 4 patches, the video path keeps [CLS]: 17 tokens per frame."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    vision_config, text_config = clip_and_llama_configs(attn_implementation=attn_implementation)
    config = VideoLlavaConfig(vision_config=vision_config, text_config=text_config,
                              image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
    return seeded(VideoLlavaForConditionalGeneration, config, seed, attn_implementation)

