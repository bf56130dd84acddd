"""``desap demo``: the real ViT-S/14 on a real photograph, and a local LLaVA checkpoint."""
import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle
from PIL import Image

from desap_ops import reference
from desap_ops.cli import demo_draw, demo_run, vit_s
from desap_ops.cli.main import main
from desap_ops.integrations.common.signals import capture

REPO = Path(__file__).resolve().parents[2]
PNG_SIZE = (1500, 660)  # demo_draw.FIGURE_SIZE at demo_draw.DPI
AUTO_PNG_SIZE = (1500, 1300)  # demo_draw.AUTO_FIGURE_SIZE: two rows, strong and weak cue
SPLIT = re.compile(r"^(strong cue|weak cue): split task (\d+) / saliency (\d+) of (\d+), "
                   r"chosen by task_ratio auto from g = ([\d.]+)$", re.MULTILINE)


def _run(*args):
    """The CLI in a fresh process, as a person runs it."""
    return subprocess.run([sys.executable, "-m", "desap_ops", *args], capture_output=True, text=True, timeout=600)


def test_demo_default_draws_real_saliency_on_a_real_photo(tmp_path):
    out = tmp_path / "kept.png"
    run = _run("demo", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "real: ViT-S/14 weights" in run.stdout and "stand-in:" in run.stdout
    assert "kept 32 of 256 tokens" in run.stdout
    assert "split task 16 / saliency 16 of 32" in run.stdout   # task_ratio 0.5 of 32
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == PNG_SIZE


@pytest.mark.slow
def test_demo_auto_prints_both_splits_and_draws_both_cues(tmp_path):
    out = tmp_path / "auto.png"
    run = _run("demo", "--task-ratio", "auto", "--out", str(out))
    assert run.returncode == 0, run.stderr
    splits = {cue: (int(task), int(sal), int(keep), float(g)) for cue, task, sal, keep, g in SPLIT.findall(run.stdout)}
    assert set(splits) == {"strong cue", "weak cue"}, run.stdout
    for task, sal, keep, _ in splits.values():
        assert task + sal == keep == 32
    assert splits["strong cue"][0] > splits["weak cue"][0]
    assert "weak cue = one row, the mean of all 256 tokens' attention-branch rows" in run.stdout
    assert "the shuttle box (360, 10, 460, 270) as the strong cue would give g = " in run.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == AUTO_PNG_SIZE


@pytest.fixture(scope="module")
def astronaut() -> demo_run.DemoResult:
    """24 of 256 tokens kept on the astronaut photo, the space shuttle as the query box."""
    picture, _ = demo_run.load_image(None)
    return demo_run.run_vit(picture, 24, 0.5, demo_run.DEFAULT_BOX, None)


@pytest.fixture(scope="module")
def astronaut_auto() -> list[demo_run.DemoResult]:
    """task_ratio="auto", 32 of 256 tokens: the face's tokens (the default box) and the mean row as the texts."""
    picture, _ = demo_run.load_image(None)
    return demo_run.run_vit_auto(picture, 32, None, None)


def test_auto_gives_the_strong_cue_a_larger_task_share_than_the_weak_one(astronaut_auto):
    strong, weak = astronaut_auto
    assert (strong.cue, weak.cue) == ("strong cue", "weak cue")
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


def test_the_auto_figure_compares_the_cues(astronaut_auto):
    strong, weak = astronaut_auto
    fig = demo_draw.figure_auto(astronaut_auto)
    try:
        assert tuple(fig.get_size_inches() * demo_draw.DPI) == AUTO_PNG_SIZE
        (_, strong_task, strong_kept, note_ax, weak_task, weak_kept) = fig.axes[:6]
        assert fig.axes[0].get_title() == demo_draw.SALIENCY_TITLE
        assert strong_kept.get_title() == ("strong cue: kept 32 of 256 tokens\n"
                                           f"task 24 / saliency 8 of 32 (auto, g = {strong.guidance:.1f})")
        assert weak_kept.get_title() == ("weak cue: kept 32 of 256 tokens\n"
                                         f"task 0 / saliency 32 of 32 (auto, g = {weak.guidance:.1f})")
        assert strong_task.get_title().startswith("strong cue: task score")
        assert weak_task.get_title().startswith("weak cue: task score")
        cyan = lambda ax: [p for p in ax.patches if isinstance(p, Rectangle)  # noqa: E731
                           and p.get_edgecolor()[:3] == (0.0, 1.0, 1.0)]
        assert len(cyan(strong_task)) == len(cyan(strong_kept)) == 1 and not cyan(weak_task) + cyan(weak_kept)
        note = " ".join(" ".join(t.get_text() for t in note_ax.texts).split())
        assert "weak cue: one row, the mean of all 256 tokens' attention-branch rows" in note
        assert "strong cue: the 6 tokens in the cyan query box" in note
        assert "weak cue = one row, the mean" in fig.get_suptitle() and "real: ViT-S/14" in fig.get_suptitle()
        assert "strong cue's text" in " ".join(t.get_text() for t in weak_kept.get_legend().get_texts())
    finally:
        plt.close(fig)


def test_demo_keeps_what_the_operator_keeps(astronaut):
    result = astronaut
    assert result.indices.numel() == 24 and result.grid == 16
    assert (result.indices[1:] > result.indices[:-1]).all()
    assert 0 < float(result.saliency.sum()) <= 1 + 1e-6          # [CLS] also attends to itself
    top_salient = result.saliency.topk(12).indices                # K_sal = 24 - round(0.5 * 24)
    assert torch.isin(top_salient, result.indices).all()
    box_cells = demo_run.box_tokens(demo_run.DEFAULT_BOX, 512, 512, 16)
    assert torch.isin(result.indices, box_cells).any(), "the exemplar box should draw task tokens"


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


def test_the_figure_explains_itself(astronaut):
    """Colour bars on both heat maps spanning their data, the query box on the task and kept panels,
    group borders, a legend and a title that say what is real and what stands in."""
    fig = demo_draw.figure(astronaut)
    try:
        saliency_ax, task_ax, kept_ax = fig.axes[:3]
        for ax, values in ((saliency_ax, astronaut.saliency), (task_ax, astronaut.task_scores)):
            bar = ax.images[-1].colorbar
            assert bar is not None and bar.ax.get_xlabel()
            assert (bar.vmin, bar.vmax) == pytest.approx((float(values.min()), float(values.max())))
        x0, y0, x1, y1 = astronaut.box
        for ax in (task_ax, kept_ax):
            boxes = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[:3] == (0.0, 1.0, 1.0)]
            drawn = [(b.get_x(), b.get_y(), b.get_width(), b.get_height()) for b in boxes]
            assert drawn == [(x0, y0, x1 - x0, y1 - y0)]
        (borders,) = [c for c in kept_ax.collections if isinstance(c, LineCollection)]
        groups = astronaut.assignment.view(16, 16).numpy()
        assert len(borders.get_segments()) == len(demo_draw.group_borders(groups))
        legend = " ".join(text.get_text() for text in kept_ax.get_legend().get_texts())
        for entry in ("kept token (24 in all)", "merged into the kept token", "query box"):
            assert entry in legend
        title = fig.get_suptitle()
        assert "real: ViT-S/14 weights" in title and "[CLS] saliency" in title and "stand-in:" in title
    finally:
        plt.close(fig)


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(desap_ops modules, other top-level modules) that ``module``'s source imports, lazily or not."""
    spec = importlib.util.find_spec(module)
    package = module if spec.submodule_search_locations is not None else module.rpartition(".")[0]
    own, other = set(), set()
    if spec.origin is None:   # a namespace package (desap_ops.kernels): no code of its own
        return own, other
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [importlib.util.resolve_name("." * node.level + (node.module or ""), package)]
            base = importlib.util.find_spec(names[0]) if names[0].startswith("desap_ops") else None
            if base is not None and base.submodule_search_locations is not None:
                # ``from . import vit_s`` names a module, ``from desap_ops import prune`` a function
                names += [f"{names[0]}.{alias.name}" for alias in node.names
                          if importlib.util.find_spec(f"{names[0]}.{alias.name}") is not None]
        else:
            continue
        for name in names:
            if name.startswith("desap_ops"):
                own.add(name)
            else:
                other.add(name.split(".")[0])
    return own, other


def _distribution(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_a_plain_install_brings_everything_the_command_line_imports():
    """``pip install .`` then ``desap demo``: every module that the CLI (the demo and every module of
    desap_ops it reaches) imports comes from setup.py's install_requires, not from an extra."""
    setup_call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                      if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    requires = ast.literal_eval(next(k.value for k in setup_call.keywords if k.arg == "install_requires"))
    required = {_distribution(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requires}

    # the command line and the benchmarks it imports when one runs (but the two modules inside vLLM)
    queue = ["desap_ops.cli.main", "desap_ops.benchmarks.op", "desap_ops.benchmarks.e2e",
             "desap_ops.benchmarks.vllm.offline", "desap_ops.benchmarks.vllm.serve"]
    seen, third_party = set(), set()
    while queue:
        module = queue.pop()
        if module not in seen:
            seen.add(module)
            own, other = _imports(module)
            queue += sorted(own)
            third_party |= {name for name in other if name not in sys.stdlib_module_names and name != "__future__"}
    assert {"PIL", "skimage", "onnx", "matplotlib"} <= third_party, third_party
    # and setup.py installs every package of desap_ops they come from
    packages = set(ast.literal_eval(next(k.value for k in setup_call.keywords if k.arg == "packages")))
    reached = {m if importlib.util.find_spec(m).submodule_search_locations is not None else m.rpartition(".")[0]
               for m in seen}
    assert "desap_ops.benchmarks.vllm._cpu_fixes" in reached and reached <= packages, reached - packages
    distributions = importlib.metadata.packages_distributions()
    for name in sorted(third_party):
        assert name in distributions, f"{name} is imported but not installed"
        assert any(_distribution(d) in required for d in distributions[name]), f"{name} is not in install_requires"


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
def test_demo_with_a_local_llava_checkpoint(tmp_path):
    _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "kept.png"
    run = _run("demo", "--model", str(tmp_path / "tiny"), "--prompt", "w5 w6 w7", "--keep", "4",
               "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kept 4 of 16 tokens" in run.stdout
    with Image.open(out) as image:
        assert image.size == PNG_SIZE


def test_llava_keep_is_checked_against_the_config_before_the_weights(tmp_path, monkeypatch, capsys):
    from transformers import LlavaForConditionalGeneration

    _tiny_checkpoint(tmp_path / "tiny")

    def refuse(*_args, **_kwargs):
        raise AssertionError("the weights were loaded before --keep was checked")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", refuse)
    assert main(["demo", "--model", str(tmp_path / "tiny"), "--keep", "17", "--out", str(tmp_path / "k.png")]) == 2
    assert "--keep must lie in [1, N] = [1, 16], got 17" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_with_a_local_llava_checkpoint_and_auto(tmp_path, capsys):
    """--task-ratio auto goes through to apply_desap; the summary names the split the prompt's scores chose."""
    _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "kept.png"
    assert main(["demo", "--model", str(tmp_path / "tiny"), "--prompt", "w5 w6 w7", "--keep", "4",
                 "--task-ratio", "auto", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    match = re.search(r"^split task (\d) / saliency (\d) of 4, chosen by task_ratio auto from g = ", printed, re.MULTILINE)
    assert match and int(match[1]) + int(match[2]) == 4, printed
    with Image.open(out) as image:
        assert image.size == PNG_SIZE


@pytest.fixture
def no_vit(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(vit_s, "load_vit_s", refuse)


@pytest.mark.parametrize("extra,message", [
    (["--task-ratio", "automatic"], "--task-ratio must be a number in [0, 1] or auto, got 'automatic'"),
    (["--task-ratio", "auto", "--image", "{small}"], "--task-ratio auto compares a strong cue, the tokens in --query-box"),
])
def test_demo_refuses_a_bad_task_ratio_in_one_line_before_loading(no_vit, tmp_path, capsys, extra, message):
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 48)).save(small)
    argv = ["demo", "--out", str(tmp_path / "k.png"), *(a.replace("{small}", str(small)) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("desap: error: ") and message in err, err


# --- several pruning methods side by side (--methods) ---------------------------------------------------

SIDE_BY_SIDE = ["desap", "saliency", "similarity", "divprune", "random", "first"]


@pytest.fixture(scope="module")
def astronaut_methods() -> list[demo_run.DemoResult]:
    """24 of 256 tokens kept on the astronaut photo by each method of SIDE_BY_SIDE, the shuttle as the text."""
    picture, _ = demo_run.load_image(None)
    return demo_run.run_vit_methods(picture, 24, 0.5, demo_run.DEFAULT_BOX, None, SIDE_BY_SIDE)


def test_each_method_keeps_what_it_keeps_on_the_same_signals(astronaut, astronaut_methods):
    """DeSAP's panel is the plain demo's; saliency keeps the 24 most salient tokens; similarity the
    24 most like the box's tokens (which are its text, so every one of the box's 24 cells, each
    scoring 1); first the first 24; divprune and random their own choice, different from those."""
    by_method = {result.method: result for result in astronaut_methods}
    assert list(by_method) == SIDE_BY_SIDE
    desap = by_method["desap"]
    assert torch.equal(desap.indices, astronaut.indices) and torch.equal(desap.assignment, astronaut.assignment)
    assert desap.task_keep == astronaut.task_keep == 12
    assert torch.equal(by_method["saliency"].indices, astronaut.saliency.topk(24).indices.sort().values)
    box_cells = demo_run.box_tokens(demo_run.DEFAULT_BOX, 512, 512, 16)
    assert box_cells.numel() == 24 and torch.equal(by_method["similarity"].indices, box_cells)
    assert torch.equal(by_method["first"].indices, torch.arange(24))
    for name in ("divprune", "random"):
        kept = by_method[name].indices
        assert kept.numel() == 24 and (kept[1:] > kept[:-1]).all()
        assert not any(torch.equal(kept, by_method[other].indices) for other in ("saliency", "similarity", "first"))
    for result in astronaut_methods:   # every token merges into a kept one; a kept token into itself
        assert torch.equal(result.assignment[result.indices], torch.arange(24))
        assert result.task_keep == (12 if result.method == "desap" else 0)


def test_random_draws_the_same_tokens_from_the_same_photo(astronaut_methods):
    picture, _ = demo_run.load_image(None)
    (again,) = demo_run.run_vit_methods(picture, 24, 0.5, demo_run.DEFAULT_BOX, None, ["random"])
    assert torch.equal(again.indices, astronaut_methods[SIDE_BY_SIDE.index("random")].indices)


def test_the_methods_figure_draws_one_panel_per_method_side_by_side(astronaut_methods):
    fig = demo_draw.figure_methods(astronaut_methods)
    try:
        assert tuple(fig.get_size_inches() * demo_draw.DPI) == (500 * len(SIDE_BY_SIDE), 660)
        panels = fig.axes[:len(SIDE_BY_SIDE)]
        assert [ax.get_title().split(":")[0] for ax in panels] == SIDE_BY_SIDE
        assert panels[0].get_title() == "desap: kept 24 of 256\ntask 12 / saliency 12 of 24"
        positions = [ax.get_position().x0 for ax in panels]
        assert positions == sorted(positions)   # side by side, in the order given
        for ax, result in zip(panels, astronaut_methods):
            white = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[:3] == (1.0, 1.0, 1.0)]
            grid_w = 512 / 16
            assert sorted(int(p.get_y() // grid_w) * 16 + int(p.get_x() // grid_w) for p in white) == \
                result.indices.tolist()
        assert "6 pruning methods keep 24 of 256" in fig.get_suptitle()
        assert fig.axes[0].get_legend() is not None
    finally:
        plt.close(fig)


def test_demo_methods_writes_one_png_and_a_summary_per_method(tmp_path, capsys):
    out = tmp_path / "methods.png"
    assert main(["demo", "--methods", "desap,saliency,divprune", "--keep", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("desap", "saliency", "divprune"):
        assert f"{name}: kept 16 of 256 tokens (16x16 grid)" in printed
    assert "desap: split task 8 / saliency 8 of 16" in printed and "saliency: split" not in printed
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1500, 660)


@pytest.mark.parametrize("extra,message", [
    (["--methods", "desap,nope"], "--methods: 'nope' is not a registered pruning method; registered: "),
    (["--methods", "saliency", "--task-ratio", "auto"], "--methods takes a task ratio in [0, 1]"),
    (["--methods", "saliency", "--model", "{tmp}"], "--methods draws the methods on the ViT-S/14's signals"),
])
def test_demo_refuses_bad_methods_in_one_line_before_loading(no_vit, tmp_path, capsys, extra, message):
    argv = ["demo", "--out", str(tmp_path / "k.png"), *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("desap: error: ") and message in err, err
