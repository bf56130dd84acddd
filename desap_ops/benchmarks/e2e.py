"""``desap bench e2e``: prefill of a whole model with and without DeSAP, for every model in
:data:`desap_ops.testing.models.MODELS` (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT-Video,
Video-LLaVA).

For each budget K three prefills of the same model on the same batch (per row: one image, or one
video, and 32 text tokens; logits of the last position only, as generate's prefill):

- full: the unpatched model, N image (or video) tokens;
- desap: ``apply_desap(model, keep=K)``, all of DeSAP's work included;
- ideal: ``apply_desap(model, keep=K, ideal=True)``, each image's (or video's) first K tokens with
  no pruning work at all, the speed DeSAP could reach if pruning cost nothing. The vision tower
  runs plainly on every token (pruning after the encoder cannot save it; no attention capture,
  no text embedded), then only the kept tokens go through the projector: the first K of the image
  (the video models: of the clip, frame-major; the Qwen models: of the encoder's output, its patch
  merger included, at their original positions, and Qwen3-VL's DeepStack levels their first K).
  On LLaVA-NeXT K counts the image-newlines, as DeSAP's K does: every newline is kept, and the
  first K - newlines visual tokens of the packed order. It is the library's ideal, the one vLLM's
  ``"ideal": true`` keeps too (``integrations.common.pruning``).

Other pruning methods (``--methods``, ``desap_ops.methods``): ``apply_desap(model, keep=K,
method=m)`` at every budget beside these three, each one more variant of the same rounds; their
cost beyond the ideal (time and FLOPs) is what choosing and merging their tokens costs.

Timing: rounds after one warm-up round; in each round, for each K, full, desap, ideal and every
other method run one after another, so load from other processes hits them all alike; each time is the median over
the rounds (CUDA events on CUDA), and the ratios are ratios of those medians. The LLaVA-1.5 and
LLaVA-NeXT layouts also time the vision tower alone once per round.

FLOPs come from ``torch.utils.flop_counter`` (with a formula for SDPA's CPU kernel, which torch
leaves uncounted). For the LLaVA-1.5 and LLaVA-NeXT layouts they are counted over the pieces (vision
tower, projector, DeSAP's operator, language model) on a meta copy of the model, so ``--device
meta`` counts them at any size without memory. The Qwen and video models count them on the real
forward passes (the prompt surgery reads token ids); with ``--device meta`` those passes run on a
CPU under :class:`desap_ops.benchmarks.flops.ShapesOnly`, with parameters that hold no memory: every
counted op runs on meta and gives zeros, the rest for real, so the count is exact at any size (the
same as a real forward's; tests/benchmarks/test_bench_e2e.py compares them) and a few GiB suffice.
Real model shapes carry random weights: the timings hold for any weights; the outputs mean nothing.
Before building, the model's memory is estimated and compared with what the device has free, so a
model that cannot fit is refused instead of killed.
"""
from __future__ import annotations

import statistics
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from desap_ops import ops
from desap_ops.cli.errors import UsageError, parse_methods
from desap_ops.integrations import apply_desap, image_token_counts, remove_desap
from desap_ops.integrations.common.layout import drops_cls, packed_sources
from desap_ops.integrations.common.sequence import image_budget
from desap_ops.integrations.hf.video import tokens_per_frame
from desap_ops.methods import DEFAULT_METHOD, MethodInputs, Signal, get_method, run_method
from desap_ops.testing.models import MODELS, build_model
from desap_ops.testing.real_shapes import weight_bytes

from .flops import flops_of
from .machine import (DTYPES, GIB, Environment, LoadAverage, check_device, check_memory, load_average,
                      time_call_ms)
from .skeleton import Progress, check_at_least_one, check_budgets, optional, paper_budgets, parse_budgets

if TYPE_CHECKING:   # matplotlib is imported when a plot is asked for
    from matplotlib.figure import Figure

TEXT_TOKENS = 32
PIECEWISE = ("llava", "llava_next")   # families whose FLOPs are counted from the pieces
QWEN = ("qwen2_5_vl", "qwen3_vl")     # families whose vision encoder merges 2 x 2 patches (merger included)
FRAMES = {True: 3, False: 8}          # frames per video: tiny, real shape
QWEN_GRID = {True: 8, False: 48}      # patches per side of the Qwen image: tiny, real shape (ModelSpec.grid first)
WARMUP_ROUNDS = 1
VARIANTS = ("full", "desap", "ideal")
# Memory a run needs beyond its weights: activations of one prefill (CPU attention holds its
# scores), the allocator's slack and the FLOP counter's meta copy, as a share of the weights plus a
# fixed part.
MEMORY_MARGIN, MEMORY_FIXED = 0.25, 1 * GIB


# --- the batch ---------------------------------------------------------------------------------------

@dataclass
class Batch:
    inputs: dict
    tokens: int        # placeholder tokens per image or video (before pruning)
    token_id: int      # the placeholder's id
    features: str      # the model's method that returns those tokens' features
    newlines: int = 0  # image-newlines among the placeholders (LLaVA-NeXT), which every budget keeps


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
    newlines = 0
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
        if spec.family == "llava_next":
            newlines = int((packed_sources(config, inputs["image_sizes"][:1])[0] < 0).sum())
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
    return Batch({k: v.to(device) for k, v in inputs.items()}, tokens, token_id, features, newlines)


# --- the plan ----------------------------------------------------------------------------------------

@dataclass
class E2ePlan:
    model: str
    keeps: list[int]            # the budgets, each in [1, image_tokens]
    image_tokens: int           # placeholder tokens per image or video
    device: str = "cpu"         # cpu, cuda, or meta (FLOPs counted, nothing timed)
    dtype: str = "fp32"         # a key of machine.DTYPES
    batch: int = 1
    repeats: int = 5            # timed rounds after WARMUP_ROUNDS
    shrink: bool = False        # a real shape at reduced depth and width (tests)
    methods: list[str] = field(default_factory=lambda: [DEFAULT_METHOD])   # DeSAP first, then the others

    @property
    def timed(self) -> bool:
        return self.device != "meta"

    @property
    def others(self) -> list[str]:
        """The methods measured beside DeSAP."""
        return self.methods[1:]


def default_keeps(tokens: int) -> list[int]:
    """N itself (DeSAP's own cost with nothing pruned), then the paper's budgets: 576, 192, 128, 64
    for LLaVA-1.5."""
    return [tokens, *paper_budgets(tokens)]


def memory_needed(weights: int) -> int:
    """Bytes a timed run needs for ``weights`` bytes of weights: the weights, MEMORY_MARGIN of them
    and MEMORY_FIXED for activations."""
    return int(weights * (1 + MEMORY_MARGIN)) + MEMORY_FIXED


def make_plan(model: str, keeps: Optional[list[int]] = None, device: str = "cpu", dtype: Optional[str] = None,
              batch: int = 1, repeats: int = 5, shrink: bool = False,
              methods: Optional[list[str]] = None) -> E2ePlan:
    """The run of ``model`` at ``keeps`` (default: :func:`default_keeps`) checked against the model,
    before anything is built but on meta: the budgets within its image tokens, and for a timed run
    its memory within what ``device`` has free (UsageError). ``dtype`` defaults to fp32 on a CPU,
    else bf16. ``methods``: registered pruning methods measured beside DeSAP, which always runs
    first (default DeSAP alone)."""
    if model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {model}")
    check_at_least_one(repeats=repeats, batch=batch)
    dtype = dtype or ("fp32" if device == "cpu" else "bf16")
    counter = build_model(model, "meta", DTYPES[dtype], shrink)
    tokens = make_batch(counter, model, batch, "meta", DTYPES[dtype]).tokens
    keeps = default_keeps(tokens) if keeps is None else keeps
    if not keeps:
        raise UsageError("--keep needs at least one budget")
    check_budgets(keeps, tokens, model)
    if device != "meta":
        weights = weight_bytes(counter)

        def hint(free: int) -> str:
            fits_in_bf16 = DTYPES[dtype].itemsize > 2 and memory_needed(weights // 2) <= free
            return "use --device meta to count its FLOPs" + (", or --dtype bf16" if fits_in_bf16 else "")

        check_memory(f"{model} in {dtype}", memory_needed(weights), device,
                     f"{weights / GIB:.1f} GiB of weights + {MEMORY_MARGIN:.0%} + {MEMORY_FIXED / GIB:.0f} GiB for "
                     "activations", hint)
    methods = list(dict.fromkeys([DEFAULT_METHOD, *(parse_methods(",".join(methods)) if methods else [])]))
    return E2ePlan(model, keeps, tokens, device, dtype, batch, repeats, shrink, methods)


def check(args: Namespace) -> None:
    """The device, the budgets' syntax, the methods and the rounds (UsageError)."""
    check_device(args.device)
    parse_budgets(args.keep)
    if args.methods is not None:
        parse_methods(args.methods)
    check_at_least_one(repeats=args.repeats, batch=args.batch)


def plan(args: Namespace) -> E2ePlan:
    return make_plan(args.model, parse_budgets(args.keep), args.device, args.dtype, args.batch, args.repeats,
                     methods=None if args.methods is None else parse_methods(args.methods))


# --- the variants --------------------------------------------------------------------------------------

@contextmanager
def variant(model: nn.Module, name: str, keep: int) -> Iterator[None]:
    """The model set up for one of :data:`VARIANTS`, or a pruning method by name, at budget
    ``keep``: as it is (full), or patched by ``apply_desap`` (ideal: ``ideal=True``; desap or
    another method: ``method=name``) and restored after. Every variant reads the same inputs."""
    if name == "ideal":
        apply_desap(model, keep=keep, ideal=True)
    elif name != "full":
        apply_desap(model, keep=keep, method=name)
    try:
        yield
    finally:
        remove_desap(model)


def _prefill(model, inputs: dict) -> Callable[[], object]:
    return lambda: model(**inputs, logits_to_keep=1)


def _tower_call(model, inputs: dict) -> Callable[[], object]:
    """The vision tower alone on the batch's pixels (LLaVA-1.5 and LLaVA-NeXT layouts)."""
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:
        pixels = pixels.flatten(0, 1)
    return lambda: model.model.vision_tower(pixels, output_hidden_states=True)


# --- the result --------------------------------------------------------------------------------------

@dataclass
class Flops:
    """FLOPs of one prefill of each variant, and (LLaVA layouts) of its pieces."""
    full: int
    desap: int
    ideal: int
    operator: Optional[int] = optional()          # DeSAP's op (LLaVA layouts)
    vision_tower: Optional[int] = optional()      # the tower (LLaVA layouts), the encoder with its mergers (Qwen)
    language_full: Optional[int] = optional()     # the language model on the full prompt (LLaVA layouts)
    language_keep: Optional[int] = optional()     # ... on the pruned prompt
    methods: Optional[dict[str, int]] = optional()   # each other method's prefill (--methods)


@dataclass
class VariantTimes:
    """Milliseconds of each variant, one per timed round."""
    full: list[float]
    desap: list[float]
    ideal: list[float]
    methods: Optional[dict[str, list[float]]] = optional()   # each other method's (--methods)


@dataclass
class MethodRow:
    """One other method at one budget, beside DeSAP: what its prefill costs against the full model
    and the ideal (its time and FLOPs beyond the ideal are its pruning work)."""
    flops: int
    flops_reduction: float                                 # full / method FLOPs
    pruning_flops: int                                     # method - ideal FLOPs
    ms: Optional[float] = optional()                       # median over the rounds
    speedup: Optional[float] = optional()                  # full / method time
    overhead_ms: Optional[float] = optional()              # method - ideal
    share_of_ideal_speedup: Optional[float] = optional()   # ideal / method time


@dataclass
class E2eRow:
    """One budget: FLOPs counted, and for a timed run each variant's median time and the ratios."""
    keep: int
    flops: Flops
    flops_reduction: float                                 # full / desap FLOPs
    language_flops_reduction: Optional[float] = optional()  # full / pruned language-model FLOPs
    rounds_ms: Optional[VariantTimes] = optional()
    full_ms: Optional[float] = optional()
    desap_ms: Optional[float] = optional()
    ideal_ms: Optional[float] = optional()
    speedup: Optional[float] = optional()                  # full / desap time
    ideal_speedup: Optional[float] = optional()            # full / ideal time
    overhead_ms: Optional[float] = optional()              # desap - ideal: what the pruning itself costs
    overhead_share: Optional[float] = optional()           # of the desap time
    share_of_ideal_speedup: Optional[float] = optional()   # ideal / desap time
    methods: Optional[dict[str, MethodRow]] = optional()   # the other methods (--methods), in their order

    @classmethod
    def of(cls, keep: int, flops: Flops, rounds: Optional[VariantTimes] = None) -> "E2eRow":
        row = cls(keep, flops, flops.full / flops.desap, rounds_ms=rounds)
        if flops.language_keep:
            row.language_flops_reduction = flops.language_full / flops.language_keep
        if flops.methods:
            row.methods = {name: MethodRow(count, flops.full / count, count - flops.ideal)
                           for name, count in flops.methods.items()}
        if rounds is not None:
            full, desap, ideal = (statistics.median(getattr(rounds, v)) for v in VARIANTS)
            row.full_ms, row.desap_ms, row.ideal_ms = full, desap, ideal
            row.speedup, row.ideal_speedup = full / desap, full / ideal
            row.overhead_ms, row.overhead_share = desap - ideal, (desap - ideal) / desap
            row.share_of_ideal_speedup = ideal / desap
            for name, times in (rounds.methods or {}).items():
                other = row.methods[name]
                other.ms = statistics.median(times)
                other.speedup, other.overhead_ms = full / other.ms, other.ms - ideal
                other.share_of_ideal_speedup = ideal / other.ms
        return row

    def costs(self) -> dict[str, MethodRow]:
        """Every method at this budget as a :class:`MethodRow`, DeSAP first (from its own fields)."""
        f = self.flops
        desap = MethodRow(f.desap, self.flops_reduction, f.desap - f.ideal, self.desap_ms, self.speedup,
                          self.overhead_ms, self.share_of_ideal_speedup)
        return {DEFAULT_METHOD: desap, **(self.methods or {})}


@dataclass
class E2eResult:
    environment: Environment
    model: str
    weights: str                 # "random": real shapes carry random weights
    measured: str                # "timed" or "FLOPs counted"
    device: str
    dtype: str
    batch: int
    image_tokens: int
    text_tokens: int
    rows: list[E2eRow]
    shrink: bool = False         # a real shape at reduced depth and width
    repeats: Optional[int] = optional()
    warmup_rounds: Optional[int] = optional()
    load_average: Optional[LoadAverage] = optional()
    vision_tower_ms: Optional[float] = optional()          # median of the tower alone (LLaVA layouts)
    vision_tower_rounds_ms: Optional[list[float]] = optional()
    command: Optional[str] = optional()   # the call that ran it, where not the command line (a shrunk shape)
    methods: Optional[list[str]] = optional()   # DeSAP then the other methods (--methods); None: DeSAP alone

    @property
    def timed(self) -> bool:
        return self.measured == "timed"

    @property
    def others(self) -> list[str]:
        """The methods measured beside DeSAP."""
        return (self.methods or [DEFAULT_METHOD])[1:]


# --- FLOPs -------------------------------------------------------------------------------------------

def method_flops(name: str, batch: int, visual: int, width: int, text_width: int, kept: int) -> int:
    """FLOPs of the pruning method ``name`` choosing ``kept`` of ``visual`` tokens per image and
    merging the others (``run_method``), counted on a CPU on random signals of the shapes the
    LLaVA layouts give it (matrix work depends on the shapes alone): hidden (batch, visual, width),
    the attention branch in the text's space and TEXT_TOKENS of text where the method reads them."""
    method = get_method(name)
    gen = torch.Generator().manual_seed(0)
    signal = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    reads = method.reads
    inputs = MethodInputs(
        hidden=signal(batch, visual, width), keep=kept,
        saliency=signal(batch, visual).softmax(-1) if Signal.SALIENCY in reads else None,
        attn=signal(batch, visual, text_width) if Signal.ATTN in reads else None,
        text=signal(batch, TEXT_TOKENS, text_width) if Signal.TEXT in reads else None,
        text_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.bool) if Signal.TEXT in reads else None,
        seed=torch.arange(batch, dtype=torch.long) if Signal.SEED in reads else None)
    return flops_of(lambda: run_method(method, inputs, merge=True))


def piecewise_flops(model: nn.Module, inputs: dict, image_tokens: int, keep: int, newlines: int = 0,
                    others: Sequence[str] = ()) -> Flops:
    """FLOPs of full, desap and ideal prefill (and of each method of ``others``) of LLaVA-1.5 /
    LLaVA-NeXT from the pieces (runs on meta). An image sends the language model
    ``sequence.image_budget`` placeholders, its ``newlines`` (LLaVA-NeXT) among them; DeSAP's
    operator reads, and the projector projects, only the visual tokens: all of them (the attention
    branch, for a method that reads it), then the kept ones (every variant keeps as many)."""
    inner = model.model
    vision = model.config.vision_config
    pixels = inputs["pixel_values"]
    crops = pixels.shape[0] * (pixels.shape[1] if pixels.dim() == 5 else 1)
    batch = inputs["input_ids"].shape[0]
    width, text_width = vision.hidden_size, model.config.text_config.hidden_size
    rows = lambda n, w=width: torch.empty(batch, n, w, device=pixels.device, dtype=pixels.dtype)  # noqa: E731
    per_crop = (vision.image_size // vision.patch_size) ** 2
    sent = image_budget(keep, image_tokens, newlines)       # placeholders per image after pruning
    visual, kept = image_tokens - newlines, sent - newlines   # visual tokens per image: all, kept

    tower = flops_of(_tower_call(model, inputs))
    project_all = flops_of(lambda: inner.multi_modal_projector(rows(crops // batch * per_crop)))
    project_kept = flops_of(lambda: inner.multi_modal_projector(rows(kept)))
    operator = ops.prune_flops((batch, visual, width), (batch, visual, text_width),
                               (batch, TEXT_TOKENS, text_width), None, None, None, kept)
    length_full = inputs["input_ids"].shape[1]
    language_full, language_keep = (flops_of(lambda: model(inputs_embeds=rows(n, text_width), logits_to_keep=1))
                                    for n in (length_full, length_full - image_tokens + sent))
    ideal = tower + project_kept + language_keep
    methods = {name: ideal + method_flops(name, batch, visual, width, text_width, kept)
               + (project_all if "attn" in get_method(name).reads else 0) for name in others}
    return Flops(full=tower + project_all + language_full,
                 desap=tower + project_all + operator + project_kept + language_keep,
                 ideal=ideal, operator=operator, vision_tower=tower,
                 language_full=language_full, language_keep=language_keep, methods=methods or None)


def forward_flops(model: nn.Module, family: str, data: Batch, keeps: list[int], shapes_only: bool,
                  others: Sequence[str] = ()) -> list[Flops]:
    """FLOPs of the real forward passes of every variant at each budget (the Qwen and video models,
    whose forward reads token ids); the Qwen encoder (mergers included) counted apart."""
    full = flops_of(_prefill(model, data.inputs), shapes_only)
    tower = None
    if family in QWEN:
        pixels, grid = data.inputs["pixel_values"], data.inputs["image_grid_thw"]
        tower = flops_of(lambda: model.model.get_image_features(pixels, grid), shapes_only)
    counted = []
    for keep in keeps:
        each = {}
        for name in (*VARIANTS[1:], *others):
            with variant(model, name, keep):
                each[name] = flops_of(_prefill(model, data.inputs), shapes_only)
        methods = {name: each.pop(name) for name in others}
        counted.append(Flops(full=full, vision_tower=tower, methods=methods or None, **each))
    return counted


# --- the run -----------------------------------------------------------------------------------------

def time_rounds(model: nn.Module, family: str, data: Batch, keeps: list[int], device: str, repeats: int,
                say: Progress, others: Sequence[str] = ()) -> tuple[dict[int, VariantTimes], list[float]]:
    """({keep: each variant's ms per round}, [vision tower ms per round]) over ``repeats`` rounds
    after :data:`WARMUP_ROUNDS`, the variants (and the methods of ``others``) interleaved within
    each round."""
    times = {keep: VariantTimes([], [], [], {name: [] for name in others} or None) for keep in keeps}
    tower = []
    for round_ in range(WARMUP_ROUNDS + repeats):
        counted = round_ >= WARMUP_ROUNDS
        say(f"round {round_ + 1 - WARMUP_ROUNDS} of {repeats}" if counted else "warm-up round")
        if family in PIECEWISE:
            ms = time_call_ms(_tower_call(model, data.inputs), device)
            if counted:
                tower.append(ms)
        for keep in keeps:
            for name in (*VARIANTS, *others):
                with variant(model, name, keep):
                    ms = time_call_ms(_prefill(model, data.inputs), device)
                if counted:
                    (times[keep].methods[name] if name in others else getattr(times[keep], name)).append(ms)
    return times, tower


def run(plan: E2ePlan, progress: Optional[Progress] = None) -> E2eResult:
    """The timed prefills (unless on meta) and the FLOPs of every variant at every budget of ``plan``."""
    say = progress or (lambda _: None)
    family = MODELS[plan.model].family
    piecewise = family in PIECEWISE
    # meta for the others: their forward passes on a CPU, weights that hold no memory, under ShapesOnly
    shapes_only = plan.device == "meta" and not piecewise
    build_device = "cpu" if shapes_only else plan.device
    dtype = DTYPES[plan.dtype]
    weights = "weights holding no memory, FLOPs only" if shapes_only else "random weights"
    say(f"building {plan.model} on {build_device} ({plan.dtype}, {weights})")
    model = build_model(plan.model, build_device, dtype, plan.shrink, weights=not shapes_only)
    data = make_batch(model, plan.model, plan.batch, build_device, dtype)
    result = E2eResult(Environment.here(plan.device), plan.model, "random", "timed" if plan.timed else "FLOPs counted",
                    plan.device, plan.dtype, plan.batch, plan.image_tokens, TEXT_TOKENS, rows=[], shrink=plan.shrink,
                    methods=plan.methods if plan.others else None)
    times: dict[int, VariantTimes] = {}
    with torch.no_grad():
        if plan.timed:
            before = load_average()
            times, tower = time_rounds(model, family, data, plan.keeps, plan.device, plan.repeats, say,
                                       plan.others)
            result.repeats, result.warmup_rounds = plan.repeats, WARMUP_ROUNDS
            result.load_average = LoadAverage(before, load_average())
            if tower:
                result.vision_tower_ms, result.vision_tower_rounds_ms = statistics.median(tower), tower
        say("counting FLOPs")
        if piecewise:
            counter = model if plan.device == "meta" else build_model(plan.model, "meta", dtype, plan.shrink)
            counted = data if plan.device == "meta" else make_batch(counter, plan.model, plan.batch, "meta", dtype)
            flops = [piecewise_flops(counter, counted.inputs, data.tokens, keep, data.newlines, plan.others)
                     for keep in plan.keeps]
        else:
            flops = forward_flops(model, family, data, plan.keeps, shapes_only, plan.others)
    result.rows = [E2eRow.of(keep, counted_flops, times.get(keep)) for keep, counted_flops in zip(plan.keeps, flops)]
    return result


# --- output ------------------------------------------------------------------------------------------

def describe(result: E2eResult) -> str:
    """What was measured where: "timed on cpu (AMD EPYC, 2 threads)" or "FLOPs counted on meta"."""
    if result.timed:
        return f"timed on {result.device} ({result.environment.device})"
    return f"FLOPs counted on {result.device}"


def table(result: E2eResult) -> str:
    """The result as text: a header (model, weights, what was measured on which device, settings,
    versions) and one line per budget."""
    env = result.environment
    shrunk = " shrunk (2 layers and 2 heads per transformer)" if result.shrink else ""
    lines = [f"{result.model}{shrunk}, {result.weights} weights, {describe(result)}, {result.dtype}, batch "
             f"{result.batch}, {result.image_tokens} image + {result.text_tokens} text tokens; torch {env.torch}, "
             f"{env.date}"]
    if result.timed:
        load = result.load_average
        rounds = f"{result.repeats} round{'s' * (result.repeats != 1)}"
        note = (f"medians of {rounds} after {result.warmup_rounds} warm-up, the variants "
                f"interleaved; load average {load.before[0]:.2f} before, {load.after[0]:.2f} after")
        if result.vision_tower_ms is not None:
            full = statistics.median(r.full_ms for r in result.rows)
            note += (f"; vision tower alone {result.vision_tower_ms:.1f} ms "
                     f"({result.vision_tower_ms / full:.0%} of the full prefill)")
        lines.append(note)
        lines.append(f"{'keep':>6}{'full ms':>10}{'desap ms':>10}{'ideal ms':>10}{'speedup':>9}{'ideal':>7}"
                     f"{'of ideal':>10}{'overhead ms':>13}{'share':>7}{'GFLOP full':>12}{'GFLOP desap':>13}"
                     f"{'FLOP x':>8}")
        for r in result.rows:
            lines.append(f"{r.keep:>6}{r.full_ms:>10.2f}{r.desap_ms:>10.2f}{r.ideal_ms:>10.2f}"
                         f"{r.speedup:>9.2f}{r.ideal_speedup:>7.2f}{r.share_of_ideal_speedup:>10.0%}"
                         f"{r.overhead_ms:>13.3f}{r.overhead_share:>7.0%}{r.flops.full / 1e9:>12.4g}"
                         f"{r.flops.desap / 1e9:>13.4g}{r.flops_reduction:>8.2f}")
    else:   # the tower's share of the DeSAP prefill grows as K shrinks: pruning after the encoder cannot save it
        first, rows = result.rows[0].flops, result.rows
        # the LLaVA pieces count the language model apart; the Qwen models count their encoder apart
        tower, language = first.vision_tower is not None, rows[0].language_flops_reduction is not None
        if tower:
            lines.append(f"vision tower {first.vision_tower / 1e9:.4g} GFLOP, "
                         f"{first.vision_tower / first.full:.0%} of the full prefill")
        lines.append(f"{'keep':>6}{'GFLOP full':>12}{'GFLOP desap':>13}{'GFLOP ideal':>13}{'FLOP x':>8}"
                     + f"{'LM FLOP x':>11}" * language + f"{'tower of desap':>16}" * tower)
        for r in rows:
            f = r.flops
            lines.append(f"{r.keep:>6}{f.full / 1e9:>12.4g}{f.desap / 1e9:>13.4g}{f.ideal / 1e9:>13.4g}"
                         f"{r.flops_reduction:>8.2f}"
                         + (f"{r.language_flops_reduction:>11.2f}" if language else "")
                         + (f"{f.vision_tower / f.desap:>16.0%}" if tower else ""))
    if result.others:
        lines += methods_table(result)
    return "\n".join(lines)


def methods_table(result: E2eResult) -> list[str]:
    """One line per method at each budget, DeSAP first: its prefill against the full model and the
    ideal, and its pruning work (time and FLOPs beyond the ideal)."""
    timed = result.timed
    lines = ["each method's prefill beside DeSAP; pruning = beyond the ideal (the first K tokens, no work)",
             f"{'keep':>6}  {'method':<12}" + (f"{'ms':>10}{'speedup':>9}{'of ideal':>10}{'pruning ms':>12}" if timed
                                               else "") + f"{'GFLOP':>10}{'FLOP x':>8}{'pruning MFLOP':>15}"]
    for r in result.rows:
        for name, cost in r.costs().items():
            lines.append(f"{r.keep:>6}  {name:<12}"
                         + (f"{cost.ms:>10.2f}{cost.speedup:>9.2f}{cost.share_of_ideal_speedup:>10.0%}"
                            f"{cost.overhead_ms:>12.2f}" if timed else "")
                         + f"{cost.flops / 1e9:>10.4g}{cost.flops_reduction:>8.2f}{cost.pruning_flops / 1e6:>15.4g}")
    return lines


def figure(result: E2eResult) -> Figure:
    """Speedups (timed runs) and FLOP reduction against the budget; with other methods, each
    method's speedup (timed) or FLOP reduction (meta) beside the ideal's."""
    from matplotlib.figure import Figure

    rows = result.rows
    keeps = [r.keep for r in rows]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    if result.others:   # one series per method, DeSAP first
        markers = "ov^<>sdph*"
        for i, name in enumerate(result.methods):
            values = [r.costs()[name].speedup if result.timed else r.costs()[name].flops_reduction for r in rows]
            ax.plot(keeps, values, f"{markers[i % len(markers)]}-", label=name)
        if result.timed:
            ax.plot(keeps, [r.ideal_speedup for r in rows], "k--", label="ideal (no pruning work)")
        ax.set_ylabel(f"full model / method ({'time' if result.timed else 'FLOPs'}, x)")
    elif result.timed:
        ax.plot(keeps, [r.speedup for r in rows], "o-", label="DeSAP speedup (timed)")
        ax.plot(keeps, [r.ideal_speedup for r in rows], "s--", label="ideal speedup (no pruning work)")
        ax.plot(keeps, [r.flops_reduction for r in rows], "^:", label="FLOP reduction (counted)")
        ax.set_ylabel("full model / DeSAP or ideal (x)")
    else:
        ax.plot(keeps, [r.flops_reduction for r in rows], "^:", label="FLOP reduction (counted)")
        ax.set_ylabel("FLOPs, full model / DeSAP (x)")
    ax.set_xlabel(f"image tokens kept (of {result.image_tokens})")
    shrunk = " shrunk" if result.shrink else ""
    ax.set_title(f"{result.model}{shrunk}, {result.weights} weights, {result.dtype}, batch {result.batch}\n"
                 f"{describe(result)}", fontsize=10)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
