"""``desap bench e2e``: prefill of a whole model with and without DeSAP, for every model in
:data:`desap_ops.cli.models.MODELS` (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, LLaVA-NeXT-Video, Video-LLaVA).

For each budget K three prefills of the same model on the same batch (per row: one image, or one
video, and 32 text tokens; logits of the last position only, as generate's prefill):

- full: the unpatched model, N image (or video) tokens;
- desap: ``apply_desap(model, keep=K)``, all of DeSAP's work included;
- ideal: the model fed K tokens with no pruning work at all (its own features cut to the first K,
  and for Qwen2.5-VL those tokens' original positions, computed before timing), the speed DeSAP
  could reach if pruning cost nothing.

Times are medians (CUDA events on CUDA). FLOPs come from ``torch.utils.flop_counter``. For the
LLaVA-1.5 and LLaVA-NeXT shapes they are counted over the pieces (vision tower, projector, DeSAP's
operator, language model), so they can be counted at full size on the meta device without a GPU.
Qwen2.5-VL and the video models count them on the real forward passes, so they take ``--device
cpu`` or ``cuda`` (the prompt surgery reads token ids). Real model shapes carry random weights:
the timings hold for any weights; the outputs mean nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from desap_ops import ops
from desap_ops.integrations import apply_desap, image_token_counts, remove_desap
from desap_ops.integrations.sequence import first_placeholders, shrink_placeholders

from .errors import UsageError
from .models import MODELS, build_model
from .report import DTYPES, environment, time_median_ms

TEXT_TOKENS = 32
PIECEWISE = ("llava", "llava_next")   # families whose FLOPs are counted from the pieces (meta works)
FRAMES = {True: 3, False: 8}          # frames per video: tiny, 7B
QWEN_GRID = {True: 8, False: 48}      # patches per side of the Qwen image: tiny, 7B (672 x 672 pixels)


@dataclass
class Batch:
    inputs: dict
    tokens: int        # placeholder tokens per image or video (before pruning)
    token_id: int      # the placeholder's id
    features: str      # the model's method that returns those tokens' features


def tokens_per_frame(model) -> int:
    """Placeholder tokens the processor gives one video frame. (The integrations' own count needs a
    patched model, so the app counts here: LLaVA-NeXT-Video pools each frame and drops [CLS] under
    the "default" strategy; Video-LLaVA's video path keeps every patch and [CLS].)"""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    if config.model_type == "llava_next_video" and config.vision_feature_select_strategy == "default":
        return (side // config.spatial_pool_stride) ** 2
    return side * side + 1


def _prompt(batch: int, text: torch.Tensor, *runs: torch.Tensor) -> torch.Tensor:
    """BOS, then ``runs`` (the image or video placeholders and their markers), then the text."""
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), *runs, text], dim=1)


def make_batch(model, name: str, batch: int, device: str, dtype: torch.dtype) -> Batch:
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
    elif spec.family == "qwen2_5_vl":
        side = QWEN_GRID[spec.tiny]
        tokens = side * side // 4
        token_id, features = config.image_token_id, "get_image_features"
        text[(text == token_id) | (text >= 150)] = 3
        ids = _prompt(batch, text, full(1, config.vision_start_token_id), full(tokens, token_id),
                      full(1, config.vision_end_token_id))
        pixels = torch.randn(batch * side * side, 3 * 2 * 14 * 14, generator=gen)
        inputs = dict(input_ids=ids, pixel_values=pixels.to(dtype), mm_token_type_ids=(ids == token_id).int(),
                      image_grid_thw=torch.tensor([[1, side, side]] * batch))
    else:  # the video models
        frames, size = FRAMES[spec.tiny], config.vision_config.image_size
        tokens = frames * tokens_per_frame(model)
        token_id, features = config.video_token_id, "get_video_features"
        text[text == token_id] = 3
        videos = torch.randn(batch, frames, 3, size, size, generator=gen)
        inputs = dict(input_ids=_prompt(batch, text, full(tokens, token_id)), pixel_values_videos=videos.to(dtype))
    return Batch({k: v.to(device) for k, v in inputs.items()}, tokens, token_id, features)


@contextmanager
def ideal_inputs(model, batch: Batch, keep: int) -> Iterator[dict]:
    """The ideal call's inputs, with the model's own features cut to the first ``keep``."""
    inner = model.model
    inputs = batch.inputs
    original = getattr(inner, batch.features)

    def cut(*args, **kwargs):
        out = original(*args, **kwargs)
        pooled = out.pooler_output
        if isinstance(pooled, (list, tuple)):
            out.pooler_output = [f[:keep] for f in pooled]
        else:  # per video (Video-LLaVA returns one row per frame)
            out.pooler_output = pooled.reshape(inputs["input_ids"].shape[0], -1, pooled.shape[-1])[:, :keep]
        return out

    ids = inputs["input_ids"]
    flags = first_placeholders([batch.tokens] * ids.shape[0], keep, ids.device)
    positions = None
    if "mm_token_type_ids" in inputs:   # Qwen2.5-VL: the first K tokens keep their original positions
        positions, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"])
    shrunk = shrink_placeholders(flags, batch.token_id, 0, ids, None, None, positions,
                                 inputs.get("mm_token_type_ids"))
    short = {**inputs, "input_ids": shrunk["input_ids"]}
    if positions is not None:
        short.update(position_ids=shrunk["position_ids"], mm_token_type_ids=shrunk["token_types"])
    setattr(inner, batch.features, cut)
    try:
        yield short
    finally:
        delattr(inner, batch.features)


def flops_of(fn: Callable[[], object]) -> int:
    """FLOPs ``torch.utils.flop_counter`` counts in one call of ``fn`` (DeSAP's op included)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def piecewise_flops(model, inputs: dict, image_tokens: int, keep: int) -> dict:
    """FLOPs of full, desap and ideal prefill of LLaVA-1.5 / LLaVA-NeXT from the pieces (runs on meta)."""
    inner = model.model
    vision = model.config.vision_config
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:
        pixels = pixels.flatten(0, 1)
    crops = pixels.shape[0]
    batch = inputs["input_ids"].shape[0]
    width, text_width = vision.hidden_size, model.config.text_config.hidden_size
    rows = lambda n, w=width: torch.empty(batch, n, w, device=pixels.device, dtype=pixels.dtype)  # noqa: E731
    per_crop = (vision.image_size // vision.patch_size) ** 2

    tower = flops_of(lambda: inner.vision_tower(pixels, output_hidden_states=True))
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


def _measure(fn: Callable[[], object], device: str, count: bool) -> tuple[float, Optional[int]]:
    """(median ms, FLOPs or None) of one prefill."""
    return time_median_ms(fn, device), flops_of(fn) if count else None


def run(name: str, keeps: Optional[list[int]], device: str = "cpu", dtype: Optional[str] = None, batch: int = 1,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    """The result saved as JSON: environment, settings and one row per budget (default: N and three smaller)."""
    say = progress or (lambda _: None)
    spec = MODELS[name]
    piecewise = spec.family in PIECEWISE
    if device == "meta" and not piecewise:
        raise UsageError(f"--device meta counts FLOPs for llava-1.5-7b and llava-next-7b only; {name} "
                         "counts them on its real forward passes: use --device cpu or cuda")
    dtype_name = dtype or ("fp32" if device == "cpu" else "bf16")
    say(f"building {name} on {device} ({dtype_name}, random weights)")
    model = build_model(name, device, DTYPES[dtype_name])
    data = make_batch(model, name, batch, device, DTYPES[dtype_name])
    tokens = data.tokens
    keeps = keeps or sorted({tokens, tokens // 3, tokens // 4, tokens // 9} - {0}, reverse=True)
    if any(not 1 <= k <= tokens for k in keeps):
        raise UsageError(f"--keep values must lie in [1, {tokens}] for {name}, got {keeps}")
    timed = device != "meta"
    result = {"environment": environment(device if timed else "cpu"), "model": name,
              "weights": "random (timing only)", "device": device, "dtype": dtype_name, "batch": batch,
              "image_tokens": tokens, "text_tokens": TEXT_TOKENS, "rows": []}
    prefill = lambda args: model(**args, logits_to_keep=1)  # noqa: E731
    with torch.no_grad():
        if timed:
            say("full model")
            full_ms, full_flops = _measure(lambda: prefill(data.inputs), device, not piecewise)
        for keep in keeps:
            say(f"keep {keep}")
            row = {"keep": keep}
            if timed:
                apply_desap(model, keep=keep)
                try:
                    desap_ms, desap_flops = _measure(lambda: prefill(data.inputs), device, not piecewise)
                finally:
                    remove_desap(model)
                with ideal_inputs(model, data, keep) as short:
                    ideal_ms, ideal_flops = _measure(lambda: prefill(short), device, not piecewise)
                row.update(full_ms=full_ms, desap_ms=desap_ms, ideal_ms=ideal_ms, speedup=full_ms / desap_ms,
                           ideal_speedup=full_ms / ideal_ms, overhead_ms=desap_ms - ideal_ms,
                           overhead_share=(desap_ms - ideal_ms) / desap_ms,
                           share_of_ideal_speedup=ideal_ms / desap_ms)
            if piecewise:
                row["flops"] = piecewise_flops(model, data.inputs, tokens, keep)
                row["language_flops_reduction"] = row["flops"]["language_full"] / row["flops"]["language_keep"]
            else:
                row["flops"] = {"full": full_flops, "desap": desap_flops, "ideal": ideal_flops}
            row["flops_reduction"] = row["flops"]["full"] / row["flops"]["desap"]
            result["rows"].append(row)
    return result


def format_table(result: dict) -> str:
    fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    percent = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    env = result["environment"]
    lines = [f"{result['model']} ({result['weights']}) on {result['device']} {env['device']}, {result['dtype']}, "
             f"batch {result['batch']}, {result['image_tokens']} image + {result['text_tokens']} text tokens; "
             f"torch {env['torch']}, {env['date']}",
             f"{'keep':>6}{'GFLOP full':>12}{'GFLOP desap':>13}{'FLOP x':>8}{'full ms':>10}{'desap ms':>10}"
             f"{'ideal ms':>10}{'speedup':>9}{'ideal':>7}{'overhead ms':>13}{'share':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['keep']:>6}{r['flops']['full'] / 1e9:>12.4g}{r['flops']['desap'] / 1e9:>13.4g}"
                     f"{r['flops_reduction']:>8.2f}{fmt(r.get('full_ms')):>10}{fmt(r.get('desap_ms')):>10}"
                     f"{fmt(r.get('ideal_ms')):>10}{fmt(r.get('speedup')):>9}{fmt(r.get('ideal_speedup')):>7}"
                     f"{fmt(r.get('overhead_ms'), 3):>13}{percent(r.get('overhead_share')):>7}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Speedup (measured and ideal) and FLOP reduction against the budget, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    keeps = [r["keep"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if "speedup" in rows[0]:
        ax.plot(keeps, [r["speedup"] for r in rows], "o-", label="DeSAP (measured)")
        ax.plot(keeps, [r["ideal_speedup"] for r in rows], "s--", label="ideal (no pruning work)")
        ax.set_ylabel("prefill speedup over the full model")
    ax.plot(keeps, [r["flops_reduction"] for r in rows], "^:", label="FLOP reduction")
    ax.set_xlabel(f"image tokens kept (of {result['image_tokens']})")
    ax.set_title(f"{result['model']}, {result['device']}, batch {result['batch']}")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
