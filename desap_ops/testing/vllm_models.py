"""The models the vLLM benches run (``desap bench vllm``, ``desap bench serve``), by name: one table
entry each, built as :mod:`desap_ops.testing.real_shapes` builds real shapes (random weights,
bfloat16) or as a tiny model, and saved as a checkpoint folder vLLM loads with no hub.

A family says how a model's checkpoint is saved, how an image appears in a prompt and how many
tokens an image of the benches' size makes. A new model of a known family is one :data:`MODELS`
entry; a new family one :data:`FAMILIES` entry beside it (the plugin also serves Qwen3-VL and
Qwen3.5, which no bench model uses yet: the checkpoint writer saves them with ``save_qwen_checkpoint``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import checkpoint, real_shapes

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

LLAVA_IMAGE = "<image>"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class Family:
    image_text: str                             # what stands for one image in a prompt
    save: Callable[["nn.Module", Path], Path]   # the checkpoint writer
    tokens_follow_size: bool    # True: an image's tokens follow its size (Qwen); False: resized to the tower's


FAMILIES = {
    "llava": Family(LLAVA_IMAGE, checkpoint.save_llava_checkpoint, tokens_follow_size=False),
    "qwen2_5_vl": Family(QWEN_IMAGE, checkpoint.save_qwen_checkpoint, tokens_follow_size=True),
}


@dataclass(frozen=True)
class VllmModel:
    family: str
    config: Callable[[], "PretrainedConfig"]
    image_side: int                    # the benches send square images this many pixels a side
    about: str                         # what it is, for --help
    tiny: "Callable[[], nn.Module] | None" = None   # a tiny model's builder (fp32, a smoke check)

    @property
    def kind(self) -> Family:
        return FAMILIES[self.family]

    def build(self, device: str = "cpu") -> "nn.Module":
        """The model to save: a real shape in bfloat16 (on meta: nothing allocated), or the tiny model."""
        if self.tiny is not None:
            return self.tiny()
        import torch

        return real_shapes.build_real_shape(self.config(), device, torch.bfloat16)


def _tiny_llava() -> "nn.Module":
    from .tiny_vllm import tiny_vllm_llava

    return tiny_vllm_llava()


def _tiny_qwen() -> "nn.Module":
    from .tiny_vllm import tiny_vllm_qwen2_5_vl

    return tiny_vllm_qwen2_5_vl()


MODELS: dict[str, VllmModel] = {   # the first is the benches' default
    "llava-tinyllama-1.1b": VllmModel("llava", real_shapes.llava_tinyllama_1_1b, 336,
                                      "CLIP ViT-L/14-336 + TinyLlama-1.1B shapes, 576 tokens an image"),
    "llava-1.5-7b": VllmModel("llava", real_shapes.llava_1_5_7b, 336, "its shapes, for a GPU"),
    # 336 x 336 pixels: 12 x 12 merged patches
    "qwen2.5-vl-small": VllmModel("qwen2_5_vl", real_shapes.qwen2_5_vl_small, 336,
                                  "Qwen2.5-VL's tower blocks at 8 of 32 + Qwen2.5-0.5B, 144 tokens a 336-pixel image"),
    "tiny": VllmModel("llava", lambda: _tiny_llava().config, 56, "a smoke check, 16 tokens an image",
                      tiny=_tiny_llava),
    "tiny-qwen2.5-vl": VllmModel("qwen2_5_vl", lambda: _tiny_qwen().config, 112, "a smoke check, 16 tokens an image",
                                 tiny=_tiny_qwen),
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
    built = model.build()
    model.kind.save(built, folder)
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


def weight_bytes(model: VllmModel) -> int:
    """The model's weights at 2 bytes a parameter (a real shape built on meta, nothing allocated; a
    tiny model on the CPU, in fp32)."""
    if model.tiny is not None:
        return real_shapes.weight_bytes(model.tiny()) // 2
    return real_shapes.weight_bytes(model.build("meta"))
