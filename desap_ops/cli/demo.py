"""``desap demo``: DeSAP on a real image, drawn (:mod:`.demo_run` runs it, :mod:`.demo_draw` draws
it). Every argument is checked before any weight is read (loading the ViT takes seconds and
hundreds of megabytes): a mistake costs a one-line error, not a wait and a traceback."""
from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Optional, Union

import torch

from desap_ops.benchmarks.arguments import INSTALL_DEMO, UsageError, check_writable, parse_methods, parse_task_ratio
from desap_ops.reference import AUTO

from . import demo_draw, vit_s
from .demo_run import (DemoResult, check_budget, load_image, parse_box, run_llava, run_vit, run_vit_auto,
                       run_vit_methods, split_text)

# the modules the demo imports from the `demo` extra (setup.py), with their distributions: a plain
# install serves the operator and the engines, not the demo
DEMO_PACKAGES = {"PIL": "pillow", "skimage": "scikit-image", "onnx": "onnx", "matplotlib": "matplotlib"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``desap demo`` and its options."""
    demo = commands.add_parser("demo", help="show what DeSAP keeps on a real image")
    demo.add_argument("--image", help="image file (default: skimage's astronaut photograph)")
    demo.add_argument("--prompt", help="the question (used with --model)")
    demo.add_argument("--keep", type=int, default=32, help="tokens to keep (default 32)")
    demo.add_argument("--task-ratio", default=0.5,
                      help="share of the kept tokens chosen by task score, the rest by [CLS] saliency, "
                           "in [0, 1] (default 0.5); or auto: each image's task scores choose it, and the "
                           "picture compares a strong cue (the query box) with a weak one")
    demo.add_argument("--model", help="local LLaVA-1.5 / LLaVA-NeXT checkpoint folder (offline)")
    demo.add_argument("--query-box", help="x0,y0,x1,y1: tokens in this box play the text (no --model)")
    demo.add_argument("--methods", help="comma-separated pruning methods drawn side by side on the same photo, e.g. "
                                        "desap,saliency,divprune (the ViT only; default: DeSAP alone)")
    demo.add_argument("--groups", action="store_true",
                      help="also draw the merge groups: which kept token each pruned token merges into")
    demo.add_argument("--out", default="kept.png",
                      help="picture to write, its format from the extension (default kept.png)")


def run(args: argparse.Namespace) -> int:
    print(demo(image=args.image, prompt=args.prompt, keep=args.keep, task_ratio=args.task_ratio,
               model=args.model, out=args.out, query_box=args.query_box, methods=args.methods, groups=args.groups))
    return 0


def check_demo_packages() -> None:
    """Refuse to start without the `demo` extra, in one line naming what is missing and the install."""
    def importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):   # ValueError: a module in sys.modules without a spec
            return False

    missing = [package for module, package in DEMO_PACKAGES.items() if not importable(module)]
    if missing:
        raise UsageError(f"desap demo needs {', '.join(missing)} (the demo extra): {INSTALL_DEMO}")


def check_out(out: str) -> None:
    """Refuse an --out that savefig would fail on after all the work: a missing or read-only folder,
    a folder given as the file, a format matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    check_writable("--out", out, f"such as {os.path.join(out, 'kept.png')}")
    extension = os.path.splitext(out)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension and extension not in formats:
        raise UsageError(f"--out {out}: cannot draw .{extension}; use one of {', '.join(sorted(formats))}")


def summary(results: list[DemoResult], source: str, out: str) -> str:
    """What ``desap demo`` prints: the source, the notes, then for each result (one, or the strong and
    the weak cue with "auto") the split (where it has task scores), the kept cells and the merge counts."""
    lines = [f"image: {source}", *results[0].notes]
    for result in results:
        grid, keep = result.grid, result.indices.numel()
        counts = torch.bincount(result.assignment[result.assignment >= 0], minlength=keep)
        cells = [divmod(i, grid) for i in result.indices.tolist()]
        label = result.method or result.cue
        head = f"{label}: " if label else ""
        chosen = "" if result.guidance is None else f", chosen by task_ratio auto from g = {result.guidance:.2f}"
        if result.task_keep is not None:   # a method that does not score the task has no split
            lines.append(f"{head}split {split_text(result.task_keep, keep)}{chosen}")
        lines += [f"{head}kept {keep} of {grid * grid} tokens ({grid}x{grid} grid), as (row, col):",
                  "  " + " ".join(f"({r},{c})" for r, c in cells),
                  f"{head}tokens merged into each kept token: min {int(counts.min())}, median {int(counts.median())}, "
                  f"max {int(counts.max())}"]
    lines.append(f"wrote {out}")
    return "\n".join(lines)


def demo(image: Optional[str] = None, prompt: Optional[str] = None, keep: int = 32,
         task_ratio: Union[float, str] = 0.5, model: Optional[str] = None, out: str = "kept.png",
         query_box: Optional[str] = None, methods: Optional[str] = None, groups: bool = False) -> str:
    """Run the demo, write ``out`` and return the summary; a fixable mistake raises UsageError, and
    every argument is checked before a model is loaded. ``task_ratio`` "auto" on the ViT draws the
    strong and the weak cue, one row each. ``methods`` ("desap,saliency,divprune"): those pruning
    methods on the ViT's signals, side by side. ``groups``: the picture shows the merge groups too."""
    check_demo_packages()
    task_ratio = parse_task_ratio(task_ratio)
    check_out(out)
    names = parse_methods(methods) if methods is not None else None
    if names is not None and model is not None:
        raise UsageError("--methods draws the methods on the ViT-S/14's signals; it does not take --model")
    if names is not None and task_ratio == AUTO:
        raise UsageError("--methods takes a task ratio in [0, 1]; --task-ratio auto draws the strong and weak cue")
    if model is not None:
        if not os.path.isdir(model):
            raise UsageError(f"--model must be a local checkpoint folder, got {model}")
        if query_box is not None:
            raise UsageError("--query-box stands in for the text without --model; "
                             "with --model the prompt is the text")
        # the upper bound needs the checkpoint's config: run_llava checks it before the weights
        check_budget(keep, None, "N: the checkpoint's image tokens, read before its weights")
    else:
        check_budget(keep, vit_s.GRID ** 2, f"the ViT-S/14 sees {vit_s.GRID}x{vit_s.GRID} tokens")
        try:
            vit_s.onnx_path()
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise UsageError(str(err)) from err
    picture, source = load_image(image)
    if model is not None:
        results = [run_llava(model, picture, prompt, keep, task_ratio)]
    else:
        box = parse_box(query_box, *picture.size)
        if names is not None:
            results = run_vit_methods(picture, keep, task_ratio, box, prompt, names)
        elif task_ratio != AUTO:
            results = [run_vit(picture, keep, task_ratio, box, prompt)]
        elif box is None and picture.size != (512, 512):
            raise UsageError("--task-ratio auto compares a strong cue, the tokens in --query-box, with a weak one: "
                             "give --query-box x0,y0,x1,y1 for this image")
        else:
            results = run_vit_auto(picture, keep, box, prompt)
    demo_draw.render(results, out, groups)
    return summary(results, source, out)
