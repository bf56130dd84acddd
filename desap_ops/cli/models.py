"""The models the app runs, built from configs (no hub, random weights): the tiny ones for tests,
demos and smoke benches, and the real shapes the benchmarks time or count (the 7B models,
Qwen3-VL-8B, and LLaVA-1.5 layouts with a TinyLlama-1.1B or a 0.5B-class language model that fit a CPU machine).
``MODELS`` names every one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

if TYPE_CHECKING:   # transformers is imported where a model is built: importing it costs seconds
    from transformers import PretrainedConfig

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
        vision_start_token_id=153, vision_end_token_id=154)
    return _seeded(getattr(transformers, model_name), config, seed, attn_implementation)


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


# --- the real shapes (random weights, built on the device; --device meta counts their FLOPs) -------

def _clip_l(image_size: int) -> PretrainedConfig:
    """CLIP ViT-L/14 at ``image_size``, the vision tower of the LLaVA family."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=image_size, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def _vicuna_7b() -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)


def _clip_vicuna(image_size: int) -> dict:
    """CLIP ViT-L/14 at ``image_size`` and the Vicuna-7B language model of the LLaVA family."""
    return dict(vision_config=_clip_l(image_size), text_config=_vicuna_7b(), vision_feature_layer=-2)


def llava_1_5_7b() -> PretrainedConfig:
    from transformers import LlavaConfig

    return LlavaConfig(**_clip_vicuna(336), image_token_id=32000, vision_feature_select_strategy="default")


def llava_tinyllama_1_1b() -> PretrainedConfig:
    """The LLaVA-1.5 layout with its real CLIP ViT-L/14-336 tower and a TinyLlama-1.1B language model
    (vocabulary 32000 and the image token): real shapes that fit a CPU machine."""
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32001, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       pad_token_id=0)
    return LlavaConfig(vision_config=_clip_l(336), text_config=text, vision_feature_layer=-2, image_token_id=32000,
                       vision_feature_select_strategy="default")


def llava_qwen2_0_5b() -> PretrainedConfig:
    """The LLaVA-1.5 layout with CLIP ViT-L/14-336 and a Qwen2-0.5B-shaped language model: how much of a
    small model's prefill the vision tower is."""
    from transformers import LlavaConfig, Qwen2Config

    text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                       tie_word_embeddings=True, pad_token_id=0)
    return LlavaConfig(vision_config=_clip_l(336), text_config=text, vision_feature_layer=-2, image_token_id=151646,
                       vision_feature_select_strategy="default")


def llava_next_7b() -> PretrainedConfig:
    from transformers import LlavaNextConfig

    return LlavaNextConfig(**_clip_vicuna(336), image_token_id=32000, vision_feature_select_strategy="default",
                           image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def llava_next_video_7b() -> PretrainedConfig:
    from transformers import LlavaNextVideoConfig

    return LlavaNextVideoConfig(**_clip_vicuna(336), image_token_id=32001, video_token_id=32000,
                                spatial_pool_stride=2, spatial_pool_mode="average")


def video_llava_7b() -> PretrainedConfig:
    from transformers import VideoLlavaConfig

    return VideoLlavaConfig(**_clip_vicuna(224), image_token_index=32000, video_token_index=32001)


def qwen2_5_vl_7b() -> PretrainedConfig:
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2),
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def qwen3_vl_8b() -> PretrainedConfig:
    """Qwen3-VL-8B-Instruct: the published config (8.77 billion parameters); the vision fields not
    named are transformers' Qwen3VLVisionConfig defaults (intermediate 4304, a 48 x 48 learned
    position grid, gelu_pytorch_tanh)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                            "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False)


def _shrink_transformer(config, layers: str, heads: str) -> None:
    """Two layers of two heads at the real head size (rotary sections and head-size-dependent code stay
    valid), and two key-value heads or one where the real model groups its queries."""
    head_dim = config.hidden_size // getattr(config, heads)
    grouped = getattr(config, "num_key_value_heads", getattr(config, heads)) < getattr(config, heads)
    setattr(config, layers, 2)
    setattr(config, heads, 2)
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = 1 if grouped else 2
    config.hidden_size = 2 * head_dim
    config.intermediate_size = 4 * head_dim


def shrink_config(config: PretrainedConfig) -> None:
    """Reduce a real-shape config in place to two layers and two heads per tower and language model,
    keeping everything that sets the token counts (image size, patch size, merge, pooling, vocabulary)."""
    vision, text = config.vision_config, config.text_config
    if hasattr(vision, "depth"):   # the Qwen encoders
        _shrink_transformer(vision, "depth", "num_heads")
        if hasattr(vision, "fullatt_block_indexes"):   # Qwen2.5-VL: the last of its two layers attends fully
            vision.fullatt_block_indexes = [1]
        if getattr(vision, "deepstack_visual_indexes", None):   # Qwen3-VL: DeepStack from both layers
            vision.deepstack_visual_indexes = [0, 1]
    else:
        _shrink_transformer(vision, "num_hidden_layers", "num_attention_heads")
    _shrink_transformer(text, "num_hidden_layers", "num_attention_heads")
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = text.layer_types[:2]
    if hasattr(vision, "out_hidden_size"):
        vision.out_hidden_size = text.hidden_size


# --- the table --------------------------------------------------------------------------------------

# family -> the transformers class that runs it
CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "llava_next_video": "LlavaNextVideoForConditionalGeneration",
           "video_llava": "VideoLlavaForConditionalGeneration"}


@dataclass(frozen=True)
class ModelSpec:
    family: str                                   # a key of CLASSES
    build: Optional[Callable[[], nn.Module]] = None   # a tiny model: builds it, seeded, on CPU
    config: Optional[Callable[[], PretrainedConfig]] = None   # a real shape: its config (random weights)
    grid: Optional[int] = None   # Qwen: patches per side of the benchmark's image (default: bench_e2e.QWEN_GRID)

    @property
    def tiny(self) -> bool:
        return self.build is not None


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("llava", build=tiny_llava),
    "llava-1.5-7b": ModelSpec("llava", config=llava_1_5_7b),
    "llava-tinyllama-1.1b": ModelSpec("llava", config=llava_tinyllama_1_1b),
    "llava-qwen2-0.5b": ModelSpec("llava", config=llava_qwen2_0_5b),
    "llava-next-7b": ModelSpec("llava_next", config=llava_next_7b),
    "tiny-qwen2.5-vl": ModelSpec("qwen2_5_vl", build=tiny_qwen2_5_vl),
    "qwen2.5-vl-7b": ModelSpec("qwen2_5_vl", config=qwen2_5_vl_7b),
    "tiny-qwen3-vl": ModelSpec("qwen3_vl", build=tiny_qwen3_vl),
    "qwen3-vl-8b": ModelSpec("qwen3_vl", config=qwen3_vl_8b, grid=64),   # 1024 x 1024 pixels: 1024 tokens
    "tiny-llava-next-video": ModelSpec("llava_next_video", build=tiny_llava_next_video),
    "llava-next-video-7b": ModelSpec("llava_next_video", config=llava_next_video_7b),
    "tiny-video-llava": ModelSpec("video_llava", build=tiny_video_llava),
    "video-llava-7b": ModelSpec("video_llava", config=video_llava_7b),
}


def model_config(name: str, shrink: bool = False) -> PretrainedConfig:
    """The config of the real shape ``name`` (reduced by :func:`shrink_config` if ``shrink``)."""
    config = MODELS[name].config()
    if shrink:
        shrink_config(config)
    return config


def build_model(name: str, device: str, dtype: torch.dtype, shrink: bool = False, weights: bool = True) -> nn.Module:
    """``MODELS[name]`` on ``device`` in ``dtype``, in eval mode; ``shrink``: a real shape at reduced
    depth and width (tiny models are small already); ``weights=False`` (a real shape off meta):
    every parameter a zero broadcast from one element, so that the model holds no memory but its
    buffers (FLOP counting that runs no matrix product, :func:`desap_ops.cli.bench_e2e.flops_of`).

    A real shape is constructed directly on ``device`` with ``dtype`` as the default dtype (as
    ``from_pretrained`` does), so every buffer holds what the model's own constructor computes
    (CLIP's ``position_ids``, rotary ``inv_freq`` in float32); transformers' initialisation is
    skipped and every parameter drawn from N(0, 0.02) instead (never all zeros: the weights serve for
    timing only). On ``meta`` nothing is allocated (FLOP counting and memory estimates)."""
    spec = MODELS[name]
    if spec.tiny:
        return spec.build().to(device=device, dtype=dtype)
    import transformers
    from transformers.initialization import no_init_weights

    config = model_config(name, shrink)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = getattr(transformers, CLASSES[spec.family])(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()   # no_init_weights skips it with the rest of init_weights
    if device != "meta" and not weights:   # the constructor's storage was never written: freed untouched
        for module in model.modules():
            for key, param in module._parameters.items():
                if param is not None:
                    zero = torch.zeros((), dtype=param.dtype, device=device).expand(param.shape)
                    module._parameters[key] = nn.Parameter(zero, requires_grad=False)
    elif device != "meta":
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (tied parameters once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
