"""How the LLaVA families lay out an image's tokens, read from the model's config (the same
for transformers and vLLM):

- a crop (LLaVA-1.5's one image, a LLaVA-NeXT crop, a video frame) gives its patch tokens, and
  [CLS] unless the model drops it (:func:`tokens_per_crop`);
- LLaVA-NeXT cuts an image into a base crop and AnyRes grid crops (:func:`crops_per_image`) and
  lays them out in the language model's order, unpadded, with an image-newline token after each
  grid row (:func:`packed_sources`: transformers' ``pack_image_features`` run on token numbers
  instead of features, so it says where each packed token comes from);
- the kept visual tokens of an image go back between its newlines (:func:`with_newlines`): DeSAP's
  output for LLaVA-NeXT in both engines, and the ideal's.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch

from ...methods import TokenGrid
from .sequence import image_budget


def drops_cls(config) -> bool:
    """Whether the model drops [CLS] from its image features ("default") or keeps it ("full")."""
    return config.vision_feature_select_strategy == "default"


def patch_tokens(vision_config) -> int:
    """Patch tokens of one crop or frame, without [CLS]."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def tokens_per_crop(config) -> int:
    """Feature tokens the model takes from one crop: its patches, and [CLS] unless dropped."""
    return patch_tokens(config.vision_config) + (0 if drops_cls(config) else 1)


def crop_grid(config, crops: int = 1, cls: Optional[bool] = None) -> TokenGrid:
    """Where the feature tokens of ``crops`` crops (or frames) one after another lie: each crop's
    [CLS] alone where it is kept (``cls``; None: unless the model drops it), then its square patch
    grid (HiPrune's neighbours)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    cls = not drops_cls(config) if cls is None else cls
    crop = ((1, 1, 1), (1, side, side)) if cls else ((1, side, side),)
    return TokenGrid(crop * crops)


def packed_grid(config, sources: torch.Tensor) -> TokenGrid:
    """Where LLaVA-NeXT's visual tokens (newlines left out) of the packed layout ``sources``
    (:func:`packed_sources`) lie: the base crop's square grid, then the unpadded AnyRes grid, whose
    every row ends in a newline."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    visual = int((sources >= 0).sum())
    rows = int((sources[side * side:] < 0).sum())
    if visual == side * side:
        return TokenGrid(((1, side, side),))
    return TokenGrid(((1, side, side), (1, rows, (visual - side * side) // rows)))


def crops_per_image(config, image_sizes) -> list[int]:
    """How many crops (base included) LLaVA-NeXT's AnyRes cuts each image of ``image_sizes``
    ((height, width) each, as the processor gives them) into."""
    # here, not at the top: importing the modeling module costs seconds
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [int(image_size_to_num_patches(image_size=[int(s) for s in size], grid_pinpoints=config.image_grid_pinpoints,
                                          patch_size=config.vision_config.image_size))
            for size in image_sizes]


def packed_sources(config, image_sizes, pack: Optional[Callable] = None) -> list[torch.Tensor]:
    """Per image of ``image_sizes``, (P,) int64 over its P packed tokens: the token's position in
    the image's crops flattened (crop * tokens_per_crop + token), or -1 for an image-newline.

    ``pack``: the model's own ``pack_image_features`` where a model is at hand (transformers);
    by default transformers' ``LlavaNextModel.pack_image_features`` (vLLM holds no such model)."""
    if pack is None:
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        def pack(*args, **kwargs):
            return LlavaNextModel.pack_image_features(SimpleNamespace(config=config), *args, **kwargs)

    per_crop = tokens_per_crop(config)
    numbers = [torch.arange(n * per_crop, dtype=torch.float64).view(n, per_crop, 1)
               for n in crops_per_image(config, image_sizes)]
    sizes = torch.as_tensor([[int(s) for s in size] for size in image_sizes])
    packed, _ = pack(numbers, sizes, config.vision_feature_select_strategy,
                     image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return [p[:, 0].round().long() for p in packed]


def with_newlines(is_visual: torch.Tensor, kept: torch.Tensor, tokens: torch.Tensor,
                  newline: torch.Tensor) -> torch.Tensor:
    """One image's features for the language model: its kept visual tokens in packed order, and
    every image-newline of its layout where it stands between them.

    Args:
        is_visual: (P,) bool, the packed layout (``packed_sources(...) >= 0``); False: a newline.
        kept: (K,) int64, ascending: the kept tokens' indices among the image's visual tokens.
        tokens: (K, C): their features, in the language model's space.
        newline: (C,): the model's ``image_newline``, in the dtype the features take.
    Returns (K + newlines, C) in ``newline``'s dtype.
    """
    slots = ~is_visual
    slots[is_visual.nonzero()[:, 0][kept]] = True   # kept visual positions (slots is a new tensor)
    out = newline.expand(int(slots.sum()), -1).clone()
    out[is_visual[slots]] = tokens.to(out.dtype)
    return out


def packed_budget(keep: int, sources: torch.Tensor) -> int:
    """How many tokens an image of :func:`packed_sources` layout ``sources`` sends under ``keep``,
    its newlines counted (``sequence.image_budget``)."""
    return image_budget(keep, sources.numel(), int((sources < 0).sum()))
