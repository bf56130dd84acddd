"""DeSAP inside transformers' Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Qwen2.5-VL's vision encoder has no [CLS] token, runs window attention in most layers, and merges
each 2 x 2 group of patches into one language-model token. DeSAP runs at the level of those
language-model tokens:

- saliency: the attention each token *receives* at the encoder's last full-attention layer (the
  mean over queries of softmax(q k^T) within its image, averaged over heads, summed over the 2 x 2
  patches of the token). It is computed from that layer's own queries and keys (rotary applied),
  one block of queries at a time, so no attention matrix of the image is ever held, and the model's
  own attention (SDPA or flash) runs unchanged in every layer;
- attention branch: that layer's attention output, mapped to the language model's space by the
  model's own patch merger;
- hidden and metric: the merged tokens the language model receives;
- positions: the kept tokens keep their original multimodal rotary positions (temporal, height,
  width); text after an image keeps its positions too. Only the sequence gets shorter.

Which tokens survive depends on the image, so the prompt is shortened after the vision encoder
has run: in ``forward`` for a plain call, and before generation in ``generate`` (which also hands
the kept tokens' positions to the generation loop). :func:`install` patches
``model.model.get_image_features``, ``model.forward``, ``model.generate`` and generate's
``_prepare_position_ids_for_generation``. Video inputs pass through unpruned.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .compat import Hook
from .prompt import text_embeddings
from .sequence import count_placeholders, image_budget, shrink_placeholders
from .serving import install_serving, pad_token_id, run_prune, start_record
from .signals import received_attention
from .state import DesapState

HOOKS = (
    Hook("model.model.get_image_features", ("pixel_values", "image_grid_thw")),
    Hook("model.model.get_rope_index", ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask",
                                        "video_grid_thw", "second_per_grid_ts")),
    Hook("model._prepare_position_ids_for_generation", ("inputs_tensor", "model_kwargs")),
    Hook("transformers.generation.utils.GenerationMixin._prepare_position_ids_for_generation",
         ("inputs_tensor", "model_kwargs")),
    Hook("model.model.visual.blocks"),
    Hook("model.model.visual.merger"),
    Hook("model.model.language_model"),
    Hook("model.forward", ("input_ids", "pixel_values", "image_grid_thw", "attention_mask", "position_ids",
                           "mm_token_type_ids", "labels")),
    Hook("model.generate"),
    Hook("transformers.vision_utils.get_vision_window_index", ("spatial_merge_size", "window_size", "patch_size",
                                                                          "kwargs")),
    Hook("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.apply_rotary_pos_emb_vision"),
)


@contextmanager
def _capture(block):
    """Inputs and outputs of one vision block's attention: rotary tables, segments, qkv, branch."""
    store = {}

    def before(module, args, kwargs):
        store["position_embeddings"] = kwargs.get("position_embeddings")
        store["cu_seqlens"] = kwargs.get("cu_seqlens")

    def save(name):
        def hook(module, args, output):
            store[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [block.attn.register_forward_pre_hook(before, with_kwargs=True),
               block.attn.qkv.register_forward_hook(save("qkv")),
               block.attn.register_forward_hook(save("branch"))]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def saliency_layer(model: nn.Module) -> int:
    """The vision block DeSAP reads: the last full-attention block."""
    return model.config.vision_config.fullatt_block_indexes[-1]


def vision_signals(model: nn.Module, pixel_values: torch.Tensor,
                   grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per language-model token (all images, in the model's order): hidden (T', C), attention
    branch in text space (T', C), saliency (T',). Needs no patch: it reads the model as it is."""
    # here, not at the top: importing the modeling module costs seconds
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    block = visual.blocks[saliency_layer(model)]
    with _capture(block) as store:
        outputs = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
    qkv = store["qkv"]
    tokens = qkv.shape[0]
    queries, keys, _ = qkv.reshape(tokens, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = store["position_embeddings"]
    queries, keys = apply_rotary_pos_emb_vision(queries, keys, cos, sin)
    bounds = store["cu_seqlens"].tolist()
    received = received_attention(queries, keys, list(zip(bounds[:-1], bounds[1:])), block.attn.scaling)
    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size,
                                              kwargs={})
    order = torch.argsort(window_index.to(received.device))   # encoder (window) order -> model order
    saliency = received.view(-1, visual.spatial_merge_unit).sum(dim=1)[order]
    branch = visual.merger(store["branch"])[order]
    return outputs.pooler_output, branch, saliency


def _plan(model, arguments: dict, pad_left: bool) -> dict:
    """Prune every image, shorten the prompt, keep the kept tokens' positions. Returns the
    arguments for the model's own forward (or generate) and plans the features it will be given."""
    state: DesapState = model._desap
    inner = model.model
    input_ids, mask = arguments["input_ids"], arguments.get("attention_mask")
    grid = arguments["image_grid_thw"]
    sizes = (grid.prod(-1) // inner.visual.spatial_merge_unit).tolist()
    hidden, branch, saliency = vision_signals(model, arguments["pixel_values"], grid)
    texts, text_mask = text_embeddings(model, input_ids, mask, model.config.image_token_id, sizes, input_ids.device)
    start_record(model)
    features, kept = [], []
    for i, (h, b, s) in enumerate(zip(hidden.split(sizes), branch.split(sizes), saliency.split(sizes))):
        result = run_prune(model, h[None], b[None].to(h.dtype), texts[i:i + 1], text_mask[i:i + 1], s[None],
                           keep=image_budget(state.keep, h.shape[0]))   # a small image passes whole
        features.append(result.tokens[0])
        flags = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        flags[result.indices[0]] = True
        kept.append(flags)

    token_types = arguments.get("mm_token_type_ids")
    if token_types is None:
        token_types = (input_ids == model.config.image_token_id).int()
        token_types[input_ids == model.config.video_token_id] = 2
    positions = arguments.get("position_ids")
    if positions is None or positions.dim() != 3 or positions.shape[0] != 3:
        rope_arguments = {k: arguments.get(k) for k in ("video_grid_thw", "second_per_grid_ts")}
        positions, _ = inner.get_rope_index(input_ids, mm_token_type_ids=token_types, image_grid_thw=grid,
                                            attention_mask=mask, **rope_arguments)
    shrunk = shrink_placeholders(torch.cat(kept), model.config.image_token_id, pad_token_id(model), input_ids, mask,
                                 arguments.get("labels"), positions, token_types, pad_left=pad_left)
    new_mask = shrunk["attention_mask"]
    valid = new_mask.bool() if new_mask is not None else torch.ones_like(shrunk["input_ids"], dtype=torch.bool)
    top = shrunk["position_ids"].masked_fill(~valid[None], 0).amax(dim=(0, 2))
    is_image = input_ids == model.config.image_token_id
    images_per_row = (is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]).sum(dim=1)   # runs per row
    state.pending = {"features": features, "positions": shrunk["position_ids"], "images_per_row": images_per_row.tolist(),
                     "rope_deltas": (top + 1 - valid.sum(dim=1))[:, None]}
    out = {"input_ids": shrunk["input_ids"], "mm_token_type_ids": shrunk["token_types"],
           "position_ids": shrunk["position_ids"]}
    for name in ("attention_mask", "labels"):
        if shrunk[name] is not None:
            out[name] = shrunk[name]
    return out


def _needs_plan(model, arguments: dict) -> bool:
    if arguments.get("pixel_values") is None:
        return False
    input_ids, grid = arguments.get("input_ids"), arguments.get("image_grid_thw")
    if input_ids is None or grid is None:
        raise ValueError("apply_desap needs input_ids and image_grid_thw when pixel_values are given")
    state: DesapState = model._desap
    sizes = (grid.prod(-1) // model.model.visual.spatial_merge_unit).tolist()
    found = count_placeholders(input_ids, model.config.image_token_id)
    if found == sum(sizes):
        return True
    if found == sum(image_budget(state.keep, n) for n in sizes) and state.pending is not None:
        return False  # the prefill of a generate call that already planned
    raise ValueError(f"input_ids hold {found} image tokens for {len(sizes)} images: expected {sum(sizes)} "
                     "(the processor's count)")


def _prepare(model, arguments: dict, generating: bool) -> None:
    """Plan the call if it brings the processor's image placeholders (see ``serving``)."""
    if not _needs_plan(model, arguments):
        return
    arguments.update(_plan(model, arguments, pad_left=generating))
    if generating:
        arguments.pop("position_ids")  # generate prepares them (from state.pending)
    else:
        model.model.rope_deltas = model._desap.pending["rope_deltas"]


def _image_features(model, inner, pixel_values, image_grid_thw=None, **kwargs):
    """The pruned features planned for this call (the vision encoder already ran)."""
    state: DesapState = model._desap
    if state.pending is None:
        return state.originals["get_image_features"](pixel_values, image_grid_thw, **kwargs)
    return BaseModelOutputWithPooling(pooler_output=_as_expanded(state.pending, image_grid_thw))


def _as_expanded(pending: dict, grid: torch.Tensor) -> list:
    """The planned features, each row's images repeated as generate repeats them for beams or
    ``num_return_sequences`` when it expands the inputs before the encoder runs (transformers
    before 5.2x): row by row, each row's images ``repeats`` times in a row."""
    features = pending["features"]
    repeats = grid.shape[0] // max(1, len(features))
    if repeats <= 1:
        return features
    expanded, start = [], 0
    for count in pending["images_per_row"]:
        expanded += features[start:start + count] * repeats
        start += count
    return expanded


def _position_ids_for_generation(model, inputs_tensor, model_kwargs):
    """generate's 3D positions: for a planned prefill, the kept tokens' original positions."""
    state: DesapState = model._desap
    pending = state.pending
    cache = model_kwargs.get("past_key_values")
    if pending is None or (cache is not None and cache.get_seq_length() > 0):
        return state.originals["_prepare_position_ids_for_generation"](inputs_tensor, model_kwargs)
    from transformers.generation.utils import GenerationMixin  # loaded by now; costly at import time

    # the text positions generate would give a text-only model, plus the planned 3D ones
    text = GenerationMixin._prepare_position_ids_for_generation(model, inputs_tensor, model_kwargs)
    model.model.rope_deltas = pending["rope_deltas"]
    return torch.cat([text[None], pending["positions"].to(text.device)], dim=0)


def install(model: nn.Module, state: DesapState) -> None:
    """Patch a Qwen2.5-VL model: forward, generate, generate's positions, the image features."""
    install_serving(model, state, _prepare,
                    (model.model, "get_image_features", lambda inner, *a, **k: _image_features(model, inner, *a, **k)),
                    (model, "_prepare_position_ids_for_generation", _position_ids_for_generation))
