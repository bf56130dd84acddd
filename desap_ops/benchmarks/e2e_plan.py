"""``desap bench e2e``'s arguments resolved into an :class:`E2ePlan` against the model, before
anything is built but on meta: the budgets within its image tokens, the methods registered, and for
a timed run its memory within what the device has free."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from typing import Optional

from desap_ops.methods import DEFAULT_METHOD
from desap_ops.testing.models import MODELS, build_model, model_config
from desap_ops.testing.real_shapes import depths, weight_bytes

from .arguments import UsageError, check_at_least_one, check_budgets, check_device, parse_budgets, parse_methods
from .e2e_batch import make_batch
from .machine import DTYPES, GIB, check_memory
from .skeleton import paper_budgets

# Memory a run needs beyond its weights: activations of one prefill (CPU attention holds its
# scores), the allocator's slack and the FLOP counter's meta copy, as a share of the weights plus a
# fixed part.
MEMORY_MARGIN, MEMORY_FIXED = 0.25, 1 * GIB


@dataclass
class E2ePlan:
    model: str
    keeps: list[int]            # the budgets, each in [1, image_tokens]
    image_tokens: int           # placeholder tokens per image or video
    device: str = "cpu"         # cpu, cuda, or meta (FLOPs counted, nothing timed)
    dtype: str = "fp32"         # a key of machine.DTYPES
    batch: int = 1
    repeats: int = 5            # timed rounds after the warm-up
    shrink: bool = False        # a real shape at reduced depth and width (tests)
    depth_factor: int = 1       # tower and language model this many times shallower, widths kept
    methods: list[str] = field(default_factory=lambda: [DEFAULT_METHOD])   # DeSAP first, then the others

    @property
    def timed(self) -> bool:
        return self.device != "meta"


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
              methods: Optional[list[str]] = None, depth_factor: int = 1) -> E2ePlan:
    """The run of ``model`` at ``keeps`` (default: :func:`default_keeps`) checked against the model,
    before anything is built but on meta: the budgets within its image tokens, and for a timed run
    its memory within what ``device`` has free (UsageError). ``dtype`` defaults to fp32 on a CPU,
    else bf16. ``methods``: registered pruning methods measured beside DeSAP, which always runs
    first (default DeSAP alone). ``depth_factor``: the real shape's tower and language model that
    many times shallower (it must divide both depths), so that the tower's share of the prefill
    FLOPs stays the full model's."""
    if model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {model}")
    check_depth_factor(model, depth_factor)
    check_at_least_one(repeats=repeats, batch=batch)
    dtype = dtype or ("fp32" if device == "cpu" else "bf16")
    counter = build_model(model, "meta", DTYPES[dtype], shrink, depth_factor=depth_factor)
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
    return E2ePlan(model, keeps, tokens, device, dtype, batch, repeats, shrink, depth_factor, methods)


def check_depth_factor(model: str, factor: int) -> None:
    """UsageError unless ``factor`` is 1, or ``model`` is a real shape whose tower and language model
    depths it divides."""
    if factor == 1:
        return
    if MODELS[model].tiny:
        raise UsageError(f"--depth-factor applies to the real shapes, not to the tiny model {model}, got {factor}")
    tower, language = depths(model_config(model))
    if factor < 1 or tower % factor or language % factor:
        raise UsageError(f"--depth-factor must divide {model}'s {tower} tower blocks and {language} language-model "
                         f"layers, got {factor}")


def check(args: Namespace) -> None:
    """The device, the budgets' syntax, the methods and the rounds (UsageError)."""
    check_device(args.device)
    parse_budgets(args.keep)
    if args.methods is not None:
        parse_methods(args.methods)
    check_at_least_one(repeats=args.repeats, batch=args.batch, depth_factor=args.depth_factor)


def plan(args: Namespace) -> E2ePlan:
    return make_plan(args.model, parse_budgets(args.keep), args.device, args.dtype, args.batch, args.repeats,
                     methods=None if args.methods is None else parse_methods(args.methods),
                     depth_factor=args.depth_factor)
