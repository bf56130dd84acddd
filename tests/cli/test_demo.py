"""``desap demo``: the real ViT-S/14 on a real photograph, and a local LLaVA checkpoint. What the
command prints and draws is checked against what the operator and the methods keep."""
import dataclasses
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle
from PIL import Image

from desap_ops import reference
from desap_ops.cli import demo, demo_draw, demo_run, vit_s
from desap_ops.cli.main import main
from desap_ops.integrations.common.signals import capture
from desap_ops.methods import DEFAULT_METHOD, available_methods

from helpers import one_error_line

CELLS = re.compile(r"\((\d+),(\d+)\)")
CYAN = (0.0, 1.0, 1.0)


def _run(*args):
    """The CLI in a fresh process, as a person runs it."""
    return subprocess.run([sys.executable, "-m", "desap_ops", *args], capture_output=True, text=True, timeout=600)


def printed_kept(out: str, grid: int) -> list[list[int]]:
    """The kept token indices the summary prints, one list per result in order (its (row, col) lines)."""
    return [[int(r) * grid + int(c) for r, c in CELLS.findall(line)]
            for line in out.splitlines() if line.startswith("  (")]


def png_size(panels: int) -> tuple[int, int]:
    """The pixels of a one-row picture of ``panels`` panels."""
    width, height = demo_draw.PANEL_SIZE
    return round(width * panels * demo_draw.DPI), round(height * demo_draw.DPI)


def drawn_kept(ax, result: demo_run.DemoResult) -> list[int]:
    """The tokens a kept panel shows as kept: the cells whose drawn pixels are the photo's own (the
    pruned cells are greyed), read from the picture the panel holds."""
    (drawn,) = [image.get_array() for image in ax.images if image.get_array().shape[-1] == 3]
    photo = np.asarray(result.image.convert("RGB"), dtype=np.float64) / 255.0
    grid, (height, width) = result.grid, photo.shape[:2]
    kept = []
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        cell = np.s_[row * height // grid:(row + 1) * height // grid, col * width // grid:(col + 1) * width // grid]
        if np.allclose(drawn[cell], photo[cell]):
            kept.append(index)
        else:   # a pruned cell is grey: its three channels equal
            assert np.allclose(drawn[cell][..., 0], drawn[cell][..., 2]), f"cell {index} is neither kept nor greyed"
    return kept


def outline_of(indices: list[int], grid: int) -> set:
    """The edges, in grid units, between a kept cell and a pruned one or the picture's border."""
    kept, edges = set(indices), set()
    for index in kept:
        row, col = divmod(index, grid)
        for (dr, dc), edge in (((-1, 0), ((col, row), (col + 1, row))), ((1, 0), ((col, row + 1), (col + 1, row + 1))),
                               ((0, -1), ((col, row), (col, row + 1))), ((0, 1), ((col + 1, row), (col + 1, row + 1)))):
            r, c = row + dr, col + dc
            if not (0 <= r < grid and 0 <= c < grid) or r * grid + c not in kept:
                edges.add(edge)
    return edges


def drawn_outline(ax, result: demo_run.DemoResult) -> set:
    """The edges of the kept panel's outline (its thickest lines), in grid units."""
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    thickest = max(lines, key=lambda c: c.get_linewidth()[0])
    cell_w, cell_h = result.image.size[0] / result.grid, result.image.size[1] / result.grid
    return {tuple(sorted((round(x / cell_w), round(y / cell_h)) for x, y in segment))
            for segment in thickest.get_segments()}


def query_boxes(ax) -> list[tuple]:
    """The cyan rectangles (the query box) on ``ax``, as (x, y, width, height)."""
    return [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches
            if isinstance(p, Rectangle) and p.get_edgecolor()[:3] == CYAN]


# --- the plain demo: DeSAP on the ViT ------------------------------------------------------------------

@pytest.fixture(scope="module")
def astronaut() -> demo_run.DemoResult:
    """24 of 256 tokens kept on the astronaut photo, the space shuttle as the query box."""
    picture, _ = demo_run.load_image(None)
    return demo_run.run_vit(picture, 24, 0.5, demo_run.DEFAULT_BOX, None)


def test_demo_prints_and_draws_what_the_operator_keeps(tmp_path):
    """As a person runs it: the default run keeps 32 of 256 with the shuttle's box as the text, and
    prints exactly the tokens that run_vit keeps on the same photo."""
    out = tmp_path / "kept.png"
    run = _run("demo", "--out", str(out))
    assert run.returncode == 0, run.stderr
    picture, _ = demo_run.load_image(None)
    expected = demo_run.run_vit(picture, 32, 0.5, None, None)
    assert printed_kept(run.stdout, 16) == [expected.indices.tolist()]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == png_size(3)


def test_demo_keeps_what_the_operator_keeps(astronaut):
    result = astronaut
    assert result.indices.numel() == 24 and result.grid == 16
    assert (result.indices[1:] > result.indices[:-1]).all()
    assert 0 < float(result.saliency.sum()) <= 1 + 1e-6          # [CLS] also attends to itself
    top_salient = result.saliency.topk(12).indices                # K_sal = 24 - round(0.5 * 24)
    assert torch.isin(top_salient, result.indices).all()
    box_cells = demo_run.box_tokens(demo_run.DEFAULT_BOX, 512, 512, 16)
    assert torch.isin(result.indices, box_cells).any(), "the exemplar box should draw task tokens"


def test_the_kept_panel_shows_exactly_the_kept_tokens(astronaut):
    """Full colour on exactly the kept cells, greyed elsewhere, the outline around exactly them; the
    heat maps' colour bars span their data; the query box on the task and kept panels."""
    fig = demo_draw.figure(astronaut)
    try:
        saliency_ax, task_ax, kept_ax = fig.axes[:3]
        assert drawn_kept(kept_ax, astronaut) == astronaut.indices.tolist()
        assert drawn_outline(kept_ax, astronaut) == outline_of(astronaut.indices.tolist(), 16)
        for ax, values in ((saliency_ax, astronaut.saliency), (task_ax, astronaut.task_scores)):
            bar = ax.images[-1].colorbar
            assert (bar.vmin, bar.vmax) == pytest.approx((float(values.min()), float(values.max())))
        x0, y0, x1, y1 = astronaut.box
        assert query_boxes(task_ax) == query_boxes(kept_ax) == [(x0, y0, x1 - x0, y1 - y0)]
        assert query_boxes(saliency_ax) == []
        assert kept_ax.get_legend() is not None
    finally:
        plt.close(fig)


def test_groups_draw_the_merge_groups_over_the_same_kept_tokens(astronaut):
    """--groups: the same kept cells in full colour, the borders between merge groups, and a dot on
    each kept token in its group's colour, every group's tint in that same colour."""
    fig = demo_draw.figure(astronaut, groups=True)
    try:
        kept_ax = fig.axes[2]
        assert drawn_kept(kept_ax, astronaut) == astronaut.indices.tolist()
        groups = astronaut.assignment.view(16, 16).numpy()
        thin = [c for c in kept_ax.collections if isinstance(c, LineCollection)
                and len(c.get_segments()) == len(demo_draw.group_borders(groups))]
        assert thin, "no line per border between merge groups"
        (dots,) = [c for c in kept_ax.collections if not isinstance(c, LineCollection)]
        cell = 512 / 16
        at = [int(y // cell) * 16 + int(x // cell) for x, y in dots.get_offsets()]
        assert at == astronaut.indices.tolist()
        (tint,) = [image.get_array() for image in kept_ax.images if image.get_array().shape[-1] == 4]
        for dot_colour, index in zip(dots.get_facecolors(), at):
            members = np.flatnonzero(groups.ravel() == groups.ravel()[index])
            for member in members[members != index]:   # the kept token itself shows the photo
                assert np.allclose(tint[divmod(int(member), 16)][:3], dot_colour[:3])
    finally:
        plt.close(fig)


def test_a_result_without_task_scores_has_no_task_panel(astronaut, capsys):
    """A method that does not score the task (task_scores None): the saliency and kept panels only,
    and no split printed."""
    unscored = dataclasses.replace(astronaut, task_scores=None, task_keep=None)
    fig = demo_draw.figure(unscored)
    try:
        assert tuple(fig.get_size_inches() * demo_draw.DPI) == png_size(2)
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert len(panels) == 2 and drawn_kept(panels[-1], unscored) == astronaut.indices.tolist()
    finally:
        plt.close(fig)
    with_split = demo.summary([astronaut], "photo", "kept.png").splitlines()
    without = demo.summary([unscored], "photo", "kept.png").splitlines()
    assert len(with_split) == len(without) + 1 and set(without) <= set(with_split)


def _touching_pairs(groups: np.ndarray) -> list[tuple[int, int]]:
    """(group, group) of every two 4-neighbouring cells in different groups."""
    pairs = [(a, b) for first, second in ((groups[:, :-1], groups[:, 1:]), (groups[:-1], groups[1:]))
             for a, b in zip(first.ravel().tolist(), second.ravel().tolist()) if a != b]
    assert pairs, "the check needs groups that touch"
    return pairs


def test_touching_merge_groups_get_different_colours(astronaut):
    groups = astronaut.assignment.view(16, 16).numpy()
    colours = demo_draw.colour_groups(groups, len(demo_draw.GROUP_PALETTE))
    assert set(colours) == set(range(24)) and set(colours.values()) <= set(range(len(demo_draw.GROUP_PALETTE)))
    assert all(colours[a] != colours[b] for a, b in _touching_pairs(groups))


@pytest.mark.parametrize("seed", range(5))
def test_colouring_is_proper_whenever_the_palette_allows(seed):
    """Scattered groups (as merge groups are): one colour more than the most neighbours any group has
    always suffices for a greedy colouring, so no touching pair may share one."""
    groups = torch.randint(0, 40, (16, 16), generator=torch.Generator().manual_seed(seed)).numpy()
    groups[0, 0] = -1  # a token in no group is left uncoloured
    most_neighbours = max(len(near) for near in demo_draw.group_neighbours(groups).values())
    colours = demo_draw.colour_groups(groups, most_neighbours + 1)
    assert -1 not in colours
    assert all(colours[a] != colours[b] for a, b in _touching_pairs(groups) if min(a, b) >= 0)


def test_colouring_with_too_few_colours_still_colours_every_group():
    colours = demo_draw.colour_groups(np.array([[0, 1], [2, 0]]), 1)
    assert colours == {0: 0, 1: 0, 2: 0}


def test_group_borders_run_between_different_groups():
    segments = demo_draw.group_borders(np.array([[0, 0], [1, 0]]))
    assert sorted(segments) == [((0, 1), (1, 1)), ((1, 1), (1, 2))]


# --- task_ratio="auto": a strong and a weak cue ----------------------------------------------------------

@pytest.fixture(scope="module")
def astronaut_auto() -> list[demo_run.DemoResult]:
    """task_ratio="auto", 32 of 256 tokens: the face's tokens (the default box) and the mean row as the texts."""
    picture, _ = demo_run.load_image(None)
    return demo_run.run_vit_auto(picture, 32, None, None)


def test_auto_gives_the_strong_cue_a_larger_task_share_than_the_weak_one(astronaut_auto):
    strong, weak = astronaut_auto
    assert strong.box == demo_run.AUTO_DEFAULT_BOX and weak.box is None
    # the operator's rule on the g measured here: 0 task tokens up to g = 4, 24 (3/4 of 32) from g = 8
    assert strong.guidance > 8 and weak.guidance < 4
    assert (strong.task_keep, weak.task_keep) == (24, 0)
    for result in astronaut_auto:
        torch.testing.assert_close(torch.tensor([result.guidance]), reference.guidance(result.task_scores[None]))
    # the strong cue's text is its box's tokens, so they score 1 and are kept; without task tokens the
    # weak cue keeps exactly the 32 most salient tokens
    box_cells = demo_run.box_tokens(strong.box, 512, 512, 16)
    assert box_cells.numel() == 6 and torch.isin(box_cells, strong.indices).all()
    assert torch.equal(weak.indices, weak.saliency.topk(32).indices.sort().values)


def test_the_auto_figure_draws_each_cues_kept_tokens(astronaut_auto):
    """One row per cue: its task score with the query box only where the box is its text, and its
    own kept tokens."""
    strong, weak = astronaut_auto
    fig = demo_draw.figure_auto(astronaut_auto)
    try:
        assert tuple(fig.get_size_inches() * demo_draw.DPI) == tuple(np.multiply(demo_draw.AUTO_FIGURE_SIZE,
                                                                                 demo_draw.DPI))
        (_, strong_task, strong_kept, _, weak_task, weak_kept) = fig.axes[:6]
        assert drawn_kept(strong_kept, strong) == strong.indices.tolist()
        assert drawn_kept(weak_kept, weak) == weak.indices.tolist()
        assert len(query_boxes(strong_task)) == len(query_boxes(strong_kept)) == 1
        assert query_boxes(weak_task) == query_boxes(weak_kept) == []
    finally:
        plt.close(fig)


@pytest.mark.slow
def test_demo_auto_prints_and_draws_both_cues(astronaut_auto, tmp_path, capsys):
    out = tmp_path / "auto.png"
    assert main(["demo", "--task-ratio", "auto", "--out", str(out)]) == 0
    assert printed_kept(capsys.readouterr().out, 16) == [result.indices.tolist() for result in astronaut_auto]
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == tuple(round(v * demo_draw.DPI) for v in demo_draw.AUTO_FIGURE_SIZE)


# --- several pruning methods side by side (--methods) ----------------------------------------------------

METHODS = available_methods()   # every registered method, the built-ins and any installed plugin


@pytest.fixture(scope="module")
def astronaut_methods() -> list[demo_run.DemoResult]:
    """24 of 256 tokens kept on the astronaut photo by each registered method, the shuttle as the text."""
    picture, _ = demo_run.load_image(None)
    return demo_run.run_vit_methods(picture, 24, 0.5, demo_run.DEFAULT_BOX, None, METHODS)


def test_each_method_keeps_what_it_keeps_on_the_same_signals(astronaut, astronaut_methods):
    """DeSAP's panel is the plain demo's; saliency keeps the 24 most salient tokens; similarity the
    24 most like the box's tokens (which are its text, so every one of the box's 24 cells, each
    scoring 1); first the first 24. Every method keeps 24 distinct tokens, each merged into itself;
    only a method that scores the task has a split."""
    by_method = {result.method: result for result in astronaut_methods}
    assert list(by_method) == METHODS
    desap = by_method[DEFAULT_METHOD]
    assert torch.equal(desap.indices, astronaut.indices) and torch.equal(desap.assignment, astronaut.assignment)
    assert desap.task_keep == astronaut.task_keep == 12
    assert torch.equal(by_method["saliency"].indices, astronaut.saliency.topk(24).indices.sort().values)
    box_cells = demo_run.box_tokens(demo_run.DEFAULT_BOX, 512, 512, 16)
    assert box_cells.numel() == 24 and torch.equal(by_method["similarity"].indices, box_cells)
    assert torch.equal(by_method["first"].indices, torch.arange(24))
    for result in astronaut_methods:
        kept = result.indices
        assert kept.numel() == 24 and (kept[1:] > kept[:-1]).all()
        assert torch.equal(result.assignment[kept], torch.arange(24))   # a kept token merges into itself
        assert (result.task_keep is None) == (result.task_scores is None)
        if result.method != DEFAULT_METHOD:
            assert not result.task_keep


def test_random_draws_the_same_tokens_from_the_same_photo(astronaut_methods):
    picture, _ = demo_run.load_image(None)
    (again,) = demo_run.run_vit_methods(picture, 24, 0.5, demo_run.DEFAULT_BOX, None, ["random"])
    assert torch.equal(again.indices, astronaut_methods[METHODS.index("random")].indices)


def test_the_methods_figure_shows_each_methods_kept_tokens_side_by_side(astronaut_methods):
    fig = demo_draw.figure_methods(astronaut_methods)
    try:
        assert tuple(fig.get_size_inches() * demo_draw.DPI) == png_size(len(METHODS))
        panels = fig.axes[:len(METHODS)]
        assert [ax.get_title().split(":")[0] for ax in panels] == METHODS
        positions = [ax.get_position().x0 for ax in panels]
        assert positions == sorted(positions)   # side by side, in the order given
        for ax, result in zip(panels, astronaut_methods):
            assert drawn_kept(ax, result) == result.indices.tolist()
            assert drawn_outline(ax, result) == outline_of(result.indices.tolist(), 16)
        assert panels[0].get_legend() is not None
    finally:
        plt.close(fig)


def test_demo_methods_prints_what_each_method_keeps(astronaut_methods, tmp_path, capsys):
    out = tmp_path / "methods.png"
    assert main(["demo", "--methods", ",".join(METHODS), "--keep", "24", "--query-box",
                 ",".join(map(str, demo_run.DEFAULT_BOX)), "--out", str(out)]) == 0
    assert printed_kept(capsys.readouterr().out, 16) == [result.indices.tolist() for result in astronaut_methods]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == png_size(len(METHODS))


# --- mistakes: one line, exit 2, before any model loads -------------------------------------------------

@pytest.fixture
def no_vit(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(vit_s, "load_vit_s", refuse)


@pytest.mark.parametrize("extra,named", [
    (["--task-ratio", "automatic"], "automatic"),
    (["--task-ratio", "auto", "--image", "{small}"], "--query-box"),   # auto on an image of no default box
    (["--methods", "desap,nope"], "nope"),
    (["--methods", "saliency", "--task-ratio", "auto"], "--task-ratio"),
    (["--methods", "saliency", "--model", "{tmp}"], "--model"),
])
def test_demo_refuses_a_bad_argument_in_one_line_before_loading(no_vit, tmp_path, capsys, extra, named):
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 48)).save(small)
    argv = ["demo", "--out", str(tmp_path / "k.png"),
            *(a.replace("{small}", str(small)).replace("{tmp}", str(tmp_path)) for a in extra)]
    assert main(argv) == 2
    assert named in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "k.png").exists()


@pytest.mark.parametrize("module", sorted(demo.DEMO_PACKAGES))
def test_demo_without_its_extra_names_the_install(no_vit, monkeypatch, tmp_path, capsys, module):
    monkeypatch.setitem(sys.modules, module, None)   # as if not installed: find_spec answers None
    assert main(["demo", "--out", str(tmp_path / "k.png")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert demo.DEMO_PACKAGES[module] in line and line.endswith(demo.INSTALL_DEMO)


@pytest.mark.slow
def test_real_vit_saliency_matches_its_eager_attention_matrix():
    """[CLS] saliency recomputed from queries and keys equals the eager attention matrix's [CLS] row
    on the real ViT-S/14 and a real photograph."""
    picture, _ = demo_run.load_image(None)
    pixels = vit_s.preprocess(picture)
    model = vit_s.load_vit_s(attn_implementation="eager")
    for layer in (5, demo_run.FEATURE_LAYER):
        layout = vit_s.dinov2_layout(model, layer)
        with torch.no_grad(), capture(layout.taps()) as captured:
            out = model(pixels, output_attentions=True)
        saliency = layout.cls_saliency(captured)
        torch.testing.assert_close(saliency, out.attentions[layer][:, :, 0, :].mean(dim=1), rtol=1e-4, atol=1e-6)


# --- a local LLaVA checkpoint (--model) ---------------------------------------------------------------

def _tiny_checkpoint(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from desap_ops.testing.tiny import tiny_llava

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 100}
    vocab.update({f"w{i}": i for i in range(4, 100)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    processor.save_pretrained(folder)
    tiny_llava().save_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("task_ratio", ["0.5", "auto"])
def test_demo_with_a_local_llava_checkpoint(tmp_path, capsys, task_ratio):
    """The checkpoint's 4 x 4 tokens, 4 kept: what run_llava keeps is what the command prints and
    draws; with "auto" the split is the operator's rule on the scores the checkpoint gave."""
    _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "kept.png"
    capsys.readouterr()   # saving the checkpoint's progress bars
    assert main(["demo", "--model", str(tmp_path / "tiny"), "--prompt", "w5 w6 w7", "--keep", "4",
                 "--task-ratio", task_ratio, "--out", str(out)]) == 0
    picture, _ = demo_run.load_image(None)
    ratio = demo.parse_task_ratio(task_ratio)
    result = demo_run.run_llava(str(tmp_path / "tiny"), picture, "w5 w6 w7", 4, ratio)
    assert printed_kept(capsys.readouterr().out, 4) == [result.indices.tolist()]
    assert result.task_keep == int(reference.task_budget(result.task_scores[None], 4, ratio, torch.tensor([True]))[0])
    with Image.open(out) as image:
        assert image.size == png_size(3)
    fig = demo_draw.figure(result)
    try:
        assert drawn_kept(fig.axes[2], result) == result.indices.tolist()
    finally:
        plt.close(fig)


def test_llava_keep_is_checked_against_the_config_before_the_weights(tmp_path, monkeypatch, capsys):
    from transformers import LlavaForConditionalGeneration

    _tiny_checkpoint(tmp_path / "tiny")

    def refuse(*_args, **_kwargs):
        raise AssertionError("the weights were loaded before --keep was checked")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", refuse)
    capsys.readouterr()   # saving the checkpoint's progress bars
    assert main(["demo", "--model", str(tmp_path / "tiny"), "--keep", "17", "--out", str(tmp_path / "k.png")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--keep" in line and "16" in line and "17" in line   # the checkpoint's 16 tokens, the 17 asked for
