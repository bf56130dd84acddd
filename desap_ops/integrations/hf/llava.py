"""DeSAP inside transformers' LLaVA-1.5 (``LlavaForConditionalGeneration``).

:func:`install` sets three instance attributes (``remove_desap`` deletes them again):

- ``model.model.get_image_features``: runs the vision tower with hooks on the feature layer's
  attention, prunes each image to ``keep`` tokens with ``desap_ops.prune`` and projects only the
  kept tokens into the language model's space;
- ``model.forward`` and ``model.generate``: shrink each image's placeholder run in ``input_ids``
  (and ``attention_mask``, ``labels``, ``position_ids``) from the processor's count to ``keep``
  before the model runs (``serving``), so the vision side knows the prompt it prunes for.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..common.hooked import Hook
from ..common.layout import crop_grid, drops_cls, tokens_per_crop
from ..common.sequence import image_budget
from .clip_tower import feature_layer, read_tower
from .family import Family
from .serving import install_serving, run_prune, shrink_runs, start_record
from .state import DesapState
from .text import served_text_embeddings

# the model internals this patch uses, checked before patching (compat.check_hooks)
HOOKS = (
    Hook("model.model.get_image_features", ("pixel_values",)),
    Hook("model.model.vision_tower"),
    Hook("model.model.multi_modal_projector"),
    Hook("model.model.language_model"),
    Hook("model.forward", ("input_ids", "pixel_values", "attention_mask", "position_ids", "labels")),
    Hook("model.generate"),
)


def image_tokens(model: nn.Module, pixel_values: torch.Tensor, image_sizes=None) -> list[int]:
    """The processor's placeholder count of each image: one crop's feature tokens."""
    return [tokens_per_crop(model.config)] * pixel_values.shape[0]


def _image_features(model, inner, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                    image_sizes=None, **kwargs):
    """Replacement for ``inner.get_image_features``: the pruned, projected features of each image."""
    state: DesapState = model._desap
    signals, outputs = read_tower(inner.vision_tower, pixel_values, state.patch.feature_layer, drops_cls(model.config),
                                  state.options.reads)
    projector = inner.multi_modal_projector
    text, text_mask = served_text_embeddings(model, signals.hidden.shape[0], model.config.image_token_id,
                                             signals.hidden.device)
    start_record(model)
    keep = image_budget(state.options.keep, signals.hidden.shape[1])   # a keep above the image's tokens: all of them
    result = run_prune(model, signals, projector, text, text_mask, keep, crop_grid(model.config))
    return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state,
                                      pooler_output=list(projector(result.tokens)),
                                      hidden_states=outputs.hidden_states)


def _shrink(model, arguments: dict, generating: bool) -> None:
    pixel_values = arguments.get("pixel_values")
    if pixel_values is not None:
        shrink_runs(model, arguments, model.config.image_token_id, image_tokens(model, pixel_values), "image",
                    generating)


def install(model: nn.Module, state: DesapState) -> None:
    """Patch a LLaVA-1.5 model (a ``keep`` above an image's tokens sends every image whole)."""
    state.patch.feature_layer = feature_layer(model.config)
    install_serving(model, state, _shrink,
                    (model.model, "get_image_features", lambda inner, *a, **k: _image_features(model, inner, *a, **k)))


FAMILY = Family(install, HOOKS, image_tokens)
