"""Multimodal rotary (M-RoPE) positions for pruned images and videos in every DeSAP Qwen family in
vLLM (Qwen2.5-VL, Qwen3-VL, Qwen3.5 and their MoE; a video is one medium: all its frames, one run of
placeholders, which in the Qwen3 generation also holds each frame's timestamp text and markers:
:func:`span_positions`).

vLLM gives each prompt token its (t, h, w) rotary position when the request arrives
(``get_mrope_input_positions``), before the encoder has chosen which image tokens survive:

- on arrival (:func:`prompt_positions`) every text token gets its final position: text after an
  image starts past the whole image's extent, whatever tokens are kept. Each image's placeholders
  get provisional positions;
- each embedding out of ``embed_multimodal`` carries :data:`CHANNELS` more channels
  (:func:`encode_fields`): the token's own (t, h, w) counted from its image's start, the image's
  extent, the token's index among the image's placeholders and their count. Each value is written
  as base-256 digits, which every float dtype (bf16 included) holds exactly;
- after the encoder, the model's ``recompute_mrope_positions`` (:func:`place_media`) finds the
  placeholders of each embedding in the window from those channels and the prompt's placeholder
  tokens alone, and writes their positions. It writes nothing else and never raises. (vLLM's EVS
  helper instead finds media by ``<|vision_start|>`` and infers where the window stands.)

The model runners call that step only when video pruning is configured; :func:`recompute_after_encoder`
makes every runner this vLLM has (V1 where it still exists, V2 always) run it for a model with
``desap_recomputes_mrope``. The runner names it hooks are groups of ``hooks.GROUPS``.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import torch

log = logging.getLogger(__name__)

FIELDS = ("t", "h", "w", "extent", "index", "count")
T, H, W, EXTENT, INDEX, COUNT = range(len(FIELDS))
RADIX, DIGITS = 256, 3          # bf16 holds the integers up to 256 exactly; 256**3 bounds every field
CHANNELS = len(FIELDS) * DIGITS


class Media(NamedTuple):
    offset: int             # first placeholder in the prompt
    length: int             # placeholders in the prompt (``keep`` for a pruned image)
    positions: torch.Tensor  # (4, grid tokens) from :func:`media_positions`


def media_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
    """(4, t * h * w) long: each token's (t, h, w) counted from the medium's start, in raster
    order and scaled in time as vLLM's Qwen2.5-VL and transformers do it, then the extent: the
    larger of ``h`` and ``w``, where the text after the medium starts (transformers'
    ``get_rope_index``; a video's time does not count, where vLLM's own Qwen2.5-VL counts it)."""
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
    if t_factor != 1.0:   # in float32, as transformers' get_rope_index computes it
        grid[0] = (grid[0] * torch.tensor(t_factor, dtype=torch.float32)).long()
    extent = torch.tensor(max(h, w))
    return torch.cat([grid, extent.expand(1, grid.shape[1])])


def span_positions(ids: Sequence[int], token_id: int, h: int, w: int) -> torch.Tensor:
    """(4, len(ids)) long, as :func:`media_positions`, for a medium whose span mixes text with its
    tokens (Qwen3-VL's video: per frame, its timestamp text, a start marker, the frame's ``h`` x
    ``w`` tokens, an end marker): each text token one past the one before; each frame's tokens
    (``token_id``, in runs of ``h * w``) at time 0 of their own grid, starting there; the next text
    one past the frame's largest position (transformers' ``get_rope_index``). Row 3: where the
    text after the span starts, one past its largest position."""
    columns, cursor, i = [], 0, 0
    frame = media_positions(1, h, w)[:3]
    while i < len(ids):
        if ids[i] == token_id:
            columns.append(frame + cursor)
            cursor += max(h, w)
            i += h * w
        else:
            columns.append(torch.full((3, 1), cursor))
            cursor += 1
            i += 1
    grid = torch.cat(columns, dim=1)
    if grid.shape[1] != len(ids):
        raise ValueError(f"a span of {len(ids)} ids whose media tokens are not in whole frames of {h} x {w}")
    return torch.cat([grid, torch.full((1, grid.shape[1]), cursor)])


def prompt_positions(prompt_length: int, media: list[Media]) -> tuple[torch.Tensor, int]:
    """(3, prompt_length) positions and vLLM's position delta for a prompt holding ``media``. A
    medium with fewer placeholders than grid tokens (a pruned image) takes its first ``length``
    positions until the encoder has run."""
    parts, start, next_position = [], 0, 0
    for medium in sorted(media, key=lambda m: m.offset):
        parts.append(torch.arange(medium.offset - start).expand(3, -1) + next_position)
        base = next_position + medium.offset - start
        parts.append(medium.positions[:3, :medium.length] + base)
        next_position = base + int(medium.positions[3, 0])
        start = medium.offset + medium.length
    parts.append(torch.arange(prompt_length - start).expand(3, -1) + next_position)
    positions = torch.cat(parts, dim=1)
    return positions, int(positions.max()) + 1 - prompt_length


def largest_position(prompt_length: int, media: list[Media]) -> int:
    """The largest position a prompt holding ``media`` (each with its full grid's positions, as
    :func:`prompt_positions` takes them) can run at, whichever tokens each medium keeps: its text's
    (final since arrival), and each medium's over every token of its grid (a kept token keeps its
    own). Equal to the largest of :func:`prompt_positions` over the unpruned prompt."""
    largest, start, next_position = -1, 0, 0
    for medium in sorted(media, key=lambda m: m.offset):
        text = medium.offset - start
        base = next_position + text
        largest = max(largest, base - 1, base + int(medium.positions[:3].max()) if medium.positions.numel() else -1)
        next_position = base + int(medium.positions[3, 0])
        start = medium.offset + medium.length
    return max(largest, next_position + prompt_length - start - 1)


def rotary_reach(prompt_length: int, media: list[Media], max_model_len: int) -> int:
    """The largest position the rotary cache is read at for such a prompt, up to ``max_model_len``
    tokens: vLLM runs generated token ``i`` at ``i`` plus the prompt's delta (its largest position
    plus one, less its length), so the last at :func:`largest_position` plus the tokens after the
    prompt."""
    return largest_position(prompt_length, media) + max(max_model_len - prompt_length, 0)


def medium_summary(positions: torch.Tensor) -> torch.Tensor:
    """(4, 1) long: all :func:`largest_position` reads of a medium's (4, N) positions (the largest
    of its first three rows, and its extent), for a cache of many media."""
    top = int(positions[:3].max()) if positions.numel() else 0
    return torch.tensor([[top], [top], [top], [int(positions[3, 0])]])


def medium_fields(positions: torch.Tensor) -> torch.Tensor:
    """(6, K) long for a medium's K placeholders, from their (4, K) :func:`media_positions`
    columns in placeholder order: those four rows, then each one's index and the count K."""
    count = positions.shape[1]
    index = torch.arange(count, device=positions.device)
    return torch.cat([positions.long(), index[None], torch.full_like(index, count)[None]])


def encode_fields(fields: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K, CHANNELS) of ``dtype``: each of the (6, K) non-negative ``fields`` as DIGITS base-RADIX
    digits, least significant first."""
    if fields.numel() and (fields.min() < 0 or fields.max() >= RADIX**DIGITS):
        raise ValueError(f"M-RoPE fields must lie in [0, {RADIX**DIGITS}), got [{fields.min()}, {fields.max()}]")
    digits = torch.stack([fields // RADIX**d % RADIX for d in range(DIGITS)], dim=-1)   # (6, K, DIGITS)
    return digits.permute(1, 0, 2).reshape(fields.shape[1], CHANNELS).to(dtype)


def with_position_channels(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A medium's (K, C) ``tokens`` in placeholder order, each followed by the CHANNELS of its
    column of ``positions`` ((4, K), from :func:`media_positions`)."""
    return torch.cat([tokens, encode_fields(medium_fields(positions), tokens.dtype).to(tokens.device)], dim=1)


def decode_fields(channels: torch.Tensor) -> torch.Tensor:
    """(K, 6) long from (K, CHANNELS) written by :func:`encode_fields`."""
    digits = channels.float().round().long().reshape(-1, len(FIELDS), DIGITS)
    scale = RADIX ** torch.arange(DIGITS, device=digits.device)
    return (digits * scale).sum(-1)


def place_media(input_ids, media_fields: Sequence[torch.Tensor], positions: torch.Tensor, num_computed_tokens: int,
                media_token_ids: Sequence[int]) -> tuple[torch.Tensor, int]:
    """The prompt's (3, N) ``positions`` with the placeholders of each embedding in the window
    set to its tokens' own positions, and vLLM's position delta.

    ``media_fields`` holds, per embedding (slice) in the window in prompt order, its (rows, 6)
    decoded fields. As vLLM's runners gather them, only the first may start inside its
    placeholders (the window starts there: at ``num_computed_tokens``), every later one starts at
    its first placeholder. The index and count fields then give each one's placeholder run, and
    the text next to that run (final since arrival) its base. A case that does not add up
    leaves the rest as it was, with a warning."""
    if not media_fields:
        return positions, int(positions.max()) + 1 - positions.shape[1]
    placed = positions.detach().cpu().clone()
    ids = torch.as_tensor(input_ids).detach().cpu()
    if ids.shape != placed.shape[1:]:
        log.warning("DeSAP M-RoPE: %d prompt ids but %d positions; positions left as they were", ids.numel(),
                    placed.shape[1])
        return positions, int(positions.max()) + 1 - positions.shape[1]
    is_media = torch.isin(ids, torch.tensor(list(media_token_ids), dtype=ids.dtype))
    cursor = num_computed_tokens
    for rows in media_fields:
        rows = rows.cpu()
        found = _locate(rows, is_media, placed, cursor)
        if found is None:
            log.warning("DeSAP M-RoPE: %d media tokens at or after prompt token %d do not match the prompt's "
                        "placeholders; their positions are left as they were", rows.shape[0], cursor)
            break
        first, base = found
        placed[:, first:first + rows.shape[0]] = rows[:, :3].T + base
        cursor = first + rows.shape[0]
    return placed.to(positions.device), int(placed.max()) + 1 - placed.shape[1]


def _locate(rows: torch.Tensor, is_media: torch.Tensor, positions: torch.Tensor, cursor: int):
    """(first prompt index of ``rows``, base position of their medium), or None if they do not fit."""
    n = is_media.shape[0]
    if rows.shape[0] == 0 or not 0 <= cursor < n:
        return None
    index, count, extent = (int(rows[0, field]) for field in (INDEX, COUNT, EXTENT))
    if index > 0:
        first = cursor   # the window starts inside this medium's placeholders
    else:
        ahead = is_media[cursor:].nonzero()
        if ahead.numel() == 0:
            return None
        first = cursor + int(ahead[0])
    start, end = first - index, first - index + count
    consistent = (0 <= start and end <= n and first + rows.shape[0] <= end and bool(is_media[start:end].all())
                  and torch.equal(rows[:, INDEX], torch.arange(index, index + rows.shape[0])))
    if not consistent:
        return None
    if start == 0:
        return first, 0
    if not is_media[start - 1]:   # text before the medium: the medium starts one past it
        return first, int(positions[:, start - 1].max()) + 1
    if end < n and not is_media[end]:   # glued to another medium: the text after starts past its extent
        return first, int(positions[:, end].max()) - extent
    return None


def recompute_after_encoder() -> None:
    """Make every model runner this vLLM has run its M-RoPE step after the encoder for a model that
    sets ``desap_recomputes_mrope``: the V1 runner where it still exists (0.32, 0.33; its CPU runner
    subclasses it), the V2 runner always, and the V2 CPU runner where it exists (0.34). Whichever
    runner the engine picks then places the kept tokens; models without the attribute are
    untouched. The names are ``hooks.V1_RUNNER`` and the V2 groups, checked before any model loads."""
    from .hooks import V1_RUNNER, V2_CPU_PRUNER, V2_GPU_PRUNER, installed_has_module

    if installed_has_module(V1_RUNNER.where):
        _turn_on_v1_step()
    _build_v2_pruner(*V2_GPU_PRUNER)
    if installed_has_module(V2_CPU_PRUNER[0]):
        _build_v2_pruner(*V2_CPU_PRUNER)


def _turn_on_v1_step() -> None:
    """The V1 runner gates the step on ``is_multimodal_pruning_enabled``, set only when video
    pruning is configured and never by its CPU subclass: set it for a DeSAP model."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    gather = GPUModelRunner._gather_mm_embeddings
    if hasattr(gather, "desap_wraps"):
        return

    def gather_and_recompute(self, *args, **kwargs):
        if getattr(self.get_model(), "desap_recomputes_mrope", False):
            self.is_multimodal_pruning_enabled = True
        return gather(self, *args, **kwargs)

    gather_and_recompute.desap_wraps = gather
    GPUModelRunner._gather_mm_embeddings = gather_and_recompute


def _build_v2_pruner(factory_module: str, pruner_module: str) -> None:
    """A V2 runner builds its ``MultiModalPruner`` (which strips the channels and calls the model's
    ``recompute_mrope_positions``) only when video pruning is configured: build one for a DeSAP
    model too. Others get what vLLM gives them."""
    import importlib

    factories = importlib.import_module(factory_module)
    pruner_class = importlib.import_module(pruner_module).MultiModalPruner
    create = factories.maybe_create_mm_pruner
    if hasattr(create, "desap_wraps"):
        return

    def create_for_desap(model_config, model, rope_state, encoder_cache):
        pruner = create(model_config, model, rope_state, encoder_cache)
        if (pruner is None and getattr(model, "desap_recomputes_mrope", False) and rope_state is not None
                and encoder_cache is not None):
            pruner = pruner_class(model, rope_state, encoder_cache, model_config.get_inputs_embeds_size())
        return pruner

    create_for_desap.desap_wraps = create
    factories.maybe_create_mm_pruner = create_for_desap
