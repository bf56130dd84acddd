"""LLaVA-NeXT's AnyRes packing as an index map, for engines that hold no transformers model.

transformers' ``LlavaNextModel.pack_image_features`` lays an image's base crop and unpadded grid
crops out in the language model's order, with an image-newline token after each grid row. Run on
token numbers instead of features, it says where each packed token comes from.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch


def packed_sources(config, crops: Sequence[int], image_sizes, tokens_per_crop: int) -> list[torch.Tensor]:
    """Per image, (P,) int64: the packed tokens' positions in the image's crops flattened
    (crop * tokens_per_crop + token), and -1 for an image-newline token."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    numbers = [torch.arange(n * tokens_per_crop, dtype=torch.float64).view(n, tokens_per_crop, 1) for n in crops]
    sizes = torch.as_tensor([[int(s) for s in size] for size in image_sizes])
    packed, _ = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), numbers, sizes,
                                                   config.vision_feature_select_strategy,
                                                   image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return [p[:, 0].round().long() for p in packed]
