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
    leaves the rest as it was, with a warning.

    It runs on the device ``positions`` live on (:func:`place_on_device`): V1 hands the host's
    positions and a list of ids, so only the window's fields cross, in one copy; V2 hands device
    positions and ids, so nothing crosses but the delta and whether every embedding fitted, read
    back together once (the delta is a host int in both runners)."""
    if not media_fields:
        return positions, int(positions.max()) + 1 - positions.shape[1]
    device = positions.device
    ids = torch.as_tensor(input_ids, device=device)
    n = positions.shape[1]
    if ids.shape != (n,):
        log.warning("DeSAP M-RoPE: %d prompt ids but %d positions; positions left as they were", ids.numel(), n)
        return positions, int(positions.max()) + 1 - n
    if not 0 <= num_computed_tokens < n:
        log.warning("DeSAP M-RoPE: the window starts at prompt token %d of %d; positions left as they were",
                    num_computed_tokens, n)
        return positions, int(positions.max()) + 1 - n
    sizes = [rows.shape[0] for rows in media_fields]
    # one copy for the whole window where the fields live elsewhere (V1: the host), none where not
    fields = torch.cat([rows.reshape(-1, len(FIELDS)) for rows in media_fields]).to(device).long()
    placed, placed_ok, cursors = place_on_device(ids, fields.split(sizes), positions, num_computed_tokens,
                                                 media_token_ids)
    summary = torch.cat([placed.max().view(1).long(), placed_ok.long(), cursors]).tolist()   # the one read-back
    largest, fitted, at = summary[0], summary[1:1 + len(sizes)], summary[1 + len(sizes):]
    if not all(fitted):
        k = fitted.index(0)
        log.warning("DeSAP M-RoPE: %d media tokens at or after prompt token %d do not match the prompt's "
                    "placeholders; their positions are left as they were", sizes[k], at[k])
    return placed, largest + 1 - n


def place_on_device(ids: torch.Tensor, media_fields: Sequence[torch.Tensor], positions: torch.Tensor,
                    num_computed_tokens: int, media_token_ids: Sequence[int]):
    """:func:`place_media`'s work, on the device of ``positions`` (``ids`` (N,) and the fields there
    too), with no read-back to the host: no ``.item()``, no data-dependent shape, no branch on a
    device value; every index clamped into range (an index out of range on a GPU is a device fault
    that no ``except`` catches). Each embedding is placed, or its columns rewritten with their own
    values, under a device flag: the flags of those before it and its own fit.

    Returns the placed (3, N) positions (a copy), each embedding's flag (K,) bool and the prompt
    token its search started at (K,) long (for the warning)."""
    n = positions.shape[1]
    device = positions.device
    is_media = torch.zeros(n, dtype=torch.bool, device=device)
    for token in media_token_ids:
        is_media |= ids == token
    column = torch.arange(n, device=device)
    # the first media token at or after each prompt index (n where none): a reversed running minimum
    ahead = torch.where(is_media, column, n).flip(0).cummin(0).values.flip(0)
    ahead = torch.cat([ahead, ahead.new_full((1,), n)])                    # index n: none
    media_before = torch.cat([column.new_zeros(1), is_media.long().cumsum(0)])   # media tokens in [0, i)
    top = positions.max(dim=0).values.long()   # text columns never change, so each one's largest position holds
    placed = positions.clone()
    alive = torch.ones(1, dtype=torch.bool, device=device)
    cursor = torch.full((1,), num_computed_tokens, dtype=torch.long, device=device)
    flags, cursors = [], []
    for rows in media_fields:
        count_rows = rows.shape[0]
        cursors.append(cursor)
        if count_rows == 0:
            alive = alive & False
            flags.append(alive)
            continue
        head = rows.narrow(0, 0, 1)   # (1, 6): no Python indexing, which wants a real device
        index, count, extent = head.select(1, INDEX), head.select(1, COUNT), head.select(1, EXTENT)
        inside = cursor.clamp(0, n)
        # a later embedding starts at its first placeholder; the first may start inside its medium
        first = torch.where(index > 0, cursor, ahead.gather(0, inside))
        start, end = first - index, first - index + count
        in_prompt = (cursor < n) & (first < n) & (start >= 0) & (end <= n) & (first + count_rows <= end)
        lo, hi = start.clamp(0, n), end.clamp(0, n)
        all_media = media_before.gather(0, hi) - media_before.gather(0, lo) == hi - lo
        in_order = (rows.select(1, INDEX) == index + torch.arange(count_rows, device=device)).all().view(1)
        before, after = (start - 1).clamp(0, n - 1), end.clamp(0, n - 1)
        text_before = (start > 0) & is_media.gather(0, before).logical_not()
        text_after = (end < n) & is_media.gather(0, after).logical_not()
        # the text before the medium: it starts one past it; glued to another medium: the text after
        # starts past its extent
        base = torch.where(start == 0, 0, torch.where(text_before, top.gather(0, before) + 1,
                                                      top.gather(0, after) - extent))
        fits = alive & in_prompt & all_media & in_order & ((start == 0) | text_before | text_after)
        targets = (first + torch.arange(count_rows, device=device)).clamp(0, n - 1)
        new = (rows.narrow(1, 0, 3).T + base).to(placed.dtype)
        placed.index_copy_(1, targets, torch.where(fits, new, placed.index_select(1, targets)))
        alive = fits
        flags.append(fits)
        cursor = first + count_rows
    return placed, torch.cat(flags), torch.cat(cursors)


def recompute_after_encoder() -> None:
    """Make every model runner this vLLM has run its M-RoPE step after the encoder for a model that
    sets ``desap_recomputes_mrope``: the V1 runner where it still exists (0.32, 0.33; its CPU runner
    subclasses it), the V2 runner always, and the V2 CPU runner where it exists (0.34) and the
    platform is the CPU: elsewhere no engine runs it, and importing it would load the CPU build's
    ops (``vllm._cpu_ops``) into a GPU worker. Whichever runner the engine picks then places the
    kept tokens; models without the attribute are untouched. The names are ``hooks.V1_RUNNER``,
    the V2 groups and ``hooks.CPU_PLATFORM``, checked before any model loads."""
    from .hooks import V1_RUNNER, V2_CPU_PRUNER, V2_GPU_PRUNER, installed_has_module

    if installed_has_module(V1_RUNNER.where):
        _turn_on_v1_step()
    _build_v2_pruner(*V2_GPU_PRUNER)
    if _on_cpu() and installed_has_module(V2_CPU_PRUNER[0]):   # the platform first: the lookup imports packages
        _build_v2_pruner(*V2_CPU_PRUNER)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


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
