"""DeSAP for the videos of LLaVA-NeXT-Video and Video-LLaVA.

Budget rule [ours]: one budget per video **across the whole clip**. All frames' tokens compete,
so DeSAP can spend tokens on the frames the prompt is about instead of an equal share per frame;
the kept tokens keep their frame-major order. Each frame's [CLS] gives the saliency of that
frame's tokens (each frame's distribution sums to one, so frames compete on equal terms).

- LLaVA-NeXT-Video pools every frame 2 x 2 (``vision_resampler``) before the projector: the
  hidden states and the attention branch go through the same resampler, saliency is summed over
  each pooled window, and the candidates are the pooled tokens the language model would get.
- Video-LLaVA's video path keeps each frame's [CLS] token: it stays a candidate like any other.

The kept tokens go through the projector only after pruning. Images in these models pass through
unpruned (the image paths of LLaVA-1.5 and LLaVA-NeXT are covered by those models' support).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .signals import capture, clip_layout, encoder_layers


def _tower(inner):
    return inner.video_tower if hasattr(inner, "video_tower") else inner.vision_tower


def _drops_cls(model) -> bool:
    """LLaVA-NeXT-Video drops [CLS] under the "default" strategy; Video-LLaVA's video path never does."""
    return model._desap.family == "llava_next_video" and model.config.vision_feature_select_strategy == "default"


def tokens_per_frame(model) -> int:
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    if model._desap.family == "llava_next_video":
        return (side // model.config.spatial_pool_stride) ** 2 if _drops_cls(model) else side * side + 1
    return side * side + 1


def _pool_saliency(model, saliency: torch.Tensor) -> torch.Tensor:
    """Sum of saliency over each pooling window of the resampler: (frames, side^2) -> (frames, P)."""
    stride = model.config.spatial_pool_stride
    side = int(saliency.shape[1] ** 0.5)
    grid = saliency.view(-1, 1, side, side)
    return (F.avg_pool2d(grid, stride, stride) * stride * stride).flatten(1)


def _video_features(model, inner, pixel_values_videos, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """Replacement for ``inner.get_video_features``: (videos, keep, C) pruned, projected tokens."""
    from .. import api
    from .llava import _text_embeddings

    state = model._desap
    videos, frames = pixel_values_videos.shape[:2]
    pixels = pixel_values_videos.flatten(0, 1)
    tower = _tower(inner)
    with capture(clip_layout(encoder_layers(tower)[state.feature_layer - 1])) as signals:
        outputs = tower(pixels, output_hidden_states=True, return_dict=True)
        saliency = signals.cls_saliency()
        branch = signals.attention_branch
    hidden = outputs.hidden_states[state.feature_layer]
    if _drops_cls(model):
        hidden, branch, saliency = hidden[:, 1:], branch[:, 1:], saliency[:, 1:]
        hidden, branch = inner.vision_resampler(hidden), inner.vision_resampler(branch)
        saliency = _pool_saliency(model, saliency)
    per_video = lambda t: t.reshape(videos, frames * t.shape[1], *t.shape[2:])  # noqa: E731  frame-major
    hidden, branch, saliency = per_video(hidden), per_video(branch), per_video(saliency)
    projector = inner.multi_modal_projector
    text, text_mask = _text_embeddings(model, videos, hidden.device, token_id=model.config.video_token_id)
    result = api.prune(hidden, projector(branch), text.to(hidden.dtype), saliency, state.keep, text_mask=text_mask,
                       task_ratio=state.task_ratio, merge=state.merge, text_reduce=state.text_reduce,
                       backend=state.backend)
    state.last = {"indices": result.indices, "assignment": result.assignment,
                  "task_scores": result.task_scores, "saliency": saliency}
    return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state,
                                      pooler_output=projector(result.tokens))


def _shrink_videos(model, arguments: dict, with_labels: bool, pad_left: bool) -> None:
    from .llava import shrink_runs

    videos = arguments.get("pixel_values_videos")
    if videos is None:
        return
    lengths = [videos.shape[1] * tokens_per_frame(model)] * videos.shape[0]
    shrink_runs(model, arguments, model.config.video_token_id, lengths, "video", with_labels, pad_left)


def install(model, state) -> None:
    from .llava import install_methods, serve_forward, serve_generate

    install_methods(model, state, (
        (model.model, "get_video_features", lambda self, *a, **k: _video_features(model, self, *a, **k)),
        (model, "forward", lambda self, *a, **k: serve_forward(self, _shrink_videos, *a, **k)),
        (model, "generate", lambda self, *a, **k: serve_generate(self, _shrink_videos, *a, **k)),
    ))
