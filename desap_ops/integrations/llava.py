"""DeSAP inside transformers' LLaVA-1.5 and LLaVA-NeXT.

Three instance attributes replace the class's methods (``remove_desap`` deletes them again):

- ``model.model.get_image_features``: runs the vision tower with hooks on the feature layer's
  attention, prunes each image to ``keep`` tokens with ``desap_ops.prune`` and projects only the
  kept tokens into the language model's space;
- ``model.forward``: shrinks each image's placeholder run in ``input_ids`` (and ``attention_mask``,
  ``labels``, ``position_ids``) from the processor's count to ``keep`` before the model runs, and
  tells the vision side which prompt it is pruning for;
- ``model.generate``: shrinks the prompt once before generation, so the cache, the attention mask
  and the positions of every decoding step agree with the pruned prefill.
"""
from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import api
from .sequence import count_placeholders, first_placeholders, image_text_tokens, shrink_placeholders
from .signals import capture, clip_layout, encoder_layers

FAMILIES = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next",
            "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
            "LlavaNextVideoForConditionalGeneration": "llava_next_video",
            "VideoLlavaForConditionalGeneration": "video_llava"}
SUPPORTED = tuple(FAMILIES)


@dataclass
class DesapState:
    keep: int
    task_ratio: float
    merge: bool
    text_reduce: str
    backend: str
    ignored_ids: set
    family: str                        # "llava" or "llava_next"
    feature_layer: int                 # index into the vision tower's hidden_states
    select_strategy: str               # "default" drops [CLS] from the features, "full" keeps it
    original_forward: object = None
    original_generate: object = None
    saved: list = field(default_factory=list)  # (owner, name, instance attribute or None) to restore
    prompt: Optional[tuple] = None     # (input_ids, attention_mask) of the call being served
    last: dict = field(default_factory=dict)  # what the last prune kept, for inspection and demos


@dataclass(frozen=True)
class PruneRecord:
    """What the last prune of a patched model kept, one 1-D tensor per image (or video)."""

    indices: list          # (K,) int64, ascending: kept candidate tokens
    assignment: list       # (N,) int64: output position of each candidate token
    task_scores: list      # (N,) float32
    saliency: list         # (N,) float32


def last_prune(model) -> Optional[PruneRecord]:
    """The record of the last prune ``model`` ran under :func:`apply_desap` (None before any)."""
    state = getattr(model, "_desap", None)
    if state is None or not state.last:
        return None
    return PruneRecord(**{name: list(state.last[name]) for name in ("indices", "assignment", "task_scores",
                                                                      "saliency")})


def _family(model) -> str:
    name = type(model).__name__
    if name not in FAMILIES:
        raise TypeError(f"apply_desap supports {', '.join(SUPPORTED)}; got {name}")
    return FAMILIES[name]


def _feature_layer(config) -> int:
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"apply_desap needs a single vision_feature_layer, the model uses {layer}")
    count = config.vision_config.num_hidden_layers
    index = layer if layer >= 0 else count + 1 + layer
    if not 1 <= index <= count:
        raise ValueError(f"vision_feature_layer {layer} has no attention layer to read DeSAP's signals from")
    return index


STRUCTURAL_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _ignored_ids(model, extra) -> set:
    """Token ids that never count as prompt text: image/video placeholders, the markers around
    them, padding, BOS, EOS, and the caller's ``extra``."""
    ids = {getattr(model.config, name) for name in STRUCTURAL_TOKENS
           if isinstance(getattr(model.config, name, None), int)}
    for source in (model.config.text_config, getattr(model, "generation_config", None)):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
    return ids | {int(t) for t in extra}


def _tokens_per_crop(config, strategy: str) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + (0 if strategy == "default" else 1)


# --- vision side --------------------------------------------------------------------------------

def _crops_per_image(inner, image_sizes) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(image_size=size, grid_pinpoints=inner.config.image_grid_pinpoints,
                                      patch_size=inner.config.vision_config.image_size)
            for size in image_sizes]


def image_token_counts(model, pixel_values, image_sizes=None) -> list[int]:
    """How many placeholder tokens the processor gives each image (before pruning)."""
    strategy = model.config.vision_feature_select_strategy
    per_crop = _tokens_per_crop(model.config, strategy)
    if _family(model) == "llava":
        return [per_crop] * pixel_values.shape[0]
    inner = model.model
    dummies = [torch.zeros(n, per_crop, 1) for n in _crops_per_image(inner, image_sizes)]
    _, lengths = inner.pack_image_features(dummies, image_sizes, strategy, image_newline=torch.zeros(1))
    return [int(n) for n in lengths]


def _text_embeddings(model, n_images: int, device, token_id: Optional[int] = None):
    """Embeddings (I, L, C) and mask (I, L) of each image's (or video's, with its ``token_id``)
    prompt text, from the pruned prompt being served; all-masked without one."""
    state: DesapState = model._desap
    embed = model.get_input_embeddings()
    if state.prompt is None or state.prompt[0] is None:
        ids = torch.zeros(n_images, 1, dtype=torch.long, device=device)
        mask = torch.zeros(n_images, 1, dtype=torch.bool, device=device)
    else:
        input_ids, attention_mask = state.prompt
        ids, mask = image_text_tokens(input_ids, attention_mask, token_id or model.config.image_token_id,
                                      [state.keep] * n_images, state.ignored_ids)
    return embed(ids.to(device)), mask.to(device)


def _prune(model, hidden, attn, text, text_mask, saliency, keep: Optional[int] = None):
    state: DesapState = model._desap
    return api.prune(hidden, attn, text.to(attn.dtype), saliency, keep or state.keep, text_mask=text_mask,
                     task_ratio=state.task_ratio, merge=state.merge, text_reduce=state.text_reduce,
                     backend=state.backend)


def _image_features(model, inner, pixel_values, image_sizes=None, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """Replacement for ``inner.get_image_features``: the pruned, projected features of each image."""
    state: DesapState = model._desap
    if state.family == "llava_next":
        crops = _crops_per_image(inner, image_sizes)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, crops)], dim=0)
    layer = encoder_layers(inner.vision_tower)[state.feature_layer - 1]
    with capture(clip_layout(layer)) as signals:
        outputs = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        saliency = signals.cls_saliency()
        branch = signals.attention_branch
    hidden = outputs.hidden_states[state.feature_layer]
    if state.select_strategy == "default":
        hidden, branch, saliency = hidden[:, 1:], branch[:, 1:], saliency[:, 1:]
    projector = inner.multi_modal_projector

    if state.family == "llava":
        text, text_mask = _text_embeddings(model, hidden.shape[0], hidden.device)
        result = _prune(model, hidden, projector(branch), text, text_mask, saliency)
        features = list(projector(result.tokens))
        last = {"indices": result.indices, "assignment": result.assignment,
                "task_scores": result.task_scores, "saliency": saliency}
    else:
        features, last = _next_features(model, inner, hidden, branch, saliency, image_sizes)
    state.last = last
    return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state, pooler_output=features,
                                      hidden_states=outputs.hidden_states)


def _next_features(model, inner, hidden, branch, saliency, image_sizes):
    """LLaVA-NeXT: one budget per image over its base and AnyRes crops, in the model's packed order.

    The image-newline tokens stay where the model puts them (after each row of the unpadded crop
    grid, and after a lone base image) and count toward ``keep``: the visual budget of an image is
    ``keep`` minus its newline count, the kept visual tokens keep their packed order between the
    newlines, and with ``keep`` = all tokens the model gets exactly its own sequence back.
    """
    state: DesapState = model._desap
    crops = _crops_per_image(inner, image_sizes)
    projector = inner.multi_modal_projector

    def packed(tensor, newline=None):
        parts = torch.split(tensor, crops, dim=0)
        return inner.pack_image_features(parts, image_sizes, state.select_strategy, image_newline=newline)[0]

    visual_marks = packed(torch.ones_like(saliency)[..., None], newline=torch.zeros(1, dtype=saliency.dtype,
                                                                                     device=saliency.device))
    texts, text_mask = _text_embeddings(model, len(crops), hidden.device)
    features, last = [], {"indices": [], "assignment": [], "task_scores": [], "saliency": []}
    rows = zip(packed(hidden), packed(branch), packed(saliency[..., None]), visual_marks)
    for i, (h, b, s, mark) in enumerate(rows):
        is_visual = mark[:, 0] > 0
        visual_keep = state.keep - int((~is_visual).sum())
        if not 1 <= visual_keep <= h.shape[0]:
            raise ValueError(f"keep={state.keep} does not fit image {i}: it has {h.shape[0]} visual tokens "
                             f"and {int((~is_visual).sum())} image-newline tokens, which count toward keep")
        result = _prune(model, h[None], projector(b)[None], texts[i:i + 1], text_mask[i:i + 1], s[None, :, 0],
                        keep=visual_keep)
        slots = torch.zeros(mark.shape[0], dtype=torch.bool, device=mark.device)
        slots[is_visual.nonzero()[:, 0][result.indices[0]]] = True          # kept visual positions
        slots |= ~is_visual
        out = inner.image_newline.to(hidden.dtype).expand(state.keep, -1).clone()
        out[is_visual[slots]] = projector(result.tokens[0]).to(out.dtype)
        features.append(out)
        for name in ("indices", "assignment", "task_scores"):
            last[name].append(getattr(result, name)[0])
        last["saliency"].append(s[:, 0])
    return features, last


# --- language side ------------------------------------------------------------------------------

def _shrink_arguments(model, arguments: dict, with_labels: bool, pad_left: bool) -> None:
    """Shrink the image placeholder runs in ``arguments`` in place if they are the processor's."""
    pixel_values = arguments.get("pixel_values")
    if pixel_values is None:
        return
    lengths = image_token_counts(model, pixel_values, arguments.get("image_sizes"))
    shrink_runs(model, arguments, model.config.image_token_id, lengths, "image", with_labels, pad_left)


def shrink_runs(model, arguments: dict, token_id: int, lengths: list, what: str, with_labels: bool,
                pad_left: bool) -> None:
    """Keep the first ``keep`` of each run of ``token_id`` placeholders (``lengths`` long, in
    order) in ``arguments``; leave runs that already have ``keep`` alone."""
    state: DesapState = model._desap
    input_ids = arguments.get("input_ids")
    if input_ids is None:
        raise ValueError(f"apply_desap needs input_ids (not inputs_embeds) with {what} inputs: "
                         f"the {what} placeholders must be found to shrink them")
    found = count_placeholders(input_ids, token_id)
    if found == state.keep * len(lengths):
        return  # already pruned (e.g. the prefill inside generate)
    if found != sum(lengths):
        raise ValueError(f"input_ids hold {found} {what} tokens for {len(lengths)} {what}s: expected "
                         f"{sum(lengths)} (the processor's count) or {state.keep * len(lengths)} (keep per {what})")
    if state.keep > min(lengths):
        raise ValueError(f"keep={state.keep} is more than the {min(lengths)} tokens of a {what}")
    pad = model.config.text_config.pad_token_id
    shrunk = shrink_placeholders(
        first_placeholders(lengths, state.keep, input_ids.device), token_id,
        0 if pad is None else pad, input_ids, arguments.get("attention_mask"),
        arguments.get("labels") if with_labels else None, arguments.get("position_ids"), pad_left=pad_left)
    for name in ("input_ids", "attention_mask", "labels", "position_ids"):
        if shrunk[name] is not None:
            arguments[name] = shrunk[name]


def call_arguments(model, args, kwargs) -> dict:
    """A forward call's arguments by name (as the model's own forward would bind them)."""
    arguments = inspect.signature(model._desap.original_forward).bind_partial(*args, **kwargs).arguments
    arguments.update(arguments.pop("kwargs", {}))
    return arguments


def serve_forward(model, shrink, *args, **kwargs):
    """``model.forward`` under DeSAP: shrink the placeholder runs, then run with the prompt known."""
    state: DesapState = model._desap
    arguments = call_arguments(model, args, kwargs)
    shrink(model, arguments, with_labels=True, pad_left=False)
    state.prompt = (arguments.get("input_ids"), arguments.get("attention_mask"))
    try:
        return state.original_forward(**arguments)
    finally:
        state.prompt = None


def serve_generate(model, shrink, *args, **kwargs):
    """``model.generate`` under DeSAP: shrink the prompt once, before the generation loop."""
    state: DesapState = model._desap
    if args and "input_ids" not in kwargs and isinstance(args[0], torch.Tensor):
        kwargs["input_ids"], args = args[0], args[1:]
    shrink(model, kwargs, with_labels=False, pad_left=True)
    # generate may run the encoders before its loop (transformers >= 5.2x): give them the prompt
    state.prompt = (kwargs.get("input_ids"), kwargs.get("attention_mask"))
    try:
        return state.original_generate(*args, **kwargs)
    finally:
        state.prompt = None


def install_methods(model, state, replacements) -> None:
    """Save what ``replacements`` ((owner, name, function(self, ...)), ...) will shadow, then set
    each as an instance attribute that shows the replaced method's signature."""
    state.saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in replacements]
    model._desap = state
    for owner, name, function in replacements:
        setattr(owner, name, _bind(owner, function, name))


# --- public -------------------------------------------------------------------------------------

def apply_desap(model, keep: int = 64, task_ratio: float = 0.5, merge: bool = True, *,
                text_reduce: str = "max", exclude_token_ids=(), backend: str = "auto"):
    """Patch ``model`` in place so every image reaches the language model as ``keep`` tokens.

    Args:
        model: one of ``SUPPORTED``: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, LLaVA-NeXT-Video, Video-LLaVA.
        keep: tokens per image (LLaVA-NeXT: per image over its base and crops together;
            Qwen2.5-VL: language-model tokens, each a merged 2 x 2 group of patches) or, for the
            video models, per video across all its frames.
        task_ratio, merge, text_reduce, backend: as in :func:`desap_ops.prune`.
        exclude_token_ids: token ids that never count as prompt text (for example the ids of a
            chat template's "ASSISTANT:"); padding, BOS, EOS and image tokens never count.
    Returns the model.
    """
    family = _family(model)
    if getattr(model, "_desap", None) is not None:
        remove_desap(model)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    if isinstance(task_ratio, bool) or not isinstance(task_ratio, (int, float)) or not 0 <= task_ratio <= 1 \
            or math.isnan(task_ratio):
        raise ValueError(f"task_ratio must lie in [0, 1], got {task_ratio!r}")
    if text_reduce not in ("max", "mean"):
        raise ValueError(f"text_reduce must be 'max' or 'mean', got {text_reduce!r}")
    common = dict(keep=keep, task_ratio=float(task_ratio), merge=bool(merge), text_reduce=text_reduce,
                  backend=backend, ignored_ids=_ignored_ids(model, exclude_token_ids), family=family,
                  original_forward=model.forward, original_generate=model.generate)
    if family == "qwen2_5_vl":
        from . import qwen

        qwen.install(model, DesapState(feature_layer=-1, select_strategy="full", **common))
        return model
    strategy = model.config.vision_feature_select_strategy
    if family in ("llava_next_video", "video_llava"):
        from . import video

        video.install(model, DesapState(feature_layer=_feature_layer(model.config), select_strategy=strategy,
                                        **common))
        return model
    per_crop = _tokens_per_crop(model.config, strategy)
    if family == "llava" and keep > per_crop:
        raise ValueError(f"keep must lie in [1, {per_crop}] (the model's image tokens), got {keep}")
    state = DesapState(feature_layer=_feature_layer(model.config), select_strategy=strategy, **common)
    install_methods(model, state, (
        (model.model, "get_image_features", lambda self, *a, **k: _image_features(model, self, *a, **k)),
        (model, "forward", lambda self, *a, **k: serve_forward(self, _shrink_arguments, *a, **k)),
        (model, "generate", lambda self, *a, **k: serve_generate(self, _shrink_arguments, *a, **k)),
    ))
    return model


def _bind(owner, function, name: str):
    """``function`` as a method of ``owner`` that shows the replaced method's signature (generate
    validates its keyword arguments against the signature of ``forward``)."""
    def method(self, *args, **kwargs):
        return function(self, *args, **kwargs)

    method.__signature__ = inspect.signature(getattr(type(owner), name))
    method.__name__ = name
    return types.MethodType(method, owner)


def remove_desap(model):
    """Undo :func:`apply_desap`: the model's own methods again, and nothing of DeSAP left on it."""
    if getattr(model, "_desap", None) is None:
        return model
    for owner, name, previous in model._desap.saved:
        owner.__dict__.pop(name, None)
        if previous is not None:  # an instance attribute that was there before apply_desap
            setattr(owner, name, previous)
    del model._desap
    return model
