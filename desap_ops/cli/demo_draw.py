"""The drawing half of ``desap demo``: a :class:`~desap_ops.cli.demo_run.DemoResult` as a picture
that reads without the terminal. The question it answers at a glance is which tokens a method
keeps: on its kept panel the kept tokens show the photo in full colour inside a bright outline,
the pruned ones recede (greyed and dimmed), and the merge groups are drawn only on request
(``--groups``: thin borders and a faint tint, touching groups in different colours). Beside it,
[CLS] saliency and the task score with colour bars, and a title that says what is real and what
stands in."""
from __future__ import annotations

import math
import textwrap
from collections import Counter
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from desap_ops.reference import AUTO_HIGH, AUTO_LOW, AUTO_MAX_SHARE

from .demo_run import QUERY_BOX_COLOUR, DemoResult, split_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Segment = tuple[tuple[int, int], tuple[int, int]]

PANEL_SIZE = (5.0, 6.6)             # inches per panel at 100 dpi: P panels side by side, a 500P x 660 PNG
AUTO_FIGURE_SIZE = (15.0, 13.0)     # two rows of three, strong and weak cue: a 1500 x 1300 PNG
DPI = 100
# tab10 without grey (lost on the greyed photo) and cyan (the query box): 8 colours that stay apart
GROUP_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22")
KEPT_COLOUR = "#ffe100"             # the kept tokens' outline: bright on the photo and on the greyed cells
PRUNED_GREY = (0.1, 0.45)           # a pruned cell's grey levels: its luminance squeezed into this range
GROUP_TINT = 0.3                    # opacity of a merge group's colour over its pruned cells (--groups)


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


def outer_edges(cells: np.ndarray) -> list[Segment]:
    """Segments of the picture's border along the ``True`` cells of a (grid, grid) mask."""
    rows, cols = cells.shape
    segments = [((c, 0), (c + 1, 0)) for c in range(cols) if cells[0, c]]
    segments += [((c, rows), (c + 1, rows)) for c in range(cols) if cells[rows - 1, c]]
    segments += [((0, r), (0, r + 1)) for r in range(rows) if cells[r, 0]]
    segments += [((cols, r), (cols, r + 1)) for r in range(rows) if cells[r, cols - 1]]
    return segments


def kept_edges(kept: np.ndarray) -> tuple[list[Segment], list[Segment]]:
    """(outline, inner) of a (grid, grid) mask of kept cells: the edges between a kept cell and a
    pruned one or the picture's border, and the edges between two kept cells."""
    rows, cols = kept.shape
    outline = group_borders(kept.astype(np.int8)) + outer_edges(kept)
    inner = [((c + 1, r), (c + 1, r + 1)) for r in range(rows) for c in range(cols - 1) if kept[r, c] and kept[r, c + 1]]
    inner += [((c, r + 1), (c + 1, r + 1)) for r in range(rows - 1) for c in range(cols) if kept[r, c] and kept[r + 1, c]]
    return outline, inner


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

    def kept_mask(self) -> np.ndarray:
        """(grid, grid) bool: the kept tokens' cells."""
        grid = self.result.grid
        kept = np.zeros(grid * grid, dtype=bool)
        kept[self.result.indices.numpy()] = True
        return kept.reshape(grid, grid)

    def kept_photo(self) -> np.ndarray:
        """The photo as the kept panel draws it, (H, W, 3) in [0, 1]: the kept tokens' cells in full
        colour, every other cell greyed and dimmed (:data:`PRUNED_GREY`)."""
        rgb = np.asarray(self.result.image.convert("RGB"), dtype=np.float64) / 255.0
        low, high = PRUNED_GREY
        pruned = low + (high - low) * rgb.mean(axis=2, keepdims=True).repeat(3, axis=2)
        grid, (height, width) = self.result.grid, rgb.shape[:2]
        # the cell of every pixel, as the tokens tile the (resized) photo
        rows = np.minimum((np.arange(height) * grid) // height, grid - 1)
        cols = np.minimum((np.arange(width) * grid) // width, grid - 1)
        inside = self.kept_mask()[rows[:, None], cols[None, :]]
        return np.where(inside[..., None], rgb, pruned)

    def kept(self, ax, title: str, groups: bool = False) -> None:
        """The kept tokens in full colour inside a bright outline over the greyed photo; with
        ``groups``, the merge groups as thin borders and a faint tint (touching groups differ) and
        each kept token's group colour as a dot at its centre."""
        from matplotlib.collections import LineCollection
        from matplotlib.colors import to_rgb

        grid, cell_w, cell_h = self.result.grid, self.cell_w, self.cell_h
        ax.imshow(self.kept_photo(), extent=self.extent, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])

        def scaled(segments: list[Segment]) -> list:
            return [((x0 * cell_w, y0 * cell_h), (x1 * cell_w, y1 * cell_h)) for (x0, y0), (x1, y1) in segments]

        indices = self.result.indices.tolist()
        if groups:
            assignment = self.result.assignment.view(grid, grid).numpy()
            colours = colour_groups(assignment, len(GROUP_PALETTE))
            self.clash = any(colours[a] == colours[b] for a, near in group_neighbours(assignment).items() for b in near)
            tint = np.zeros((grid, grid, 4))
            for (row, col), group in np.ndenumerate(assignment):
                if group >= 0:
                    tint[row, col] = (*to_rgb(GROUP_PALETTE[colours[int(group)]]), GROUP_TINT)
            for index in indices:
                tint[divmod(index, grid)] = 0.0     # the kept tokens show the photo itself
            ax.imshow(tint, extent=self.extent, interpolation="nearest")
            ax.add_collection(LineCollection(scaled(group_borders(assignment)), colors="white", linewidths=0.6,
                                             alpha=0.7))
            centres = [divmod(index, grid) for index in indices]
            ax.scatter([(c + 0.5) * cell_w for _, c in centres], [(r + 0.5) * cell_h for r, _ in centres], s=22,
                       c=[GROUP_PALETTE[colours[int(assignment[r, c])]] for r, c in centres],
                       edgecolors="white", linewidths=0.8, zorder=3)
        # the outline around the kept cells, and fainter lines between kept neighbours, so that each
        # kept token can be counted inside a patch of them
        outline, inner = kept_edges(self.kept_mask())
        ax.add_collection(LineCollection(scaled(outline), colors=KEPT_COLOUR, linewidths=2.2, zorder=4))
        ax.add_collection(LineCollection(scaled(inner), colors=KEPT_COLOUR, linewidths=0.7, alpha=0.8, zorder=4))
        self.query_box(ax)
        ax.set_title(title)

    def legend(self, ax, groups: bool, clash: bool, query_box: Optional[str]) -> None:
        """What the kept panel's marks mean, below ``ax``; ``query_box``: the query box's entry
        (None: no box drawn)."""
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        keep, tokens = self.result.indices.numel(), self.result.grid ** 2
        handles = [Patch(facecolor="white", edgecolor=KEPT_COLOUR, linewidth=2,
                         label=f"full colour, outlined: the {keep} kept tokens"),
                   Patch(facecolor=str(sum(PRUNED_GREY) / 2), edgecolor="none",
                         label=f"greyed: the {tokens - keep} pruned tokens, each merged into its nearest kept one")]
        if groups:
            handles.append(Line2D([], [], marker="o", linestyle="none", markerfacecolor=GROUP_PALETTE[0],
                                  markeredgecolor="white", markersize=7,
                                  label="dot, tint, white borders: a kept token and the tokens merged into it\n("
                                        + ("a few touching groups share a colour)" if clash
                                           else "touching groups never share a colour)")))
        if query_box:
            handles.append(Patch(fill=False, edgecolor=QUERY_BOX_COLOUR, linestyle="--", linewidth=2, label=query_box))
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.015), fontsize=9,
                  facecolor="0.85", framealpha=1.0)


SALIENCY_TITLE = "[CLS] saliency: where the encoder's [CLS] token looks"
SALIENCY_LABEL = "[CLS] attention to the token (mean over heads)"


def legend_room(groups: bool) -> float:
    """The share of a one-row figure's height below the panels: the legend's, longer with ``groups``."""
    return 0.23 if groups else 0.17


def kept_title(result: DemoResult) -> str:
    """The kept panel's title; with "auto" it names the split the scores chose and their g."""
    keep, tokens = result.indices.numel(), result.grid * result.grid
    if result.guidance is None:
        return f"the {keep} of {tokens} tokens kept"
    return f"{result.cue + ': ' if result.cue else ''}kept {keep} of {tokens} tokens\n" \
           f"{split_text(result.task_keep, keep)} (auto, g = {result.guidance:.1f})"


def query_box_entry(result: DemoResult, text: str = "the text") -> Optional[str]:
    """The legend's entry for the query box; None where none is drawn."""
    return None if result.box is None else f"query box: its tokens play {text}"


def figure(result: DemoResult, groups: bool = False) -> Figure:
    """The picture, readable without the terminal: [CLS] saliency and the task score (where the
    method has one) over the greyed photo with colour bars, the kept tokens (merge groups with
    ``groups``) and a legend, a title saying what is real and what stands in. Returns the Figure."""
    plt = _pyplot()
    panels = Panels(result)
    count = 2 if result.task_scores is None else 3
    width, height = PANEL_SIZE
    fig, axes = plt.subplots(1, count, figsize=(width * count, height), dpi=DPI)
    # a kept title of two lines (the split, with "auto") needs room below the figure's title
    fig.subplots_adjust(left=0.01, right=0.99, top=0.85 if result.guidance is None else 0.82,
                        bottom=legend_room(groups), wspace=0.04)
    for ax in axes[:-1]:
        panels.photo_on(ax)
    panels.heat_map(fig, axes[0], result.saliency, SALIENCY_TITLE, SALIENCY_LABEL)
    if result.task_scores is not None:
        panels.heat_map(fig, axes[1], result.task_scores, "task score: decoupled similarity to the text",
                        "task score (higher = more like the text)")
        panels.query_box(axes[1])
    panels.kept(axes[-1], kept_title(result), groups)
    panels.legend(axes[-1], groups, panels.clash, query_box_entry(result))
    fig.suptitle(f"DeSAP keeps {result.indices.numel()} of {result.grid * result.grid} visual tokens\n{result.title}",
                 fontsize=13)
    return fig


def figure_auto(results: list[DemoResult], groups: bool = False) -> Figure:
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
        panels.kept(row[2], kept_title(result), groups)
        clash |= panels.clash
    top = Panels(strong)
    top.photo_on(axes[0, 0])
    top.heat_map(fig, axes[0, 0], strong.saliency, SALIENCY_TITLE, SALIENCY_LABEL)
    top.legend(axes[1, 2], groups, clash, query_box_entry(strong, "the strong cue's text"))

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


def method_title(result: DemoResult) -> str:
    """A method panel's title: the method, and its split where it has one (DeSAP's)."""
    keep, tokens = result.indices.numel(), result.grid * result.grid
    split = "" if result.task_keep is None else split_text(result.task_keep, keep)
    return f"{result.method}: kept {keep} of {tokens}\n{split}"


def figure_methods(results: list[DemoResult], groups: bool = False) -> Figure:
    """Several pruning methods on the same photo, one kept panel each, side by side, titled with
    the method; one legend, a title saying what is real and what stands in. Returns the Figure."""
    plt = _pyplot()
    first = results[0]
    width, height = PANEL_SIZE
    fig, axes = plt.subplots(1, len(results), figsize=(width * len(results), height), dpi=DPI, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.8, bottom=legend_room(groups), wspace=0.04)
    clash = False
    for ax, result in zip(axes[0], results):
        panels = Panels(result)
        panels.kept(ax, method_title(result), groups)
        clash |= panels.clash
    Panels(first).legend(axes[0, 0], groups, clash, query_box_entry(first))
    title = textwrap.fill(first.title, 40 * len(results))
    fig.suptitle(f"{len(results)} pruning methods keep {first.indices.numel()} of {first.grid * first.grid} "
                 f"visual tokens of the same photo\n{title}", fontsize=12)
    return fig


def render(results: list[DemoResult], out: str, groups: bool = False) -> None:
    """:func:`figure` (one result), :func:`figure_methods` (--methods) or :func:`figure_auto` (strong
    and weak cue) to ``out`` (PNG unless its extension names another format); ``groups``: draw the
    merge groups too."""
    plt = _pyplot()
    if results[0].method:
        fig = figure_methods(results, groups)
    else:
        fig = figure(results[0], groups) if len(results) == 1 else figure_auto(results, groups)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
