"""Every model ``desap bench e2e`` runs, by name (``--model``): the tiny ones (smoke runs, seconds on
a CPU) and the real shapes (random weights; ``--device meta`` counts their FLOPs at any size)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from . import real_shapes, tiny
from .real_shapes import build_real_shape, scale_depth, shrink_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelSpec:
    family: str                                   # a config's model_type: a key of real_shapes.CLASSES
    build: Optional[Callable[[], nn.Module]] = None   # a tiny model: builds it, seeded, on CPU
    config: Optional[Callable[[], PretrainedConfig]] = None   # a real shape: its config (random weights)
    grid: Optional[int] = None   # Qwen: patches per side of the benchmark's image (default: e2e.QWEN_GRID)

    @property
    def tiny(self) -> bool:
        return self.build is not None


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("llava", build=tiny.tiny_llava),
    "llava-1.5-7b": ModelSpec("llava", config=real_shapes.llava_1_5_7b),
    "llava-tinyllama-1.1b": ModelSpec("llava", config=real_shapes.llava_tinyllama_1_1b),
    "llava-qwen2-0.5b": ModelSpec("llava", config=real_shapes.llava_qwen2_0_5b),
    "llava-next-7b": ModelSpec("llava_next", config=real_shapes.llava_next_7b),
    "tiny-qwen2.5-vl": ModelSpec("qwen2_5_vl", build=tiny.tiny_qwen2_5_vl),
    "qwen2.5-vl-7b": ModelSpec("qwen2_5_vl", config=real_shapes.qwen2_5_vl_7b),
    "tiny-qwen3-vl": ModelSpec("qwen3_vl", build=tiny.tiny_qwen3_vl),
    "qwen3-vl-8b": ModelSpec("qwen3_vl", config=real_shapes.qwen3_vl_8b, grid=64),   # 1024 x 1024 pixels: 1024 tokens
    "tiny-llava-next-video": ModelSpec("llava_next_video", build=tiny.tiny_llava_next_video),
    "llava-next-video-7b": ModelSpec("llava_next_video", config=real_shapes.llava_next_video_7b),
    "tiny-video-llava": ModelSpec("video_llava", build=tiny.tiny_video_llava),
    "video-llava-7b": ModelSpec("video_llava", config=real_shapes.video_llava_7b),
}


def model_config(name: str, shrink: bool = False, depth_factor: int = 1) -> PretrainedConfig:
    """The config of the real shape ``name`` (reduced by :func:`shrink_config` if ``shrink``; its
    depths divided by ``depth_factor``, :func:`scale_depth`)."""
    config = MODELS[name].config()
    if depth_factor != 1:
        scale_depth(config, depth_factor)
    if shrink:
        shrink_config(config)
    return config


def build_model(name: str, device: str, dtype: torch.dtype, shrink: bool = False, weights: bool = True,
                depth_factor: int = 1) -> nn.Module:
    """``MODELS[name]`` on ``device`` in ``dtype``, in eval mode: a tiny model as it is built, a real
    shape by :func:`build_real_shape` (``shrink``: at reduced depth and width; ``depth_factor``:
    tower and language model that many times shallower; ``weights=False``: parameters that hold no
    memory)."""
    spec = MODELS[name]
    if spec.tiny:
        if depth_factor != 1:
            raise ValueError(f"depth factor applies to the real shapes, not to the tiny model {name}")
        return spec.build().to(device=device, dtype=dtype)
    return build_real_shape(model_config(name, shrink, depth_factor), device, dtype, weights)
