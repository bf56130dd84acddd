"""``desap bench e2e``: prefill of a whole model with and without DeSAP, for every model in
:data:`desap_ops.cli.models.MODELS` (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT-Video,
Video-LLaVA).

For each budget K three prefills of the same model on the same batch (per row: one image, or one
video, and 32 text tokens; logits of the last position only, as generate's prefill):

- full: the unpatched model, N image (or video) tokens;
- desap: ``apply_desap(model, keep=K)``, all of DeSAP's work included;
- ideal: the model fed K tokens with no pruning work at all, the speed DeSAP could reach if pruning
  cost nothing. The vision tower runs on every token (pruning after the encoder cannot save it),
  then only the first K feature tokens go through the projector (LLaVA-NeXT: the first K of its
  packed order, image-newlines in place; the video models: the first K of the clip, frame-major).
  The Qwen projector (the patch merger) is part of the vision encoder, which DeSAP runs on every
  patch too: there the ideal takes the encoder's first K tokens, at their original positions (and
  Qwen3-VL's DeepStack levels their first K).

Timing: rounds after one warm-up round; in each round, for each K, full, desap and ideal run one
after another, so load from other processes hits all three alike; each time is the median over
the rounds (CUDA events on CUDA), and the ratios are ratios of those medians. The LLaVA-1.5 and
LLaVA-NeXT layouts also time the vision tower alone once per round.

FLOPs come from ``torch.utils.flop_counter`` (with a formula for SDPA's CPU kernel, which torch
leaves uncounted). For the LLaVA-1.5 and LLaVA-NeXT layouts they are counted over the pieces
(vision tower, projector, DeSAP's operator, language model) on a meta copy of the model, so
``--device meta`` counts them at any size without memory. The Qwen and video models count them on
the real forward passes (the prompt surgery reads token ids); with ``--device meta`` those passes
run on a CPU under :class:`ShapesOnly`, with parameters that hold no memory: every counted op runs
on meta and gives zeros, the rest for real, so the count is exact at any size (the same as a real
forward's; tests/cli/test_bench_e2e.py compares them) and a few GiB suffice. Real model shapes
carry random weights: the timings hold for any weights; the outputs mean nothing. Before
building, the model's memory is estimated and compared with what the device has free, so a model
that cannot fit is refused instead of killed.
"""
from __future__ import annotations

import os
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count
from transformers.modeling_outputs import BaseModelOutputWithPooling

from desap_ops import ops
from desap_ops.integrations import apply_desap, image_token_counts, remove_desap
from desap_ops.integrations.common.layout import crops_per_image, drops_cls, tokens_per_crop
from desap_ops.integrations.common.sequence import first_placeholders, shrink_placeholders
from desap_ops.integrations.hf.video import tokens_per_frame

from .errors import UsageError
from .models import MODELS, build_model, weight_bytes
from .report import DTYPES, environment, time_call_ms

if TYPE_CHECKING:   # matplotlib is imported when a plot is asked for
    from matplotlib.figure import Figure

TEXT_TOKENS = 32
PIECEWISE = ("llava", "llava_next")   # families whose FLOPs are counted from the pieces
QWEN = ("qwen2_5_vl", "qwen3_vl")     # families whose vision encoder merges 2 x 2 patches (merger included)
FRAMES = {True: 3, False: 8}          # frames per video: tiny, real shape
QWEN_GRID = {True: 8, False: 48}      # patches per side of the Qwen image: tiny, real shape (ModelSpec.grid first)
WARMUP_ROUNDS = 1
VARIANTS = ("full", "desap", "ideal")
GIB = 2**30
# Memory a run needs beyond its weights: activations of one prefill (CPU attention holds its
# scores), the allocator's slack and the FLOP counter's meta copy, as a share of the weights plus a
# fixed part.
MEMORY_MARGIN, MEMORY_FIXED = 0.25, 1 * GIB


@dataclass
class Batch:
    inputs: dict
    tokens: int        # placeholder tokens per image or video (before pruning)
    token_id: int      # the placeholder's id
    features: str      # the model's method that returns those tokens' features


def _pooled(model) -> bool:
    """Whether the video model pools each frame (LLaVA-NeXT-Video under "default" drops [CLS] and pools)."""
    return model.config.model_type == "llava_next_video" and drops_cls(model.config)


def _prompt(batch: int, text: torch.Tensor, *runs: torch.Tensor) -> torch.Tensor:
    """BOS, then ``runs`` (the image or video placeholders and their markers), then the text."""
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), *runs, text], dim=1)


def make_batch(model: nn.Module, name: str, batch: int, device: str, dtype: torch.dtype) -> Batch:
    """One image or video and ``TEXT_TOKENS`` text tokens per row, with the processor's placeholder
    count, for any model of :data:`MODELS` (``model`` is ``build_model(name, ...)``)."""
    spec = MODELS[name]
    config = model.config
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, min(1000, config.text_config.vocab_size), (batch, TEXT_TOKENS), generator=gen)
    full = lambda n, token: torch.full((batch, n), token)  # noqa: E731
    if spec.family in PIECEWISE:
        side = config.vision_config.image_size
        if spec.family == "llava_next":
            pixels = torch.randn(batch, 5, 3, side, side, generator=gen)
            inputs = {"image_sizes": torch.tensor([[2 * side, 2 * side]] * batch)}
        else:
            pixels = torch.randn(batch, 3, side, side, generator=gen)
            inputs = {}
        tokens = image_token_counts(model, pixels, inputs.get("image_sizes"))[0]
        token_id, features = config.image_token_id, "get_image_features"
        text[text == token_id] = 3
        inputs.update(input_ids=_prompt(batch, text, full(tokens, token_id)), pixel_values=pixels.to(dtype))
    elif spec.family in QWEN:   # one image of side x side patches, between the vision markers
        side, vision = spec.grid or QWEN_GRID[spec.tiny], config.vision_config
        tokens = side * side // 4
        token_id, features = config.image_token_id, "get_image_features"
        text[(text == token_id) | (text >= 150)] = 3
        ids = _prompt(batch, text, full(1, config.vision_start_token_id), full(tokens, token_id),
                      full(1, config.vision_end_token_id))
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(batch * side * side, width, generator=gen)
        inputs = dict(input_ids=ids, pixel_values=pixels.to(dtype), mm_token_type_ids=(ids == token_id).int(),
                      image_grid_thw=torch.tensor([[1, side, side]] * batch))
    else:  # the video models
        frames, size = FRAMES[spec.tiny], config.vision_config.image_size
        tokens = frames * tokens_per_frame(model, _pooled(model))
        token_id, features = config.video_token_id, "get_video_features"
        text[text == token_id] = 3
        videos = torch.randn(batch, frames, 3, size, size, generator=gen)
        inputs = dict(input_ids=_prompt(batch, text, full(tokens, token_id)), pixel_values_videos=videos.to(dtype))
    return Batch({k: v.to(device) for k, v in inputs.items()}, tokens, token_id, features)


# --- the ideal: K tokens, no pruning work ----------------------------------------------------------

def _feature_tokens(model, tower, pixels: torch.Tensor, drop_cls: bool) -> torch.Tensor:
    """(crops or frames, T, D): ``tower``'s hidden states at the model's feature layer, the tokens
    the model's projector takes."""
    outputs = tower(pixels, output_hidden_states=True, return_dict=True)
    hidden = outputs.hidden_states[model.config.vision_feature_layer]
    return hidden[:, 1:] if drop_cls else hidden


def _first_of_each(level, tokens: int, keep: int):
    """The first ``keep`` tokens of each image of a DeepStack level: per image (transformers >= 5.18)
    or one tensor of ``tokens`` per image (before)."""
    if isinstance(level, torch.Tensor):
        return torch.cat([image[:keep] for image in level.split(tokens)])
    return [image[:keep] for image in level]


def _ideal_features(model, family: str, batch: Batch, keep: int, original: Callable) -> Callable:
    """Replacement for the model's ``get_image_features`` / ``get_video_features``: each image's or
    video's first ``keep`` tokens, only those projected (see the module docstring)."""
    inner, config = model.model, model.config
    if family in QWEN:   # the encoder (merger included) on every patch, then the first K of each image
        def cut(*args, **kwargs):
            out = original(*args, **kwargs)
            out.pooler_output = [f[:keep] for f in out.pooler_output]
            if getattr(out, "deepstack_features", None):   # Qwen3-VL: each DeepStack level too
                out.deepstack_features = [_first_of_each(level, batch.tokens, keep)
                                          for level in out.deepstack_features]
            return out
        return cut

    project = inner.multi_modal_projector
    drop = drops_cls(config)
    if family == "llava":
        def features(pixel_values, **_):
            tokens = _feature_tokens(model, inner.vision_tower, pixel_values, drop)
            return list(project(tokens[:, :keep]))
    elif family == "llava_next":
        sizes = batch.inputs["image_sizes"]
        crops = crops_per_image(config, sizes)
        strategy = config.vision_feature_select_strategy
        # which of each image's first ``keep`` packed slots hold a visual token (the rest: image-newlines)
        ones = [torch.ones(n, tokens_per_crop(config), 1) for n in crops]
        marks = inner.pack_image_features(ones, sizes.cpu(), strategy, image_newline=torch.zeros(1))[0]
        visual = [m[:keep, 0].bool().to(sizes.device) for m in marks]

        def features(pixel_values, image_sizes, **_):
            if pixel_values.dim() == 5:
                pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, crops)], dim=0)
            tokens = _feature_tokens(model, inner.vision_tower, pixel_values, drop)
            packed = inner.pack_image_features(torch.split(tokens, crops), image_sizes, strategy,
                                               image_newline=tokens.new_zeros(tokens.shape[-1]))[0]
            out = []
            for row, is_visual in zip(packed, visual):
                image = inner.image_newline.to(tokens.dtype).expand(keep, -1).clone()
                image[is_visual] = project(row[:keep][is_visual]).to(image.dtype)
                out.append(image)
            return out
    elif family in ("llava_next_video", "video_llava"):
        tower = inner.video_tower if family == "video_llava" else inner.vision_tower

        def features(pixel_values_videos, **_):
            videos = pixel_values_videos.shape[0]
            # transformers: LLaVA-NeXT-Video drops [CLS] under "default" and pools; Video-LLaVA keeps all
            tokens = _feature_tokens(model, tower, pixel_values_videos.flatten(0, 1),
                                     drop and family == "llava_next_video")
            if family == "llava_next_video":
                tokens = inner.vision_resampler(tokens)
            return project(tokens.reshape(videos, -1, tokens.shape[-1])[:, :keep])
    else:
        raise ValueError(f"no ideal for the family {family}")
    return lambda *args, **kwargs: BaseModelOutputWithPooling(pooler_output=features(*args, **kwargs))


@contextmanager
def ideal_inputs(model: nn.Module, family: str, batch: Batch, keep: int) -> Iterator[dict]:
    """The ideal call's inputs (K placeholders per image or video), with the model's feature method
    replaced by :func:`_ideal_features` while inside."""
    inner = model.model
    inputs = batch.inputs
    ids = inputs["input_ids"]
    flags = first_placeholders([batch.tokens] * ids.shape[0], keep, ids.device)
    positions = None
    if "mm_token_type_ids" in inputs:   # Qwen: the first K tokens keep their original positions
        positions, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"])
    shrunk = shrink_placeholders(flags, batch.token_id, 0, ids, None, None, positions,
                                 inputs.get("mm_token_type_ids"))
    short = {**inputs, "input_ids": shrunk["input_ids"]}
    if positions is not None:
        short.update(position_ids=shrunk["position_ids"], mm_token_type_ids=shrunk["token_types"])
    setattr(inner, batch.features, _ideal_features(model, family, batch, keep, getattr(inner, batch.features)))
    try:
        yield short
    finally:
        delattr(inner, batch.features)


# --- FLOPs -----------------------------------------------------------------------------------------

# torch counts no FLOPs for SDPA's CPU kernel (it does for the CUDA ones): the same count as theirs
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


class ShapesOnly(TorchDispatchMode):
    """Every op the FLOP counter counts (the matrix products, convolutions and attention of torch)
    runs on meta copies of its inputs and gives zeros of its output's shape and strides: inside a
    ``FlopCounterMode`` a forward pass is counted exactly while the rest of it (token ids, grids,
    positions, indexing, elementwise work and DeSAP's own op) runs as it is, at a small share of
    the cost. With :func:`desap_ops.cli.models.build_model`'s ``weights=False`` this counts a
    full-size model whose forward reads token ids (Qwen, video) on a CPU in little memory."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten" or func.overloadpacket not in flop_registry:
            return func(*args, **kwargs)
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        out = func(*meta_args, **meta_kwargs)
        zeros = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).zero_()  # noqa: E731
        return tree_map_only(torch.Tensor, zeros, out)


def flops_of(fn: Callable[[], object], shapes_only: bool = False) -> int:
    """FLOPs ``torch.utils.flop_counter`` counts in one call of ``fn`` (DeSAP's op included);
    ``shapes_only``: under :class:`ShapesOnly` (the same count, none of the matrix work)."""
    with FlopCounterMode(display=False) as counter:
        if shapes_only:
            with ShapesOnly():
                fn()
        else:
            fn()
    return int(counter.get_total_flops())


def _tower_call(model, inputs: dict) -> Callable[[], object]:
    """The vision tower alone on the batch's pixels (LLaVA-1.5 and LLaVA-NeXT layouts)."""
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:
        pixels = pixels.flatten(0, 1)
    return lambda: model.model.vision_tower(pixels, output_hidden_states=True)


def piecewise_flops(model: nn.Module, inputs: dict, image_tokens: int, keep: int) -> dict:
    """FLOPs of full, desap and ideal prefill of LLaVA-1.5 / LLaVA-NeXT from the pieces (runs on meta)."""
    inner = model.model
    vision = model.config.vision_config
    pixels = inputs["pixel_values"]
    crops = pixels.shape[0] * (pixels.shape[1] if pixels.dim() == 5 else 1)
    batch = inputs["input_ids"].shape[0]
    width, text_width = vision.hidden_size, model.config.text_config.hidden_size
    rows = lambda n, w=width: torch.empty(batch, n, w, device=pixels.device, dtype=pixels.dtype)  # noqa: E731
    per_crop = (vision.image_size // vision.patch_size) ** 2

    tower = flops_of(_tower_call(model, inputs))
    project_all = flops_of(lambda: inner.multi_modal_projector(rows(crops // batch * per_crop)))
    project_kept = flops_of(lambda: inner.multi_modal_projector(rows(keep)))
    operator = ops.prune_flops((batch, image_tokens, width), (batch, image_tokens, text_width),
                               (batch, TEXT_TOKENS, text_width), None, None, None, keep)
    length_full = inputs["input_ids"].shape[1]
    language_full, language_keep = (flops_of(lambda: model(inputs_embeds=rows(n, text_width), logits_to_keep=1))
                                    for n in (length_full, length_full - image_tokens + keep))
    return {"full": tower + project_all + language_full,
            "desap": tower + project_all + operator + project_kept + language_keep,
            "ideal": tower + project_kept + language_keep, "operator": operator, "vision_tower": tower,
            "language_full": language_full, "language_keep": language_keep}


# --- memory ----------------------------------------------------------------------------------------

def available_bytes(device: str) -> Optional[int]:
    """Memory ``device`` has free now: torch.cuda.mem_get_info on CUDA, MemAvailable from
    /proc/meminfo on Linux, else the free physical pages; None where none of these can be read."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def needed_bytes(name: str, dtype: torch.dtype, shrink: bool = False) -> tuple[int, int]:
    """(weights, weights and margin) in bytes for a run of ``name``, from a meta build (nothing allocated)."""
    weights = weight_bytes(build_model(name, "meta", dtype, shrink))
    return weights, int(weights * (1 + MEMORY_MARGIN)) + MEMORY_FIXED


def check_memory(name: str, device: str, dtype_name: str, shrink: bool = False) -> None:
    """Refuse (UsageError) a run whose estimated memory exceeds what ``device`` has free."""
    weights, needed = needed_bytes(name, DTYPES[dtype_name], shrink)
    free = available_bytes(device)
    if free is None or needed <= free:
        return
    hint = "use --device meta to count its FLOPs"
    if DTYPES[dtype_name].itemsize > 2 and int(weights / 2 * (1 + MEMORY_MARGIN)) + MEMORY_FIXED <= free:
        hint += ", or --dtype bf16"
    raise UsageError(f"{name} in {dtype_name} needs about {needed / GIB:.1f} GiB on {device} ({weights / GIB:.1f} "
                     f"GiB of weights + {MEMORY_MARGIN:.0%} + {MEMORY_FIXED / GIB:.0f} GiB for activations), "
                     f"only {free / GIB:.1f} GiB is available; {hint}")


# --- the run ---------------------------------------------------------------------------------------

def default_keeps(tokens: int) -> list[int]:
    """N, N/3, 2N/9 and N/9 (576, 192, 128, 64 for LLaVA-1.5)."""
    return sorted({tokens, tokens // 3, 2 * tokens // 9, tokens // 9} - {0}, reverse=True)


@contextmanager
def variant(model: nn.Module, family: str, data: Batch, name: str, keep: int) -> Iterator[dict]:
    """The model set up for one of :data:`VARIANTS` at budget ``keep``; yields that prefill's inputs."""
    if name == "ideal":
        with ideal_inputs(model, family, data, keep) as short:
            yield short
        return
    if name == "desap":
        apply_desap(model, keep=keep)
    try:
        yield data.inputs
    finally:
        remove_desap(model)


def _prefill(model, inputs: dict) -> Callable[[], object]:
    return lambda: model(**inputs, logits_to_keep=1)


def time_rounds(model: nn.Module, family: str, data: Batch, keeps: list[int], device: str, repeats: int,
                say: Callable[[str], None]) -> tuple[dict, list[float]]:
    """({keep: {variant: [ms per round]}}, [vision tower ms per round]) over ``repeats`` rounds
    after :data:`WARMUP_ROUNDS`, the variants interleaved within each round."""
    times = {keep: {name: [] for name in VARIANTS} for keep in keeps}
    tower = []
    for round_ in range(WARMUP_ROUNDS + repeats):
        counted = round_ >= WARMUP_ROUNDS
        say(f"round {round_ + 1 - WARMUP_ROUNDS} of {repeats}" if counted else "warm-up round")
        if family in PIECEWISE:
            ms = time_call_ms(_tower_call(model, data.inputs), device)
            if counted:
                tower.append(ms)
        for keep in keeps:
            for name in VARIANTS:
                with variant(model, family, data, name, keep) as inputs:
                    ms = time_call_ms(_prefill(model, inputs), device)
                if counted:
                    times[keep][name].append(ms)
    return times, tower


def run(name: str, keeps: Optional[list[int]], device: str = "cpu", dtype: Optional[str] = None, batch: int = 1,
        progress: Optional[Callable[[str], None]] = None, repeats: int = 5, shrink: bool = False) -> dict:
    """The result saved as JSON: environment, settings and one row per budget (default:
    :func:`default_keeps`). ``shrink``: the real shape at reduced depth and width (tests)."""
    say = progress or (lambda _: None)
    spec = MODELS[name]
    piecewise = spec.family in PIECEWISE
    # meta for the others: their forward passes on a CPU, weights that hold no memory, under ShapesOnly
    shapes_only = device == "meta" and not piecewise
    build_device = "cpu" if shapes_only else device
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}")
    dtype_name = dtype or ("fp32" if device == "cpu" else "bf16")
    torch_dtype = DTYPES[dtype_name]
    timed = device != "meta"
    if timed:
        check_memory(name, device, dtype_name, shrink)
    weights = "weights holding no memory, FLOPs only" if shapes_only else "random weights"
    say(f"building {name} on {build_device} ({dtype_name}, {weights})")
    model = build_model(name, build_device, torch_dtype, shrink, weights=not shapes_only)
    data = make_batch(model, name, batch, build_device, torch_dtype)
    tokens = data.tokens
    keeps = keeps or default_keeps(tokens)
    if any(not 1 <= k <= tokens for k in keeps):
        raise UsageError(f"--keep values must lie in [1, {tokens}] for {name}, got {keeps}")
    result = {"environment": environment(device), "model": name, "weights": "random",
              "measured": "timed" if timed else "FLOPs counted", "device": device, "dtype": dtype_name,
              "shrink": shrink,
              "batch": batch, "image_tokens": tokens, "text_tokens": TEXT_TOKENS, "rows": []}
    rows = {keep: {"keep": keep} for keep in keeps}
    with torch.no_grad():
        if timed:
            load_before = os.getloadavg()
            times, tower = time_rounds(model, spec.family, data, keeps, device, repeats, say)
            result.update(repeats=repeats, warmup_rounds=WARMUP_ROUNDS,
                          load_average={"before": list(load_before), "after": list(os.getloadavg())})
            if tower:
                result.update(vision_tower_ms=statistics.median(tower), vision_tower_rounds_ms=tower)
            for keep in keeps:
                full_ms, desap_ms, ideal_ms = (statistics.median(times[keep][v]) for v in VARIANTS)
                rows[keep].update(rounds_ms=times[keep], full_ms=full_ms, desap_ms=desap_ms, ideal_ms=ideal_ms, speedup=full_ms / desap_ms,
                                  ideal_speedup=full_ms / ideal_ms, overhead_ms=desap_ms - ideal_ms,
                                  overhead_share=(desap_ms - ideal_ms) / desap_ms,
                                  share_of_ideal_speedup=ideal_ms / desap_ms)
        say("counting FLOPs")
        if piecewise:
            counter = model if device == "meta" else build_model(name, "meta", torch_dtype, shrink)
            counted = data if device == "meta" else make_batch(counter, name, batch, "meta", torch_dtype)
            for keep in keeps:
                flops = piecewise_flops(counter, counted.inputs, tokens, keep)
                rows[keep].update(flops=flops, language_flops_reduction=flops["language_full"] / flops["language_keep"])
        else:
            full_flops = flops_of(_prefill(model, data.inputs), shapes_only)
            tower = {}
            if spec.family in QWEN:   # the encoder (merger and DeepStack mergers included) on the batch's images
                pixels, grid = data.inputs["pixel_values"], data.inputs["image_grid_thw"]
                tower["vision_tower"] = flops_of(lambda: model.model.get_image_features(pixels, grid), shapes_only)
            for keep in keeps:
                flops = {"full": full_flops, **tower}
                for name_ in VARIANTS[1:]:
                    with variant(model, spec.family, data, name_, keep) as inputs:
                        flops[name_] = flops_of(_prefill(model, inputs), shapes_only)
                rows[keep]["flops"] = flops
    for keep in keeps:
        rows[keep]["flops_reduction"] = rows[keep]["flops"]["full"] / rows[keep]["flops"]["desap"]
        result["rows"].append(rows[keep])
    return result


# --- output ----------------------------------------------------------------------------------------

def describe(result: dict) -> str:
    """What was measured where: "timed on cpu (AMD EPYC, 2 threads)" or "FLOPs counted on meta"."""
    if result["measured"] == "timed":
        return f"timed on {result['device']} ({result['environment']['device']})"
    return f"FLOPs counted on {result['device']}"


def format_table(result: dict) -> str:
    """The result as text: a header (model, weights, what was measured on which device, settings,
    versions) and one line per budget."""
    env = result["environment"]
    timed = "full_ms" in result["rows"][0]
    shrunk = " shrunk (2 layers and 2 heads per transformer)" if result.get("shrink") else ""
    lines = [f"{result['model']}{shrunk}, {result['weights']} weights, {describe(result)}, {result['dtype']}, batch {result['batch']}, "
             f"{result['image_tokens']} image + {result['text_tokens']} text tokens; torch {env['torch']}, "
             f"{env['date']}"]
    if timed:
        load = result["load_average"]
        rounds = f"{result['repeats']} round{'s' * (result['repeats'] != 1)}"
        note = (f"medians of {rounds} after {result['warmup_rounds']} warm-up, the variants "
                f"interleaved; load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after")
        if "vision_tower_ms" in result:
            full = statistics.median(r["full_ms"] for r in result["rows"])
            note += (f"; vision tower alone {result['vision_tower_ms']:.1f} ms "
                     f"({result['vision_tower_ms'] / full:.0%} of the full prefill)")
        lines.append(note)
        lines.append(f"{'keep':>6}{'full ms':>10}{'desap ms':>10}{'ideal ms':>10}{'speedup':>9}{'ideal':>7}"
                     f"{'of ideal':>10}{'overhead ms':>13}{'share':>7}{'GFLOP full':>12}{'GFLOP desap':>13}"
                     f"{'FLOP x':>8}")
        for r in result["rows"]:
            lines.append(f"{r['keep']:>6}{r['full_ms']:>10.2f}{r['desap_ms']:>10.2f}{r['ideal_ms']:>10.2f}"
                         f"{r['speedup']:>9.2f}{r['ideal_speedup']:>7.2f}{r['share_of_ideal_speedup']:>10.0%}"
                         f"{r['overhead_ms']:>13.3f}{r['overhead_share']:>7.0%}{r['flops']['full'] / 1e9:>12.4g}"
                         f"{r['flops']['desap'] / 1e9:>13.4g}{r['flops_reduction']:>8.2f}")
    else:   # the tower's share of the DeSAP prefill grows as K shrinks: pruning after the encoder cannot save it
        first, rows = result["rows"][0]["flops"], result["rows"]
        # the LLaVA pieces count the language model apart; the Qwen models count their encoder apart
        tower, language = "vision_tower" in first, "language_flops_reduction" in rows[0]
        if tower:
            lines.append(f"vision tower {first['vision_tower'] / 1e9:.4g} GFLOP, "
                         f"{first['vision_tower'] / first['full']:.0%} of the full prefill")
        lines.append(f"{'keep':>6}{'GFLOP full':>12}{'GFLOP desap':>13}{'GFLOP ideal':>13}{'FLOP x':>8}"
                     + f"{'LM FLOP x':>11}" * language + f"{'tower of desap':>16}" * tower)
        for r in rows:
            f = r["flops"]
            lines.append(f"{r['keep']:>6}{f['full'] / 1e9:>12.4g}{f['desap'] / 1e9:>13.4g}{f['ideal'] / 1e9:>13.4g}"
                         f"{r['flops_reduction']:>8.2f}"
                         + (f"{r['language_flops_reduction']:>11.2f}" if language else "")
                         + (f"{f['vision_tower'] / f['desap']:>16.0%}" if tower else ""))
    return "\n".join(lines)


def figure(result: dict) -> Figure:
    """Speedups (timed runs) and FLOP reduction against the budget, as a matplotlib Figure."""
    from matplotlib.figure import Figure

    rows = result["rows"]
    keeps = [r["keep"] for r in rows]
    timed = "speedup" in rows[0]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    if timed:
        ax.plot(keeps, [r["speedup"] for r in rows], "o-", label="DeSAP speedup (timed)")
        ax.plot(keeps, [r["ideal_speedup"] for r in rows], "s--", label="ideal speedup (no pruning work)")
        ax.plot(keeps, [r["flops_reduction"] for r in rows], "^:", label="FLOP reduction (counted)")
        ax.set_ylabel("full model / DeSAP or ideal (x)")
    else:
        ax.plot(keeps, [r["flops_reduction"] for r in rows], "^:", label="FLOP reduction (counted)")
        ax.set_ylabel("FLOPs, full model / DeSAP (x)")
    ax.set_xlabel(f"image tokens kept (of {result['image_tokens']})")
    shrunk = " shrunk" if result.get("shrink") else ""
    ax.set_title(f"{result['model']}{shrunk}, {result['weights']} weights, {result['dtype']}, batch {result['batch']}\n{describe(result)}",
                 fontsize=10)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot(result: dict, path: str) -> None:
    """:func:`figure` saved as a PNG."""
    figure(result).savefig(path)
