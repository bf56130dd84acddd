"""DeSAP inside transformers' LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

One budget per image over its base image and all its AnyRes crops together, in the model's own
packed order. The image-newline tokens stay where the model puts them (after each row of the
unpadded crop grid, and after a lone base image) and count toward ``keep``: the visual budget of
an image is ``keep`` minus its newline count, the kept visual tokens keep their packed order
between the newlines, and with ``keep`` = all tokens the model gets exactly its own sequence back.
``keep`` means at most (``sequence.image_budget``): an image with no more tokens passes whole, and
one whose newlines leave no room keeps its newlines and one visual token.

The packed layout and the kept tokens' return between the newlines are ``common.layout``'s, which
vLLM's LLaVA-NeXT uses too. :func:`install` patches ``model.model.get_image_features``,
``model.forward`` and ``model.generate`` as for LLaVA-1.5 (``remove_desap`` undoes it).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..common.hooked import Hook
from ..common.layout import crops_per_image, drops_cls, packed_budget, packed_grid, packed_sources, with_newlines
from .clip_tower import feature_layer, read_tower
from .family import Family
from .serving import install_serving, run_prune, shrink_runs, start_record
from .state import DesapState
from .text import served_text_embeddings

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


def image_layouts(model: nn.Module, image_sizes) -> list[torch.Tensor]:
    """Each image's packed layout as the model packs it (``common.layout.packed_sources``)."""
    return packed_sources(model.config, image_sizes, pack=model.model.pack_image_features)


def image_tokens(model: nn.Module, pixel_values: torch.Tensor, image_sizes) -> list[int]:
    """The processor's placeholder count of each image: its packed tokens, newlines included."""
    return [sources.numel() for sources in image_layouts(model, image_sizes)]


def _image_features(model, inner, pixel_values, image_sizes=None, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """Replacement for ``inner.get_image_features``: each image's ``keep`` tokens, newlines included."""
    state: DesapState = model._desap
    crops = crops_per_image(model.config, image_sizes)
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, crops)], dim=0)
    signals, outputs = read_tower(inner.vision_tower, pixel_values, state.patch.feature_layer, drops_cls(model.config),
                                  state.options.reads)
    projector = inner.multi_modal_projector
    texts, text_mask = served_text_embeddings(model, len(crops), model.config.image_token_id, signals.hidden.device)
    newline = inner.image_newline.to(signals.hidden.dtype)
    start_record(model)
    features = []
    for i, (image, sources) in enumerate(zip(signals.split(crops), image_layouts(model, image_sizes))):
        sources = sources.to(signals.hidden.device)
        is_visual = sources >= 0
        visual = image.map(lambda t: t.flatten(0, 1)[sources[is_visual]][None])   # packed order, no newlines
        keep = packed_budget(state.options.keep, sources) - int((~is_visual).sum())
        result = run_prune(model, visual, projector, texts[i:i + 1], text_mask[i:i + 1], keep,
                           packed_grid(model.config, sources))
        features.append(with_newlines(is_visual, result.indices[0], projector(result.tokens[0]), newline))
    return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state, pooler_output=features,
                                      hidden_states=outputs.hidden_states)


def _shrink(model, arguments: dict, generating: bool) -> None:
    pixel_values = arguments.get("pixel_values")
    if pixel_values is not None:
        layouts = image_layouts(model, arguments.get("image_sizes"))
        budgets = [packed_budget(model._desap.options.keep, sources) for sources in layouts]
        shrink_runs(model, arguments, model.config.image_token_id, [sources.numel() for sources in layouts], "image",
                    generating, budgets=budgets)


def install(model: nn.Module, state: DesapState) -> None:
    """Patch a LLaVA-NeXT model (per image: at most ``keep`` tokens, newlines included)."""
    state.patch.feature_layer = feature_layer(model.config)
    install_serving(model, state, _shrink,
                    (model.model, "get_image_features", lambda inner, *a, **k: _image_features(model, inner, *a, **k)))


FAMILY = Family(install, HOOKS, image_tokens)
