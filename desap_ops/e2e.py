"""``desap bench e2e``: prefill of a whole LLaVA model with and without DeSAP.

For each budget K three prefills of the same model on the same batch (one image and 32 text tokens
per row, logits of the last position only, as generate's prefill):

- full: the unpatched model, N image tokens per image;
- desap: ``apply_desap(model, keep=K)``, all of DeSAP's work included;
- ideal: the model fed K image tokens with no pruning work at all (its own image features, cut to
  the first K), the speed DeSAP could reach if pruning cost nothing.

Times are medians (CUDA events on CUDA). FLOPs come from ``torch.utils.flop_counter`` over the
same pieces (vision tower, projector, DeSAP's operator, language model), so they can be counted
at full size on the meta device without a GPU. Real model shapes carry random weights: the
timings hold for any weights; the outputs mean nothing.
"""
from __future__ import annotations

import json
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import benchmarking, e2e_more, ops  # noqa: F401  (ops registers torch.ops.desap)
from .e2e_more import ideal_inputs
from .integrations import apply_desap, remove_desap
from .integrations.llava import image_token_counts
from .cli.models import tiny_llava

TEXT_TOKENS = 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _real_configs(name: str):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration)

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
    common = dict(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    if name == "llava-1.5-7b":
        return LlavaForConditionalGeneration, LlavaConfig(**common)
    return LlavaNextForConditionalGeneration, LlavaNextConfig(
        **common, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def build_model(name: str, device: str, dtype: torch.dtype):
    """The model on ``device`` in ``dtype`` with random weights (never all zeros)."""
    if name == "tiny":
        return tiny_llava().to(device=device, dtype=dtype)
    cls, config = _real_configs(name)
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype=dtype)
    if device != "meta":
        model = model.to_empty(device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def make_batch(model, batch: int, device: str, dtype: torch.dtype) -> dict:
    """One image and TEXT_TOKENS text tokens per row, with the processor's placeholder count."""
    vision = model.config.vision_config
    side = vision.image_size
    gen = torch.Generator().manual_seed(0)
    if type(model).__name__.startswith("LlavaNext"):
        sizes = torch.tensor([[2 * side, 2 * side]] * batch)
        pixels = torch.randn(batch, 5, 3, side, side, generator=gen)
        inputs = {"image_sizes": sizes}
    else:
        pixels = torch.randn(batch, 3, side, side, generator=gen)
        inputs = {}
    image_tokens = image_token_counts(model, pixels, inputs.get("image_sizes"))[0]
    text = torch.randint(3, min(1000, model.config.text_config.vocab_size), (batch, TEXT_TOKENS), generator=gen)
    text[text == model.config.image_token_id] = 3
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long),
                     torch.full((batch, image_tokens), model.config.image_token_id), text], dim=1)
    inputs.update(input_ids=ids, pixel_values=pixels.to(dtype))
    return {k: v.to(device) for k, v in inputs.items()}, image_tokens


def _flops_of(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_flops(model, inputs: dict, image_tokens: int, keep: int) -> dict:
    """FLOPs of full, desap and ideal prefill from the pieces (runs on meta too)."""
    inner = model.model
    vision = model.config.vision_config
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:
        pixels = pixels.flatten(0, 1)
    crops = pixels.shape[0]
    batch = inputs["input_ids"].shape[0]
    width, text_width = vision.hidden_size, model.config.text_config.hidden_size
    rows = lambda n: torch.empty(batch, n, width, device=pixels.device, dtype=pixels.dtype)  # noqa: E731
    per_crop = (vision.image_size // vision.patch_size) ** 2

    def language(length: int) -> int:
        embeds = torch.empty(batch, length, text_width, device=pixels.device, dtype=pixels.dtype)
        return _flops_of(lambda: model(inputs_embeds=embeds, logits_to_keep=1))

    tower = _flops_of(lambda: inner.vision_tower(pixels, output_hidden_states=True))
    project_all = _flops_of(lambda: inner.multi_modal_projector(rows(crops // batch * per_crop)))
    project_kept = _flops_of(lambda: inner.multi_modal_projector(rows(keep)))
    operator = ops.prune_flops((batch, image_tokens, width), (batch, image_tokens, text_width),
                            (batch, TEXT_TOKENS, text_width), None, None, None, keep)
    length_full = inputs["input_ids"].shape[1]
    length_keep = length_full - image_tokens + keep
    language_full, language_keep = language(length_full), language(length_keep)
    full = tower + project_all + language_full
    ideal = tower + project_kept + language_keep
    desap = tower + project_all + operator + project_kept + language_keep
    return {"full": full, "desap": desap, "ideal": ideal, "operator": operator, "vision_tower": tower,
            "language_full": language_full, "language_keep": language_keep}


def run(name: str, keeps: Optional[list], device: str = "cpu", dtype: Optional[str] = None, batch: int = 1,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    say = progress or (lambda _: None)
    dtype_name = dtype or ("fp32" if device == "cpu" else "bf16")
    if name in e2e_more.MODELS:
        return e2e_more.run(name, keeps, device, dtype_name, batch, say)
    torch_dtype = DTYPES[dtype_name]
    say(f"building {name} on {device} ({dtype_name}, random weights)")
    model = build_model(name, device, torch_dtype)
    inputs, image_tokens = make_batch(model, batch, device, torch_dtype)
    keeps = keeps or sorted({image_tokens, image_tokens // 3, image_tokens // 4, image_tokens // 9}, reverse=True)
    if any(not 1 <= k <= image_tokens for k in keeps):
        from .__main__ import UsageError

        raise UsageError(f"--keep values must lie in [1, {image_tokens}] for {name}, got {keeps}")
    timed = device != "meta"
    result = {"environment": benchmarking.environment(device if timed else "cpu"), "model": name,
              "weights": "random (timing only)", "device": device, "dtype": dtype_name, "batch": batch,
              "image_tokens": image_tokens, "text_tokens": TEXT_TOKENS, "rows": []}
    full_ms = None
    with torch.no_grad():
        if timed:
            say("full model")
            full_ms = benchmarking.time_median_ms(lambda: model(**inputs, logits_to_keep=1), device)
        for keep in keeps:
            say(f"keep {keep}")
            row = {"keep": keep, "flops": count_flops(model, inputs, image_tokens, keep)}
            if timed:
                apply_desap(model, keep=keep)
                row["desap_ms"] = benchmarking.time_median_ms(lambda: model(**inputs, logits_to_keep=1), device)
                remove_desap(model)
                with ideal_inputs(model, inputs, image_tokens, keep, model.config.image_token_id,
                                  "get_image_features") as short:
                    row["ideal_ms"] = benchmarking.time_median_ms(lambda: model(**short, logits_to_keep=1), device)
                row["full_ms"] = full_ms
                row["speedup"] = full_ms / row["desap_ms"]
                row["ideal_speedup"] = full_ms / row["ideal_ms"]
                row["overhead_ms"] = row["desap_ms"] - row["ideal_ms"]
                row["overhead_share"] = row["overhead_ms"] / row["desap_ms"]
                row["share_of_ideal_speedup"] = row["speedup"] / row["ideal_speedup"]
            row["flops_reduction"] = row["flops"]["full"] / row["flops"]["desap"]
            row["language_flops_reduction"] = row["flops"]["language_full"] / row["flops"]["language_keep"]
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


def save(result: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)


def plot(result: dict, path: str) -> None:
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
