"""The M-RoPE positions the vLLM plugin gives Qwen2.5-VL prompts (``integrations/vllm/mrope.py``),
against transformers' own ``get_rope_index``: on arrival, and after the recompute step placed the
kept tokens of every window a chunked or prefix-cached prefill can schedule. Pure torch: runs
without vLLM."""
import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from desap_ops.testing.tiny import QWEN_IMAGE as IMG, QWEN_VIDEO as VID, tiny_qwen2_5_vl
from desap_ops.integrations.vllm.mrope import (CHANNELS, Media, decode_fields, encode_fields, largest_position,
                                               media_positions, medium_fields, medium_summary, place_media,
                                               place_on_device, prompt_positions, rotary_reach, span_positions)

START, END = 153, 154
# one wide and one tall image (grids in patches; 2 x 2 patches make a token): 2 x 6 and 6 x 2 tokens
GRIDS = [[1, 4, 12], [1, 12, 4]]


def _prompt(lengths, preamble=(1, 5)):
    ids = list(preamble)
    offsets = []
    for length, between in zip(lengths, ([7, 8], [9, 10, 11])):
        ids.append(START)
        offsets.append(len(ids))
        ids += [IMG] * length + [END] + between
    return ids, offsets


def _transformers_positions(ids):
    model = tiny_qwen2_5_vl()
    input_ids = torch.tensor([ids])
    positions, deltas = model.model.get_rope_index(input_ids, mm_token_type_ids=(input_ids == IMG).int(),
                                                   image_grid_thw=torch.tensor(GRIDS))
    return positions[:, 0], int(deltas[0])


def _media(offsets, lengths):
    return [Media(offset, length, media_positions(t, h // 2, w // 2))
            for offset, length, (t, h, w) in zip(offsets, lengths, GRIDS)]


def test_unpruned_prompt_positions_are_transformers_positions():
    ids, offsets = _prompt([12, 12])
    expected, delta = _transformers_positions(ids)
    got, got_delta = prompt_positions(len(ids), _media(offsets, [12, 12]))
    assert torch.equal(got, expected) and got_delta == delta


@pytest.mark.parametrize("kept", [([0, 5, 11], [1, 2, 10]), ([6, 7, 8], [0, 3, 4])])
def test_pruned_prompt_text_positions_are_final_and_kept_tokens_take_their_original_ones(kept):
    full_ids, full_offsets = _prompt([12, 12])
    full, _ = _transformers_positions(full_ids)
    ids, offsets = _prompt([3, 3])
    got, _ = prompt_positions(len(ids), _media(offsets, [3, 3]))

    # what apply_desap feeds the language model: the original positions of the tokens it keeps
    columns = [i for i, t in enumerate(full_ids) if t != IMG]
    for offset, indices in zip(full_offsets, kept):
        columns += [offset + i for i in indices]
    wanted = full[:, sorted(columns)]
    is_text = torch.tensor(ids) != IMG
    assert torch.equal(got[:, is_text], wanted[:, is_text])   # text is final before the encoder runs

    # the encoder's position channels, placed the way vLLM's recompute step places them
    for offset, indices, medium in zip(offsets, kept, _media(offsets, [3, 3])):
        base = int(got[0, offset - 1]) + 1          # after <|vision_start|>
        got[:, offset:offset + 3] = medium.positions[:3, indices] + base
    assert torch.equal(got, wanted)


def test_media_positions_scale_time_and_give_the_extent():
    positions = media_positions(3, 2, 5, t_factor=0.5)
    assert positions.shape == (4, 30)
    assert positions[0].unique().tolist() == [0, 1]          # int(0.5 * t) for t = 0, 1, 2
    assert positions[3].unique().tolist() == [5]            # the widest axis
    assert media_positions(1, 6, 2)[3, 0] == 6               # a tall image: its height, not its width


KEPT = ([0, 5, 11], [1, 2, 10])


def _pruned_case(preamble):
    """A pruned prompt's ids, its positions on arrival, each image's kept fields and the positions
    apply_desap gives it in transformers."""
    full_ids, full_offsets = _prompt([12, 12], preamble)
    full, _ = _transformers_positions(full_ids)
    columns = [i for i, t in enumerate(full_ids) if t != IMG]
    for offset, indices in zip(full_offsets, KEPT):
        columns += [offset + i for i in indices]
    ids, offsets = _prompt([3, 3], preamble)
    arrival, _ = prompt_positions(len(ids), _media(offsets, [3, 3]))
    fields = [medium_fields(medium.positions[:, indices]).T
              for medium, indices in zip(_media(offsets, [3, 3]), KEPT)]
    return ids, offsets, arrival, fields, full[:, sorted(columns)]


def _window(offsets, fields, start, end):
    """What vLLM's runners gather for the window [start, end): per medium overlapping it, its rows
    inside the window, in prompt order."""
    out = []
    for offset, rows in zip(offsets, fields):
        first, last = max(start - offset, 0), min(end - offset, rows.shape[0])
        if first < last:
            out.append(rows[first:last])
    return out


@pytest.mark.parametrize("preamble", [(1,), (1, 5), tuple(range(3, 13)), tuple(range(3, 45))])
def test_every_chunking_and_prefix_cache_start_gives_transformers_positions(preamble):
    ids, offsets, arrival, fields, wanted = _pruned_case(preamble)
    for cached in range(len(ids)):          # tokens from the prefix cache: their positions do not matter
        for chunk in (1, 2, 3, 5, len(ids)):
            positions = arrival.clone()
            for start in range(cached, len(ids), chunk):
                window = _window(offsets, fields, start, min(start + chunk, len(ids)))
                positions, delta = place_media(ids, window, positions, start, (IMG, VID))
            assert torch.equal(positions[:, cached:], wanted[:, cached:]), (cached, chunk)
            assert delta == int(wanted.max()) + 1 - len(ids)


def test_fields_survive_bf16_and_fp16_exactly_and_place_positions_past_256():
    fields = torch.tensor([[0, 255, 256, 257, 1000, 65535, 70001, 16_777_215]] * 6)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        channels = encode_fields(fields, dtype)
        assert channels.shape == (8, CHANNELS) and channels.dtype == dtype
        assert torch.equal(decode_fields(channels), fields.T)
    # a 2 x 300 grid (t_factor 1): kept tokens at w > 256, a base past 256 as well
    ids = [1] * 400 + [IMG] * 4 + [2, 3]
    medium = media_positions(1, 2, 300)
    arrival, _ = prompt_positions(len(ids), [Media(400, 4, medium)])
    kept = medium[:, [3, 290, 300, 599]]
    rows = decode_fields(encode_fields(medium_fields(kept), torch.bfloat16))
    positions, _ = place_media(ids, [rows], arrival, 0, (IMG, VID))
    assert positions[:, 400:404].tolist() == (kept[:3] + 400).tolist()
    assert positions[:, 404].tolist() == [700] * 3    # text after: past the image's extent of 300


def test_glued_media_take_their_base_from_the_text_after_them():
    medium = media_positions(1, 2, 6)
    ids = [1, 2] + [IMG] * 3 + [IMG] * 3 + [5]          # two images, no token between them
    media = [Media(2, 3, medium), Media(5, 3, medium)]
    arrival, _ = prompt_positions(len(ids), media)
    kept = ([0, 7, 11], [1, 2, 6])
    fields = [medium_fields(medium[:, k]).T for k in kept]
    for start in range(len(ids)):       # any window start, one token at a time
        positions = arrival.clone()
        for s in range(start, len(ids)):
            positions, _ = place_media(ids, _window([2, 5], fields, s, s + 1), positions, s, (IMG, VID))
        wanted = [medium[:3, k] + base for k, base in zip(kept, (2, 8))]
        assert torch.equal(positions[:, max(start, 2):8], torch.cat(wanted, dim=1)[:, max(start, 2) - 2:])


def test_a_window_that_does_not_match_the_prompt_leaves_positions_and_warns(caplog):
    ids, offsets, arrival, fields, _ = _pruned_case((1, 5))
    with caplog.at_level(logging.WARNING):
        # the window claims to start inside the first image, but the prompt has text there
        positions, delta = place_media(ids, [fields[0][1:]], arrival, 0, (IMG, VID))
        assert torch.equal(positions, arrival) and delta == int(arrival.max()) + 1 - len(ids)
        # an image the prompt holds no placeholders for
        positions, _ = place_media(ids, [fields[0]], arrival, len(ids) - 1, (IMG, VID))
        assert torch.equal(positions, arrival)
        # more ids than positions
        positions, _ = place_media(ids + [1], [fields[0]], arrival, 0, (IMG, VID))
        assert torch.equal(positions, arrival)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3
    assert place_media(ids, [], arrival, 0, (IMG, VID))[0] is arrival   # nothing in the window: untouched


class _HostOutputs(TorchDispatchMode):
    """Records every op whose output lies off the CUDA device (a copy to the host)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type != "cuda" for t in tree_leaves(out)):
            self.ops.append(func)
        return out


def test_placing_on_a_gpu_reads_nothing_back_and_copies_nothing_to_the_host():
    """``place_on_device`` on fake CUDA tensors (shapes and devices, no values): any read-back
    (``.item()``, ``int()``, ``bool()``, ``nonzero``, a data-dependent shape) raises here, and every
    op's output must stay on the device. The values it computes are the ones the tests above check
    through ``place_media``."""
    ids, offsets = _prompt([3, 3])
    media = _media(offsets, [3, 3])
    arrival, _ = prompt_positions(len(ids), media)
    fields = [medium_fields(medium.positions[:, [0, 5, 11]]).T for medium in media]
    window = _window(offsets, fields, 4, len(ids))   # starts inside the first image: both images
    with FakeTensorMode():
        fake_ids = torch.empty(len(ids), dtype=torch.long, device="cuda")
        fake_positions = torch.empty(arrival.shape, dtype=torch.long, device="cuda")
        fake_fields = [torch.empty(rows.shape, dtype=torch.long, device="cuda") for rows in window]
        with _HostOutputs() as host:
            placed, fits, cursors = place_on_device(fake_ids, fake_fields, fake_positions, 4, (IMG, VID))
    assert host.ops == []
    assert placed.device.type == fits.device.type == cursors.device.type == "cuda"
    assert placed.shape == arrival.shape and fits.shape == cursors.shape == (len(window),)


def _random_medium(rng: torch.Generator) -> torch.Tensor:
    """A medium's full (4, N) positions: an image, a Qwen2.5-VL video whose time runs past its extent,
    or a Qwen3 video span (timestamp text around each frame)."""
    kind = int(torch.randint(3, (1,), generator=rng))
    h, w = (int(n) for n in torch.randint(1, 9, (2,), generator=rng))
    if kind == 0:
        return media_positions(1, h, w)
    t = int(torch.randint(2, 6, (1,), generator=rng))
    if kind == 1:
        return media_positions(t, h, w, t_factor=float(torch.randint(1, 9, (1,), generator=rng)))
    ids = []
    for _ in range(t):
        ids += [7] * int(torch.randint(1, 4, (1,), generator=rng)) + [START] + [VID] * (h * w) + [END]
    return span_positions(ids, VID, h, w)


@pytest.mark.parametrize("seed", range(40))
def test_the_rotary_reach_bounds_every_position_kept_tokens_and_generation_run_at_and_is_reached(seed):
    """``rotary_reach`` (what the processor refuses past the rotary cache) bounds every position the
    plugin can produce for a prompt, whichever tokens each medium keeps, up to ``max_model_len``
    tokens (vLLM: generated token i at i + delta), and is reached when the top token is kept. Its
    ``largest_position`` is the unpruned prompt's largest, and a medium's summary gives the same."""
    rng = torch.Generator().manual_seed(seed)
    ids, full_ids, media, full_media, kept = [1], [1], [], [], []
    for _ in range(int(torch.randint(1, 4, (1,), generator=rng))):
        positions = _random_medium(rng)
        n = positions.shape[1]
        keep = int(torch.randint(1, n + 1, (1,), generator=rng))
        chosen = torch.randperm(n, generator=rng)[:keep].sort().values
        if seed % 2 == 0:   # half the cases keep the medium's top token: the bound is reached
            top = int(positions[:3].max(dim=0).values.argmax())
            chosen = torch.unique(torch.cat([chosen[1:], torch.tensor([top])]))
        media.append(Media(len(ids), len(chosen), positions))
        full_media.append(Media(len(full_ids), n, positions))
        kept.append(chosen)
        between = [5] * int(torch.randint(1, 4, (1,), generator=rng))   # a marker at least, as every prompt has
        ids += [IMG] * len(chosen) + between
        full_ids += [IMG] * n + between
    max_model_len = len(ids) + int(torch.randint(1, 50, (1,), generator=rng))

    largest = largest_position(len(ids), media)
    assert largest == int(prompt_positions(len(full_ids), full_media)[0].max())
    summaries = [Media(m.offset, m.length, medium_summary(m.positions)) for m in media]
    assert largest_position(len(ids), summaries) == largest

    arrival, _ = prompt_positions(len(ids), media)
    fields = [medium_fields(m.positions[:, k]).T for m, k in zip(media, kept)]
    placed, delta = place_media(ids, fields, arrival, 0, (IMG, VID))
    generated = [i + delta for i in range(len(ids), max_model_len)]
    reach = rotary_reach(len(ids), media, max_model_len)
    assert max(int(placed.max()), *generated) <= reach
    assert int(arrival.max()) <= reach   # the provisional positions before the encoder too
    if seed % 2 == 0:
        assert generated[-1] == reach
