"""Tiny models that vLLM's CPU backend runs, for the vLLM tests and the vLLM benches' smoke checks:
the tiny models' vision layouts (:mod:`desap_ops.testing.tiny`) with language models of head size
64 (the CPU attention refuses 16), seeded, in eval mode on the CPU. Saved as checkpoint folders by
:mod:`desap_ops.testing.checkpoint`."""
from __future__ import annotations

import torch
from torch import nn

from .tiny import (BOS, EOS, IMAGE_TOKEN_ID, PAD, QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_END, QWEN_VISION_START,
                   clip_and_llama_configs, seeded)


def tiny_vllm_llava(seed: int = 0, next_layout: bool = False) -> nn.Module:
    """A tiny LLaVA-1.5 (or LLaVA-NeXT) that vLLM's CPU backend runs: the tiny models' tower with a
    language model of head size 64 (the CPU attention refuses 16)."""
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    vision, _ = clip_and_llama_configs()
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=64, vocab_size=128, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, max_position_embeddings=512)
    common = dict(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    if next_layout:
        config = LlavaNextConfig(**common, image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
        cls = LlavaNextForConditionalGeneration
    else:
        config, cls = LlavaConfig(**common), LlavaForConditionalGeneration
    torch.manual_seed(seed)
    return cls(config).eval()


def tiny_vllm_qwen2_5_vl(seed: int = 0) -> nn.Module:
    """A tiny Qwen2.5-VL that vLLM's CPU backend runs: the tiny model's vision layout (3 blocks,
    window attention, full attention in block 1) with vision heads of size 16 and a language model
    of head size 64 (the CPU attention refuses 16), its rotary sections summing to 64 / 2."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3, tokens_per_second=2),
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=160, max_position_embeddings=512,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END)
    return seeded(Qwen2_5_VLForConditionalGeneration, config, seed, "sdpa")


def _tiny_vllm_qwen3(model_name: str, vision: dict, text: dict, seed: int, positions: int = 512) -> nn.Module:
    """A Qwen3-generation model that vLLM's CPU backend runs: 16-pixel patches (vLLM's Qwen3 tower
    sizes its learned position grid for them), 3 full-attention vision blocks with heads of size
    16, a 2 x 2 merge, and a 2-layer language model of head size 64 (the CPU attention refuses 16),
    of ``positions`` rotary positions (its max_position_embeddings)."""
    import transformers

    config_class = getattr(transformers, model_name.replace("ForConditionalGeneration", "Config"))
    config = config_class(
        vision_config=dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=16, **vision),
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=160, max_position_embeddings=positions,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **text),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END)
    return seeded(getattr(transformers, model_name), config, seed, "sdpa")


_MROPE_64 = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12], "mrope_interleaved": True}
# norm_topk_prob: vLLM reads it, transformers' configs lack it (their MoE always normalizes the top k)
_TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)


def tiny_vllm_qwen3_vl(seed: int = 0, moe: bool = False, positions: int = 512) -> nn.Module:
    """A tiny Qwen3-VL (``moe``: Qwen3-VL-MoE) that vLLM's CPU backend runs in float32: DeepStack
    features of vision blocks 1 and 2 added after the first two language-model layers; ``positions``:
    its max_position_embeddings."""
    name = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    text = dict(rope_parameters=_MROPE_64, **(dict(_TINY_MOE, decoder_sparse_step=1) if moe else {}))
    return _tiny_vllm_qwen3(name, dict(deepstack_visual_indexes=[1, 2]), text, seed, positions)


def tiny_vllm_qwen3_5(seed: int = 0, moe: bool = False) -> nn.Module:
    """A tiny Qwen3.5 (``moe``: Qwen3.5-MoE) that vLLM's CPU backend runs, in bfloat16 only (its
    linear attention refuses float32): a linear-attention (gated delta rule) layer of two heads with
    head dims of 128 (the CPU kernel refuses 32), then a full-attention one with rotary on a quarter
    of its heads."""
    name = "Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"
    text = dict(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=2,
                linear_num_value_heads=2,   # two: tensor parallelism 2 splits them
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                **(dict(_TINY_MOE, shared_expert_intermediate_size=64) if moe else {}))
    return _tiny_vllm_qwen3(name, {}, text, seed)
