"""The real shapes the benchmarks time or count, built from configs (no hub) with random weights:
the 7B models, Qwen3-VL-8B, LLaVA-1.5 layouts with a TinyLlama-1.1B or a 0.5B-class language model
and a small Qwen2.5-VL that fit a CPU machine. :func:`build_real_shape` is the one place a real
shape becomes a model, for ``desap bench e2e`` and the vLLM benches' checkpoints alike; the speeds
measured on it hold for any weights, the outputs mean nothing."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:   # transformers is imported where a config is made: importing it costs seconds
    from transformers import PretrainedConfig

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


def qwen2_5_vl_small() -> PretrainedConfig:
    """A Qwen2.5-VL that fits a CPU: the real tower's blocks (width 1280, 16 heads, MLP 3420, 112-pixel
    windows, 14-pixel patches merged 2 x 2) at 8 of its 32 (full attention in the last, as in every
    eighth of the real one), and the language model of Qwen2.5-0.5B (24 layers of width 896, 14
    heads, 2 KV heads) at a vocabulary of 32,000 instead of 151,936: the checkpoint's word-level
    tokenizer takes minutes per 32,000 words to build (tied embeddings: a smaller output layer)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config=dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=896,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7], in_channels=3, tokens_per_second=2),
        text_config=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         # head size 64: the rotary sections (t, h, w) sum to 32, in Qwen2.5-VL's proportions
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
        image_token_id=31998, video_token_id=31999, vision_start_token_id=31996, vision_end_token_id=31997,
        tie_word_embeddings=True)


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


def depths(config: PretrainedConfig) -> tuple[int, int]:
    """(tower blocks, language-model layers) of a real-shape config."""
    vision = config.vision_config
    return getattr(vision, "depth", None) or vision.num_hidden_layers, config.text_config.num_hidden_layers


def _scaled_layer(index: int, factor: int) -> int:
    """The block of a tower ``factor`` times shallower that stands where block ``index`` stood."""
    return max(0, round((index + 1) / factor) - 1)


def scale_depth(config: PretrainedConfig, factor: int) -> None:
    """Divide the tower's and the language model's depths by ``factor`` in place, widths and token
    counts kept, so that the tower's share of the prefill FLOPs stays the full model's (both parts
    scale alike; only the embeddings, the merger and the output layer do not). The blocks with a
    role keep their place in proportion: Qwen2.5-VL's full-attention blocks (every eighth of 32:
    every second of 8 at factor 4), Qwen3-VL's DeepStack blocks. A ValueError unless ``factor``
    divides both depths."""
    tower, language = depths(config)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or tower % factor or language % factor:
        raise ValueError(f"depth factor must divide the tower's {tower} blocks and the language model's {language} "
                         f"layers, got {factor!r}")
    vision, text = config.vision_config, config.text_config
    if hasattr(vision, "depth"):
        vision.depth = tower // factor
    else:
        vision.num_hidden_layers = tower // factor
    text.num_hidden_layers = language // factor
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = text.layer_types[:language // factor]
    for field in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        if getattr(vision, field, None):
            setattr(vision, field, sorted({_scaled_layer(i, factor) for i in getattr(vision, field)}))


# family (a config's model_type) -> the transformers class that runs it
CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "llava_next_video": "LlavaNextVideoForConditionalGeneration",
           "video_llava": "VideoLlavaForConditionalGeneration"}


def build_real_shape(config: PretrainedConfig, device: str, dtype: torch.dtype, weights: bool = True) -> nn.Module:
    """The model of ``config`` on ``device`` in ``dtype``, in eval mode.

    It is constructed directly on ``device`` with ``dtype`` as the default dtype (as
    ``from_pretrained`` does), so every buffer holds what the model's own constructor computes
    (CLIP's ``position_ids``, rotary ``inv_freq`` in float32); transformers' initialisation is
    skipped and every parameter drawn from N(0, 0.02) instead, seeded (never all zeros: the weights
    serve for timing only). On ``meta`` nothing is allocated (FLOP counting, memory estimates).
    ``weights=False`` off meta: every parameter a zero broadcast from one element, so that the model
    holds no memory but its buffers (FLOP counting that runs no matrix product,
    :class:`desap_ops.benchmarks.flops.ShapesOnly`)."""
    import transformers
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = getattr(transformers, CLASSES[config.model_type])(config)
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
