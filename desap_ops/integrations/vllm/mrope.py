"""Multimodal rotary (M-RoPE) positions for pruned images in vLLM's Qwen2.5-VL.

vLLM gives each prompt token its (t, h, w) rotary position when the request arrives
(``get_mrope_input_positions``). At that point the encoder has not yet chosen which image tokens
survive. DeSAP follows vLLM's own video pruning (EVS, ``vllm/multimodal/video_prune/evs.py``):

- on arrival, every text token already gets its final position. Text after an image starts past
  the whole image's extent, which does not depend on the tokens kept. Each image's ``keep``
  placeholders get provisional positions;
- the encoder appends four channels to each image's kept embeddings (:func:`media_positions`):
  their original (t, h, w), counted from the image's start, and the image's extent;
- after the encoder, the model runner's ``recompute_mrope_positions`` step writes them in place.

Where this differs from vLLM's EVS:
- The fourth channel is the image's extent (its largest position + 1), not the grid width. The
  two agree for wide images; only the extent gives text after a tall image the position
  transformers gives it.
- vLLM runs that step only when video pruning is configured, and its CPU runner never runs it.
  :func:`recompute_after_encoder` turns it on for a model with ``desap_recomputes_mrope``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Media(NamedTuple):
    offset: int             # first placeholder in the prompt
    length: int             # placeholders in the prompt (``keep`` for a pruned image)
    positions: torch.Tensor  # (4, grid tokens) from :func:`media_positions`


def media_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
    """(4, t * h * w) long: each token's (t, h, w) counted from the medium's start, in raster
    order and scaled in time as vLLM's Qwen2.5-VL does it, then the extent (largest + 1)."""
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
    if t_factor != 1.0:
        grid[0] = (grid[0].double() * t_factor).long()
    extent = grid.max() + 1
    return torch.cat([grid, extent.expand(1, grid.shape[1])])


def prompt_positions(prompt_length: int, media: list[Media]) -> tuple[torch.Tensor, int]:
    """(3, prompt_length) positions and vLLM's position delta for a prompt holding ``media``. A
    medium with fewer placeholders than grid tokens (a pruned image) takes its first ``length``
    positions until the encoder has run."""
    parts, start, next_position = [], 0, 0
    for medium in sorted(media, key=lambda m: m.offset):
        parts.append(torch.arange(medium.offset - start).expand(3, -1) + next_position)
        base = next_position + medium.offset - start
        parts.append(medium.positions[:3, :medium.length] + base)
        next_position = base + int(medium.positions[3, 0])
        start = medium.offset + medium.length
    parts.append(torch.arange(prompt_length - start).expand(3, -1) + next_position)
    positions = torch.cat(parts, dim=1)
    return positions, int(positions.max()) + 1 - prompt_length


def recompute_after_encoder() -> None:
    """Make vLLM's (V1) model runner run its M-RoPE recompute step for a model that sets
    ``desap_recomputes_mrope``. Runs in the worker, where the runner's module is already loaded;
    models without that attribute are untouched."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    gather = GPUModelRunner._gather_mm_embeddings
    if hasattr(gather, "desap_wraps"):
        return

    def gather_and_recompute(self, *args, **kwargs):
        if getattr(self.get_model(), "desap_recomputes_mrope", False):
            self.is_multimodal_pruning_enabled = True
        return gather(self, *args, **kwargs)

    gather_and_recompute.desap_wraps = gather
    GPUModelRunner._gather_mm_embeddings = gather_and_recompute
