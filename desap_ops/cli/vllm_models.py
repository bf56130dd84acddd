"""The models the vLLM benches run (``desap bench vllm``, ``desap bench serve``): one table entry
each, a checkpoint folder vLLM loads with no hub (random weights), and the images the benches send.

A family says how a model's checkpoint is saved, how an image appears in a prompt and how many
tokens an image of a given size makes; a new model of a known family is one :data:`MODELS` entry,
a new family (Qwen3-VL, once the plugin serves it) one :data:`FAMILIES` entry beside it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:   # transformers and torch are imported where a model is built
    from torch import nn
    from transformers import PretrainedConfig

LLAVA_IMAGE = "<image>"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class Family:
    image_text: str             # what stands for one image in a prompt
    save: str                   # the checkpoint writer in desap_ops.cli.checkpoint
    tokens_follow_size: bool    # True: an image's tokens follow its size (Qwen); False: resized to the tower's


FAMILIES = {
    "llava": Family(LLAVA_IMAGE, "save_llava_checkpoint", tokens_follow_size=False),
    "qwen2_5_vl": Family(QWEN_IMAGE, "save_qwen_checkpoint", tokens_follow_size=True),
}


@dataclass(frozen=True)
class VllmModel:
    family: str
    config: Callable[[], "PretrainedConfig"]
    build: Callable[[], "nn.Module"]   # the model to save, on CPU (real shapes in bf16, random weights)
    image_side: int                    # the benches send square images this many pixels a side
    tiny: bool = False                 # built at full size in fp32 (a smoke check), not from a real shape

    @property
    def kind(self) -> Family:
        return FAMILIES[self.family]


def qwen2_5_vl_small() -> "PretrainedConfig":
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


def _real_shape(config: Callable[[], "PretrainedConfig"], device: str = "cpu") -> "nn.Module":
    """A real shape built on ``device`` in bf16, every parameter drawn from N(0, 0.02) (seeded), as
    :func:`desap_ops.cli.models.build_model` builds its real shapes; on meta nothing is allocated."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    from .models import CLASSES

    cfg = config()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), no_init_weights():
            model = getattr(transformers, CLASSES[cfg.model_type])(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()   # no_init_weights skips it
    if device != "meta":
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def _llava_tinyllama() -> "PretrainedConfig":
    from .models import llava_tinyllama_1_1b

    return llava_tinyllama_1_1b()


def _llava_1_5_7b() -> "PretrainedConfig":
    from .models import llava_1_5_7b

    return llava_1_5_7b()


def _tiny_llava() -> "nn.Module":
    from .checkpoint import tiny_vllm_llava

    return tiny_vllm_llava()


def _tiny_qwen() -> "nn.Module":
    from .checkpoint import tiny_vllm_qwen2_5_vl

    return tiny_vllm_qwen2_5_vl()


MODELS: dict[str, VllmModel] = {
    # the real CLIP ViT-L/14-336 tower and a TinyLlama-1.1B language model: 576 tokens an image
    "llava-tinyllama-1.1b": VllmModel("llava", _llava_tinyllama, lambda: _real_shape(_llava_tinyllama), 336),
    "llava-1.5-7b": VllmModel("llava", _llava_1_5_7b, lambda: _real_shape(_llava_1_5_7b), 336),   # for a GPU
    # 336 x 336 pixels: 12 x 12 merged patches, 144 tokens an image
    "qwen2.5-vl-small": VllmModel("qwen2_5_vl", qwen2_5_vl_small, lambda: _real_shape(qwen2_5_vl_small), 336),
    "tiny": VllmModel("llava", lambda: _tiny_llava().config, _tiny_llava, 56, tiny=True),   # 16 tokens
    "tiny-qwen2.5-vl": VllmModel("qwen2_5_vl", lambda: _tiny_qwen().config, _tiny_qwen, 112, tiny=True),   # 16
}


def image_tokens(model: VllmModel, config: "PretrainedConfig") -> int:
    """Placeholder tokens of one of the benches' images without DeSAP."""
    if model.kind.tokens_follow_size:
        vision = config.vision_config
        return (model.image_side // (vision.patch_size * vision.spatial_merge_size)) ** 2
    from desap_ops.integrations.common.layout import tokens_per_crop

    return tokens_per_crop(config)


def save_checkpoint(model: VllmModel, folder: Path) -> None:
    """Write ``model``'s checkpoint to ``folder``; a family whose tokens follow the image size gets a
    processor that resizes every image to exactly ``image_side`` squared pixels (the benches' images
    are that size, so each makes :func:`image_tokens` tokens)."""
    from . import checkpoint

    built = model.build()
    getattr(checkpoint, model.kind.save)(built, folder)
    del built
    if model.kind.tokens_follow_size:
        path = folder / "processor_config.json"
        processor = json.loads(path.read_text())
        pixels = model.image_side ** 2
        processor["image_processor"]["size"] = {"shortest_edge": pixels, "longest_edge": pixels}
        path.write_text(json.dumps(processor, indent=2))


def prompt(model: VllmModel, question: str) -> str:
    """A one-image prompt in the chat template's form (USER: image question ASSISTANT:)."""
    return f"USER: {model.kind.image_text} {question} ASSISTANT:"


def weight_bytes(model: VllmModel, config: Optional["PretrainedConfig"] = None) -> int:
    """The model's weights at 2 bytes a parameter (built on meta, nothing allocated; tiny: on CPU)."""
    from .models import weight_bytes as bytes_of

    if model.tiny:
        return bytes_of(model.build()) // 2   # built in fp32
    return bytes_of(_real_shape(model.config, "meta"))
