"""DeSAP for the videos of LLaVA-NeXT-Video and Video-LLaVA.

Budget rule [ours]: one budget per video **across the whole clip**. All frames' tokens compete,
so DeSAP can spend tokens on the frames the prompt is about instead of an equal share per frame;
the kept tokens keep their frame-major order. Each frame's [CLS] gives the saliency of that
frame's tokens (each frame's distribution sums to one, so frames compete on equal terms).

- LLaVA-NeXT-Video (under the "default" strategy) drops [CLS] and pools every frame 2 x 2
  (``vision_resampler``) before the projector: the hidden states and the attention branch go
  through the same resampler, saliency is summed over each pooled window, and the candidates are
  the pooled tokens the language model would get.
- Video-LLaVA's video path keeps each frame's [CLS] token: it stays a candidate like any other.

The kept tokens go through the projector only after pruning. :func:`install_llava_next_video` and
:func:`install_video_llava` patch ``model.model.get_video_features``, ``model.forward`` and
``model.generate``. Images in these models pass through unpruned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..common.hooked import Hook
from ...methods import TokenGrid
from ..common.layout import crop_grid, drops_cls, patch_tokens
from ..common.sequence import image_budget
from ..common.signals import TowerSignals
from .clip_tower import feature_layer, read_tower
from .family import Family
from .serving import install_serving, run_prune, shrink_runs, start_record
from .state import DesapState
from .text import served_text_embeddings


HOOKS = (
    Hook("model.model.get_video_features"),   # replaced; called with the clip first, by position
    Hook("model.model.multi_modal_projector"),
    Hook("model.forward", ("input_ids", "pixel_values_videos", "attention_mask", "labels")),
    Hook("model.generate"),
)


def tokens_per_frame(model: nn.Module, pooled: bool) -> int:
    """Candidate tokens of one frame: the resampler's pooled grid, or every patch and [CLS]."""
    if pooled:
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return (side // model.config.spatial_pool_stride) ** 2
    return patch_tokens(model.config.vision_config) + 1


def pool_saliency(saliency: torch.Tensor, stride: int) -> torch.Tensor:
    """Sum of saliency over each ``stride`` x ``stride`` pooling window: (frames, side^2) -> (frames, P)."""
    side = int(saliency.shape[1] ** 0.5)
    grid = saliency.view(-1, 1, side, side)
    return (F.avg_pool2d(grid, stride, stride) * stride * stride).flatten(1)


def pool_keys(keys: torch.Tensor, stride: int) -> torch.Tensor:
    """Mean of the keys over each ``stride`` x ``stride`` pooling window: (frames, side^2, d) ->
    (frames, P, d), the key of a pooled token as :func:`desap_ops.integrations.common.signals.merged_keys`
    makes a Qwen token's."""
    side = int(keys.shape[1] ** 0.5)
    grid = keys.transpose(1, 2).reshape(keys.shape[0], keys.shape[2], side, side)
    return F.avg_pool2d(grid, stride, stride).flatten(2).transpose(1, 2)


def _video_features(model, inner, pooled: bool, pixel_values_videos, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """Replacement for ``inner.get_video_features``: (videos, keep, C) pruned, projected tokens."""
    state: DesapState = model._desap
    videos, frames = pixel_values_videos.shape[:2]
    tower_module = inner.video_tower if hasattr(inner, "video_tower") else inner.vision_tower
    reads = state.options.reads
    signals, outputs = read_tower(tower_module, pixel_values_videos.flatten(0, 1), state.patch.feature_layer,
                                  drop_cls=pooled, reads=reads)
    if pooled:   # only what the method read is pooled; a frame's tokens share its pixel hash
        pooled_hidden = inner.vision_resampler(signals.hidden)
        signals = TowerSignals(pooled_hidden,
                               None if signals.attn is None else inner.vision_resampler(signals.attn),
                               None if signals.saliency is None else pool_saliency(signals.saliency,
                                                                                    model.config.spatial_pool_stride),
                               seed=None if signals.seed is None else signals.seed[:, :pooled_hidden.shape[1]],
                               keys=None if signals.keys is None else pool_keys(signals.keys,
                                                                                model.config.spatial_pool_stride),
                               received=None if signals.received is None else pool_saliency(
                                   signals.received, model.config.spatial_pool_stride),
                               layer_received=None if signals.layer_received is None else pool_saliency(
                                   signals.layer_received, model.config.spatial_pool_stride))
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size // model.config.spatial_pool_stride
        grid = TokenGrid(((frames, side, side),))   # each frame's pooled grid (tokens_per_frame)
    else:
        grid = crop_grid(model.config, frames, cls=True)   # every frame's [CLS] and patches
    signals = signals.map(lambda t: t.reshape(videos, frames * t.shape[1], *t.shape[2:]))   # frame-major
    projector = inner.multi_modal_projector
    text, text_mask = served_text_embeddings(model, videos, model.config.video_token_id, signals.hidden.device)
    start_record(model)
    keep = image_budget(state.options.keep, signals.hidden.shape[1])   # a short clip passes whole
    result = run_prune(model, signals, projector, text, text_mask, keep, grid)
    return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state,
                                      pooler_output=projector(result.tokens))


def _install(model, state: DesapState, pooled: bool) -> None:
    def shrink(model, arguments: dict, generating: bool) -> None:
        videos = arguments.get("pixel_values_videos")
        if videos is not None:
            lengths = [videos.shape[1] * tokens_per_frame(model, pooled)] * videos.shape[0]
            shrink_runs(model, arguments, model.config.video_token_id, lengths, "video", generating)

    state.patch.feature_layer = feature_layer(model.config)
    install_serving(model, state, shrink, (
        model.model, "get_video_features",
        lambda inner, *a, **k: _video_features(model, inner, pooled, *a, **k)))


def install_llava_next_video(model: nn.Module, state: DesapState) -> None:
    """Patch a LLaVA-NeXT-Video model: frames pooled (without [CLS]) under the "default" strategy."""
    _install(model, state, pooled=drops_cls(model.config))


def install_video_llava(model: nn.Module, state: DesapState) -> None:
    """Patch a Video-LLaVA model: every frame token and [CLS] are candidates."""
    _install(model, state, pooled=False)


# LLaVA-NeXT-Video's images are LLaVA-NeXT's: the registry gives it their count (a patcher never
# imports another patcher)
LLAVA_NEXT_VIDEO = Family(install_llava_next_video, HOOKS)
VIDEO_LLAVA = Family(install_video_llava, HOOKS)
