"""DeSAP inside transformers' LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

One budget per image over its base image and all its AnyRes crops together, in the model's own
packed order. The image-newline tokens stay where the model puts them (after each row of the
unpadded crop grid, and after a lone base image) and count toward ``keep``: the visual budget of
an image is ``keep`` minus its newline count, the kept visual tokens keep their packed order
between the newlines, and with ``keep`` = all tokens the model gets exactly its own sequence back.
``keep`` means at most (``sequence.image_budget``): an image with no more tokens passes whole, and
one whose newlines leave no room keeps its newlines and one visual token.

:func:`install` patches ``model.model.get_image_features``, ``model.forward`` and
``model.generate`` as for LLaVA-1.5 (``remove_desap`` undoes it).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .compat import Hook
from .clip_tower import drops_cls, feature_layer, read_tower, tokens_per_crop
from .prompt import served_text_embeddings
from .sequence import image_budget
from .serving import install_serving, run_prune, shrink_runs, start_record
from .state import DesapState


HOOKS = (
    Hook("model.model.get_image_features", ("pixel_values", "image_sizes")),
    Hook("model.model.pack_image_features", ("image_features", "image_sizes", "vision_feature_select_strategy",
                                             "image_newline")),
    Hook("model.model.image_newline"),
    Hook("model.model.vision_tower"),
    Hook("model.model.multi_modal_projector"),
    Hook("model.forward", ("input_ids", "pixel_values", "image_sizes", "attention_mask", "labels")),
    Hook("model.generate"),
    Hook("transformers.models.llava_next.modeling_llava_next.image_size_to_num_patches",
         ("image_size", "grid_pinpoints", "patch_size")),
)


def crops_per_image(inner, image_sizes) -> list[int]:
    """How many crops (base included) AnyRes cuts each image into."""
    # here, not at the top: importing the modeling module costs seconds
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(image_size=size, grid_pinpoints=inner.config.image_grid_pinpoints,
                                      patch_size=inner.config.vision_config.image_size)
            for size in image_sizes]


def image_layouts(model: nn.Module, image_sizes) -> list[tuple[int, int]]:
    """(packed tokens, image-newline tokens) of each image, as the model packs them."""
    inner = model.model
    per_crop = tokens_per_crop(model.config)
    dummies = [torch.ones(n, per_crop, 1) for n in crops_per_image(inner, image_sizes)]
    packed, _ = inner.pack_image_features(dummies, image_sizes, model.config.vision_feature_select_strategy,
                                          image_newline=torch.zeros(1))
    return [(int(p.shape[0]), int((p[:, 0] == 0).sum())) for p in packed]


def image_tokens(model: nn.Module, pixel_values: torch.Tensor, image_sizes) -> list[int]:
    """The processor's placeholder count of each image: its packed tokens, newlines included."""
    return [tokens for tokens, _ in image_layouts(model, image_sizes)]


def _image_features(model, inner, pixel_values, image_sizes=None, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """Replacement for ``inner.get_image_features``: each image's ``keep`` tokens, newlines included."""
    state: DesapState = model._desap
    crops = crops_per_image(inner, image_sizes)
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, crops)], dim=0)
    tower = read_tower(inner.vision_tower, pixel_values, state.feature_layer, drops_cls(model.config))
    projector = inner.multi_modal_projector

    def packed(tensor, newline=None):
        parts = torch.split(tensor, crops, dim=0)
        return inner.pack_image_features(parts, image_sizes, model.config.vision_feature_select_strategy,
                                         image_newline=newline)[0]

    saliency = tower.saliency
    visual_marks = packed(torch.ones_like(saliency)[..., None], newline=torch.zeros(1, dtype=saliency.dtype,
                                                                                     device=saliency.device))
    texts, text_mask = served_text_embeddings(model, len(crops), model.config.image_token_id, tower.hidden.device)
    start_record(model)
    features = []
    rows = zip(packed(tower.hidden), packed(tower.branch), packed(saliency[..., None]), visual_marks)
    for i, (h, b, s, mark) in enumerate(rows):
        is_visual = mark[:, 0] > 0
        newlines = int((~is_visual).sum())
        budget = image_budget(state.keep, mark.shape[0], newlines)
        result = run_prune(model, h[None], projector(b)[None], texts[i:i + 1], text_mask[i:i + 1], s[None, :, 0],
                           keep=budget - newlines)
        slots = torch.zeros(mark.shape[0], dtype=torch.bool, device=mark.device)
        slots[is_visual.nonzero()[:, 0][result.indices[0]]] = True          # kept visual positions
        slots |= ~is_visual
        out = inner.image_newline.to(tower.hidden.dtype).expand(budget, -1).clone()
        out[is_visual[slots]] = projector(result.tokens[0]).to(out.dtype)
        features.append(out)
    return BaseModelOutputWithPooling(last_hidden_state=tower.outputs.last_hidden_state, pooler_output=features,
                                      hidden_states=tower.outputs.hidden_states)


def _shrink(model, arguments: dict, generating: bool) -> None:
    pixel_values = arguments.get("pixel_values")
    if pixel_values is not None:
        layouts = image_layouts(model, arguments.get("image_sizes"))
        budgets = [image_budget(model._desap.keep, tokens, newlines) for tokens, newlines in layouts]
        shrink_runs(model, arguments, model.config.image_token_id, [tokens for tokens, _ in layouts], "image",
                    generating, budgets=budgets)


def install(model: nn.Module, state: DesapState) -> None:
    """Patch a LLaVA-NeXT model (per image: at most ``keep`` tokens, newlines included)."""
    state.feature_layer = feature_layer(model.config)
    install_serving(model, state, _shrink,
                    (model.model, "get_image_features", lambda inner, *a, **k: _image_features(model, inner, *a, **k)))
