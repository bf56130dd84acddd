"""``desap bench e2e``'s batch: one image or video and ``TEXT_TOKENS`` text tokens per row, with
the processor's placeholder count, for any model of :data:`desap_ops.testing.models.MODELS`, and
the model families the other e2e modules tell apart."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from desap_ops.integrations import image_token_counts
from desap_ops.integrations.common.layout import drops_cls, packed_sources
from desap_ops.integrations.hf.video import tokens_per_frame
from desap_ops.testing.models import MODELS

TEXT_TOKENS = 32
PIECEWISE = ("llava", "llava_next")   # families whose FLOPs are counted from the pieces
QWEN = ("qwen2_5_vl", "qwen3_vl")     # families whose vision encoder merges 2 x 2 patches (merger included)
FRAMES = {True: 3, False: 8}          # frames per video: tiny, real shape
QWEN_GRID = {True: 8, False: 48}      # patches per side of the Qwen image: tiny, real shape (ModelSpec.grid first)


@dataclass
class Batch:
    """The inputs every variant of one run reads, and what the FLOP count and the checks need of them."""
    inputs: dict       # the keyword arguments of the model's forward
    tokens: int        # placeholder tokens per image or video (before pruning)
    token_id: int      # the placeholder's id
    features: str      # the model's method that returns those tokens' features
    newlines: int = 0  # image-newlines among the placeholders (LLaVA-NeXT), which every budget keeps


def _pooled(model) -> bool:
    """Whether the video model pools each frame (LLaVA-NeXT-Video under "default" drops [CLS] and pools)."""
    return model.config.model_type == "llava_next_video" and drops_cls(model.config)


def _prompt(batch: int, text: torch.Tensor, *runs: torch.Tensor) -> torch.Tensor:
    """BOS, then ``runs`` (the image or video placeholders and their markers), then the text."""
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), *runs, text], dim=1)


def make_batch(model: nn.Module, name: str, batch: int, device: str, dtype: torch.dtype) -> Batch:
    """One image or video and ``TEXT_TOKENS`` text tokens per row, with the processor's placeholder
    count, for any model of :data:`MODELS` (``model`` is ``build_model(name, ...)``)."""
    spec = MODELS[name]
    config = model.config
    newlines = 0
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, min(1000, config.text_config.vocab_size), (batch, TEXT_TOKENS), generator=gen)
    full = lambda n, token: torch.full((batch, n), token)  # noqa: E731
    if spec.family in PIECEWISE:
        side = config.vision_config.image_size
        if spec.family == "llava_next":
            pixels = torch.randn(batch, 5, 3, side, side, generator=gen)
            inputs = {"image_sizes": torch.tensor([[2 * side, 2 * side]] * batch)}
        else:
            pixels = torch.randn(batch, 3, side, side, generator=gen)
            inputs = {}
        tokens = image_token_counts(model, pixels, inputs.get("image_sizes"))[0]
        if spec.family == "llava_next":
            newlines = int((packed_sources(config, inputs["image_sizes"][:1])[0] < 0).sum())
        token_id, features = config.image_token_id, "get_image_features"
        text[text == token_id] = 3
        inputs.update(input_ids=_prompt(batch, text, full(tokens, token_id)), pixel_values=pixels.to(dtype))
    elif spec.family in QWEN:   # one image of side x side patches, between the vision markers
        side, vision = spec.grid or QWEN_GRID[spec.tiny], config.vision_config
        tokens = side * side // 4
        token_id, features = config.image_token_id, "get_image_features"
        text[(text == token_id) | (text >= 150)] = 3
        ids = _prompt(batch, text, full(1, config.vision_start_token_id), full(tokens, token_id),
                      full(1, config.vision_end_token_id))
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(batch * side * side, width, generator=gen)
        inputs = dict(input_ids=ids, pixel_values=pixels.to(dtype), mm_token_type_ids=(ids == token_id).int(),
                      image_grid_thw=torch.tensor([[1, side, side]] * batch))
    else:  # the video models
        frames, size = FRAMES[spec.tiny], config.vision_config.image_size
        tokens = frames * tokens_per_frame(model, _pooled(model))
        token_id, features = config.video_token_id, "get_video_features"
        text[text == token_id] = 3
        videos = torch.randn(batch, frames, 3, size, size, generator=gen)
        inputs = dict(input_ids=_prompt(batch, text, full(tokens, token_id)), pixel_values_videos=videos.to(dtype))
    return Batch({k: v.to(device) for k, v in inputs.items()}, tokens, token_id, features, newlines)

