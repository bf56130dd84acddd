"""The Qwen base patcher: planned calls for the Qwen vision-language models (Qwen2.5-VL, Qwen3-VL,
Qwen3.5 and their MoE).

Which tokens survive depends on the pixels, so a Qwen call is planned before the model's own
``forward`` or ``generate`` runs: the vision tower runs once per medium (images, videos), each
image or video is pruned to at most ``keep`` tokens (``sequence.image_budget``; a video's frames
compete for one budget), the prompt loses the dropped placeholders, and the kept tokens keep the
3D rotary positions the model's own ``get_rope_index`` gives the full prompt. The model's
``get_image_features`` and ``get_video_features`` then hand out the planned tokens (and their
DeepStack levels, Qwen3-VL), and generate's position preparation hands out the planned positions.

A family supplies ``read_tower(model, pixels, grid, reads) -> TowerSignals`` (:func:`read_qwen_tower`
at its saliency block, with its rotary; only the signals the method ``reads``: without saliency and
branch, a plain pass that reads only the features) and ``output(features, levels)`` (the model
output its forward reads), then calls :func:`install`. Everything else is here, the same for every
Qwen family. What a call plans travels as a :class:`QwenPlan` on the call's context (``state.CallContext.plan``).
"""
from __future__ import annotations

from typing import AbstractSet, Callable, NamedTuple, Optional

import torch
from torch import nn

from ...methods import Signal, TokenGrid
from ...reference import merge_tokens
from ..common.hooked import Hook
from ..common.sequence import count_placeholders, drop_tokens, image_budget
from ..common.signals import (QWEN_MIDDLE, LayerTap, Taps, TowerCapture, TowerSignals, merged_keys, merged_saliency,
                              middle_block, patch_content, tower_pass, with_projected,
                              with_received)
from .serving import install_serving, pad_token_id, run_prune, start_record
from .state import DesapState, PlannedMedium, QwenPlan
from .text import text_embeddings

# the internals every Qwen patch uses through this module (each family adds its tower's own)
PLAN_HOOKS = (
    Hook("model.model.get_image_features", ("pixel_values", "image_grid_thw")),
    Hook("model.model.get_video_features", ("pixel_values_videos", "video_grid_thw")),
    Hook("model._prepare_position_ids_for_generation", ("inputs_tensor", "model_kwargs")),
    Hook("transformers.generation.utils.GenerationMixin._prepare_position_ids_for_generation",
         ("inputs_tensor", "model_kwargs")),
    Hook("model.model.visual.blocks"),
    Hook("model.model.visual.merger"),
    Hook("model.model.language_model"),
    Hook("model.forward", ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                           "attention_mask", "position_ids", "mm_token_type_ids", "labels")),
    Hook("model.generate"),
)


class Medium(NamedTuple):
    """Where one kind of visual input sits in a call's arguments and the model's config."""

    kind: str          # "image" or "video": the name of its get_<kind>_features
    pixels: str        # its pixel argument
    grid: str          # its (t, h, w) grid argument
    token_type: int    # its value in mm_token_type_ids
    token_attr: str    # the config attribute of its placeholder id


MEDIA = (Medium("image", "pixel_values", "image_grid_thw", 1, "image_token_id"),
         Medium("video", "pixel_values_videos", "video_grid_thw", 2, "video_token_id"))


# TowerSignals here: (T', .) for every language-model token of a tower pass (all items, in order),
# the merged tokens, the attention branch through the merger, the attention received summed over
# each token's 2 x 2 patches, and the DeepStack levels
ReadTower = Callable[[nn.Module, torch.Tensor, torch.Tensor, frozenset], TowerSignals]   # (model, pixels, grid, reads)
Output = Callable[[list, list], object]   # (features per item, levels x items) -> the model output
# (model, input_ids, attention_mask, lengths) -> (B, T) bool: the text the processor wrote beside a
# call's videos (Qwen3-VL's frame timestamps), which is never the user's words
VideoText = Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor], list], torch.Tensor]


# --- reading the tower ---------------------------------------------------------------------------

def read_qwen_tower(visual: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, reads: AbstractSet[str],
                    block_index: int, rotary: Callable[[], Callable],
                    window_order: Optional[Callable[[torch.device], torch.Tensor]] = None) -> TowerSignals:
    """One pass of the Qwen tower ``visual`` over images or videos (``common.signals.tower_pass``),
    read at block ``block_index``: per language-model token (all items, in the model's order) the
    merged tokens and DeepStack levels, the block's attention branch through the model's own
    merger, the saliency (``common.signals.merged_saliency``: the attention each patch receives
    within its image or frame, from the block's own queries and keys with ``rotary()`` applied,
    summed per token), and the pixel hashes; only those the method ``reads``. ``window_order``
    (Qwen2.5-VL): the index from the encoder's window order back to the model's, on a device."""
    block = visual.blocks[block_index].attn

    def rotated(attention: nn.Module, captured: TowerCapture) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries, keys) (T, H, d) as the block of ``attention`` attends with them: rotary applied."""
        qkv = captured.qkv
        queries, keys, _ = qkv.reshape(qkv.shape[0], 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        return rotary()(queries, keys, *captured.inputs["position_embeddings"])

    def saliency(attention: nn.Module, captured: TowerCapture) -> torch.Tensor:
        """The saliency at the block of ``attention`` from its captured projection and arguments."""
        queries, keys = rotated(attention, captured)
        bounds = captured.inputs["cu_seqlens"].tolist()
        order = None if window_order is None else window_order(keys.device)
        return merged_saliency(queries, keys, list(zip(bounds[:-1], bounds[1:])), attention.scaling,
                               visual.spatial_merge_unit, order)

    def read(outputs, captured: Optional[TowerCapture]) -> TowerSignals:
        levels = tuple(getattr(outputs, "deepstack_features", None) or ())
        if captured is None:
            return TowerSignals(outputs.pooler_output, levels=levels)
        order = None if window_order is None else window_order(outputs.pooler_output.device)
        branch = None
        if Signal.ATTN in reads:   # the merger on every patch's branch: only for a method that reads it
            branch = visual.merger(captured.attention)
            branch = branch if order is None else branch[order]
        keys = merged_keys(rotated(block, captured)[1], visual.spatial_merge_unit, order) \
            if Signal.KEYS in reads else None
        # the received attention (two attention passes at the block) only for a method that reads it
        read_saliency = reads & {Signal.SALIENCY, Signal.RECEIVED}
        return TowerSignals(outputs.pooler_output, branch, saliency(block, captured) if read_saliency else None,
                            levels, keys=keys)

    # HiPrune's object block: a full-attention one (its segments are the images or frames)
    middle = visual.blocks[middle_block(len(visual.blocks), QWEN_MIDDLE,
                                        getattr(visual, "fullatt_block_indexes", None))].attn

    # the block's attention gets its rotary tables and segments (cu_seqlens) by name
    signals, _ = tower_pass(reads, lambda: visual(pixels.type(visual.dtype), grid_thw=grid_thw),
                            lambda: Taps(attention=block, qkv=block.qkv, inputs=block), read,
                            lambda signals: patch_content(pixels, visual),
                            LayerTap(lambda: Taps(qkv=middle.qkv, inputs=middle),
                                     lambda captured: saliency(middle, captured)))
    # the merged tokens are the language model's rows; the saliency is the attention they receive
    return with_received(with_projected(signals, reads), reads)


# --- planning a call -----------------------------------------------------------------------------

def _present(arguments: dict) -> list[Medium]:
    return [medium for medium in MEDIA if arguments.get(medium.pixels) is not None]


def _sizes(model: nn.Module, grid: torch.Tensor) -> list[int]:
    """Language-model tokens of each item: its patches over the 2 x 2 merge."""
    return (grid.prod(-1) // model.model.visual.spatial_merge_unit).tolist()


def _grids(model: nn.Module, grid: torch.Tensor) -> list[TokenGrid]:
    """Where each item's language-model tokens lie: its frames of merged-token rows and columns."""
    merge = model.model.visual.spatial_merge_size
    return [TokenGrid(((t, h // merge, w // merge),)) for t, h, w in grid.tolist()]


def _items_per_row(input_ids: torch.Tensor, token_id: int, sizes: list[int]) -> list[int]:
    """How many items of ``sizes`` each row holds (an item's row is that of its first placeholder)."""
    flat = (input_ids == token_id).reshape(-1).nonzero()[:, 0]
    firsts = torch.tensor([0] + sizes[:-1], device=flat.device).cumsum(0)
    rows = flat[firsts] // input_ids.shape[1]
    return torch.bincount(rows, minlength=input_ids.shape[0]).tolist()


def _prune_medium(model: nn.Module, signals: TowerSignals, sizes: list[int], input_ids, mask,
                  token_id: int, written: Optional[torch.Tensor] = None,
                  grids: Optional[list[TokenGrid]] = None) -> tuple[PlannedMedium, torch.Tensor]:
    """Prune each item to its budget. Returns the planned features (and DeepStack levels, pruned
    with the same indices and merged with the same assignment) and the keep flag of every
    placeholder of this medium, in row-major order. ``written``: tokens the processor wrote beside
    the items, never their text. ``grids``: where each item's tokens lie (:func:`_grids`)."""
    options = model._desap.options
    texts, text_mask = text_embeddings(model, input_ids, mask, token_id, sizes, signals.hidden.device, written)
    features, planned_levels, flags = [], [[] for _ in signals.levels], []
    for i, item in enumerate(signals.split(sizes)):
        tokens = item.hidden.shape[0]
        result = run_prune(model, item.map(lambda t: t[None]), lambda branch: branch.to(item.hidden.dtype),
                           texts[i:i + 1], text_mask[i:i + 1],
                           keep=image_budget(options.keep, tokens),   # a small item passes whole
                           grid=None if grids is None else grids[i])
        features.append(result.tokens[0])
        for level, planned in zip(item.levels, planned_levels):
            planned.append(merge_tokens(level[None], result.indices, result.assignment, options.merges)[0])
        kept = torch.zeros(tokens, dtype=torch.bool, device=item.hidden.device)
        kept[result.indices[0]] = True
        flags.append(kept)
    planned = PlannedMedium(features, planned_levels, _items_per_row(input_ids, token_id, sizes))
    return planned, torch.cat(flags)


def _full_positions(model: nn.Module, arguments: dict, token_types: torch.Tensor) -> torch.Tensor:
    """(3, B, T): the caller's 3D positions, or the model's own for the full prompt."""
    positions = arguments.get("position_ids")
    if positions is not None and positions.dim() == 3 and positions.shape[0] == 3:
        return positions
    extra = {k: arguments[k] for k in ("second_per_grid_ts",) if arguments.get(k) is not None}
    positions, _ = model.model.get_rope_index(
        arguments["input_ids"], mm_token_type_ids=token_types, image_grid_thw=arguments.get("image_grid_thw"),
        video_grid_thw=arguments.get("video_grid_thw"), attention_mask=arguments.get("attention_mask"), **extra)
    return positions


def plan(model: nn.Module, arguments: dict, pad_left: bool, read_tower: ReadTower,
         video_text: Optional[VideoText] = None) -> dict:
    """Prune every image and video, shorten the prompt, keep the kept tokens' positions. Returns
    the arguments for the model's own forward (or generate) and plans the features it will get."""
    input_ids, mask = arguments["input_ids"], arguments.get("attention_mask")
    token_types = arguments.get("mm_token_type_ids")
    if token_types is None:
        token_types = torch.zeros_like(input_ids, dtype=torch.int)
        for medium in MEDIA:
            token_types[input_ids == getattr(model.config, medium.token_attr)] = medium.token_type
    kept = torch.ones_like(input_ids, dtype=torch.bool)
    media: dict[str, PlannedMedium] = {}
    start_record(model)
    videos = arguments.get("video_grid_thw") if arguments.get("pixel_values_videos") is not None else None
    # the processor's text beside the videos is no item's text, an image's in the same turn included
    written = None if videos is None or video_text is None else video_text(model, input_ids, mask,
                                                                           _sizes(model, videos))
    for medium in _present(arguments):
        grid, token_id = arguments[medium.grid], getattr(model.config, medium.token_attr)
        signals = read_tower(model, arguments[medium.pixels], grid, model._desap.options.reads)
        media[medium.kind], flags = _prune_medium(model, signals, _sizes(model, grid), input_ids, mask, token_id,
                                                  written, _grids(model, grid))
        kept[input_ids == token_id] = flags.to(kept.device)

    shrunk = drop_tokens(kept, pad_token_id(model), input_ids, mask, arguments.get("labels"),
                         _full_positions(model, arguments, token_types), token_types, pad_left=pad_left)
    new_mask = shrunk.attention_mask
    valid = new_mask.bool() if new_mask is not None else torch.ones_like(shrunk.input_ids, dtype=torch.bool)
    top = shrunk.position_ids.masked_fill(~valid[None], 0).amax(dim=(0, 2))
    model._desap.call.plan = QwenPlan(image=media.get("image"), video=media.get("video"),
                                      positions=shrunk.position_ids,
                                      rope_deltas=(top + 1 - valid.sum(dim=1))[:, None])
    out = {"input_ids": shrunk.input_ids, "mm_token_type_ids": shrunk.token_types,
           "position_ids": shrunk.position_ids}
    for name in ("attention_mask", "labels"):
        if getattr(shrunk, name) is not None:
            out[name] = getattr(shrunk, name)
    return out


def needs_plan(model: nn.Module, arguments: dict) -> bool:
    """True for a call that brings pixels and the processor's placeholders; False for one that
    brings none, or for the prefill of a generate call already planned (placeholders at budget)."""
    media = _present(arguments)
    if not media:
        return False
    state: DesapState = model._desap
    full, planned = True, state.call.plan is not None
    for medium in media:
        input_ids, grid = arguments.get("input_ids"), arguments.get(medium.grid)
        if input_ids is None or grid is None:
            raise ValueError(f"apply_desap needs input_ids and {medium.grid} when {medium.pixels} are given")
        sizes = _sizes(model, grid)
        budgeted = sum(image_budget(state.options.keep, n) for n in sizes)
        found = count_placeholders(input_ids, getattr(model.config, medium.token_attr))
        full &= found == sum(sizes)
        planned &= found == budgeted
        if found not in (sum(sizes), budgeted):
            raise ValueError(f"input_ids hold {found} {medium.kind} tokens for {len(sizes)} {medium.kind}s: "
                             f"expected {sum(sizes)} (the processor's count)")
    if full:
        return True
    if planned:
        return False
    raise ValueError("input_ids hold the processor's placeholder count for some media and not for others")


def prepare(model: nn.Module, arguments: dict, generating: bool, read_tower: ReadTower,
            video_text: Optional[VideoText] = None) -> None:
    """``serving``'s prepare step: plan the call if it brings the processor's placeholders."""
    if not needs_plan(model, arguments):
        return
    arguments.update(plan(model, arguments, pad_left=generating, read_tower=read_tower, video_text=video_text))
    if generating:
        arguments.pop("position_ids")  # generate prepares them (from the plan)
    else:
        model.model.rope_deltas = model._desap.call.plan.rope_deltas


# --- handing out what was planned ----------------------------------------------------------------

def as_expanded(items: list, items_per_row: list[int], grid_rows: int) -> list:
    """The planned items, each row's items repeated as generate repeats them for beams or
    ``num_return_sequences`` when it expands the inputs before the encoder runs (transformers
    before 5.18): row by row, each row's items ``repeats`` times in a row."""
    repeats = grid_rows // max(1, len(items))
    if repeats <= 1:
        return list(items)
    expanded, start = [], 0
    for count in items_per_row:
        expanded += items[start:start + count] * repeats
        start += count
    return expanded


def planned_features(model: nn.Module, kind: str, pixels, grid, output: Output, **kwargs):
    """``get_<kind>_features`` under DeSAP: the planned tokens (the tower already ran), or the
    model's own method for a call that was not planned."""
    state: DesapState = model._desap
    planned = None if state.call.plan is None else state.call.plan.medium(kind)
    if planned is None:
        return state.patch.originals[f"get_{kind}_features"](pixels, grid, **kwargs)
    expand = lambda items: as_expanded(items, planned.items_per_row, grid.shape[0])  # noqa: E731
    return output(expand(planned.features), [expand(level) for level in planned.levels])


def position_ids_for_generation(model: nn.Module, inputs_tensor, model_kwargs):
    """generate's 3D positions: for a planned prefill, the kept tokens' original positions."""
    state: DesapState = model._desap
    plan = state.call.plan
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if plan is None or (cache is not None and cache.get_seq_length() > 0):
        return state.patch.originals["_prepare_position_ids_for_generation"](inputs_tensor, model_kwargs)
    from transformers.generation.utils import GenerationMixin  # loaded by now; costly at import time

    # the text positions generate would give a text-only model, plus the planned 3D ones
    text = GenerationMixin._prepare_position_ids_for_generation(model, inputs_tensor, model_kwargs)
    model.model.rope_deltas = plan.rope_deltas
    return torch.cat([text[None], plan.positions.to(text.device)], dim=0)


def install(model: nn.Module, state: DesapState, read_tower: ReadTower, output: Output,
            video_text: Optional[VideoText] = None) -> None:
    """Patch a Qwen model: forward, generate, generate's positions, the image and video features.
    ``video_text``: the family's processor writes text beside its videos' frames (Qwen3-VL)."""
    def image_features(inner, pixel_values, image_grid_thw=None, **kwargs):
        return planned_features(model, "image", pixel_values, image_grid_thw, output, **kwargs)

    def video_features(inner, pixel_values_videos, video_grid_thw=None, **kwargs):
        return planned_features(model, "video", pixel_values_videos, video_grid_thw, output, **kwargs)

    install_serving(model, state,
                    lambda m, arguments, generating: prepare(m, arguments, generating, read_tower, video_text),
                    (model.model, "get_image_features", image_features),
                    (model.model, "get_video_features", video_features),
                    (model, "_prepare_position_ids_for_generation", position_ids_for_generation))
