"""``desap bench e2e``'s run: the timed rounds (unless on meta), then the FLOPs of every variant at
every budget, gathered into an :class:`~.e2e_result.E2eResult`."""
from __future__ import annotations

import statistics
from typing import Optional

import torch
from torch import nn

from desap_ops.testing.models import MODELS, build_model

from .e2e_batch import PIECEWISE, TEXT_TOKENS, Batch, make_batch
from .e2e_plan import E2ePlan
from .e2e_result import E2eResult, E2eRow, RoundTimes
from .e2e_variants import Baseline, prefill, tower_call, variant
from .flops import PrefillFlops, forward_flops, piecewise_flops
from .machine import DTYPES, Environment, LoadAverage, load_average, time_call_ms
from .skeleton import Progress

WARMUP_ROUNDS = 1


def time_rounds(model: nn.Module, family: str, data: Batch, plan: E2ePlan,
                say: Progress) -> tuple[dict[int, RoundTimes], list[float]]:
    """({keep: each variant's ms per round}, [vision tower ms per round]) over ``plan.repeats``
    rounds after :data:`WARMUP_ROUNDS`; in each round, for each budget, the full model, DeSAP, the
    ideal and every other method run one after another, so that load from other processes hits
    them all alike."""
    times = {keep: RoundTimes([], [], {name: [] for name in plan.methods}) for keep in plan.keeps}
    tower = []
    for round_ in range(WARMUP_ROUNDS + plan.repeats):
        counted = round_ >= WARMUP_ROUNDS
        say(f"round {round_ + 1 - WARMUP_ROUNDS} of {plan.repeats}" if counted else "warm-up round")
        if family in PIECEWISE:
            ms = time_call_ms(tower_call(model, data.inputs), plan.device)
            if counted:
                tower.append(ms)
        for keep in plan.keeps:
            each = times[keep]
            desap, *others = each.methods.items()
            for name, rounds in ((Baseline.FULL, each.full), desap, (Baseline.IDEAL, each.ideal), *others):
                with variant(model, name, keep):
                    ms = time_call_ms(prefill(model, data.inputs), plan.device)
                if counted:
                    rounds.append(ms)
    return times, tower


def count_flops(model: nn.Module, family: str, data: Batch, plan: E2ePlan, shapes_only: bool) -> list[PrefillFlops]:
    """Every variant's FLOPs at each budget: the LLaVA layouts from the pieces on a meta copy (the
    model itself on meta), the others on the real forward passes."""
    if family not in PIECEWISE:
        return forward_flops(model, family, data, plan.keeps, shapes_only, plan.methods)
    dtype = DTYPES[plan.dtype]
    counter = model if plan.device == "meta" else build_model(plan.model, "meta", dtype, plan.shrink, depth_factor=plan.depth_factor)
    counted = data if plan.device == "meta" else make_batch(counter, plan.model, plan.batch, "meta", dtype)
    return [piecewise_flops(counter, counted.inputs, data.tokens, keep, data.newlines, plan.methods)
            for keep in plan.keeps]


def run(plan: E2ePlan, progress: Optional[Progress] = None) -> E2eResult:
    """The timed prefills (unless on meta) and the FLOPs of every variant at every budget of ``plan``."""
    say = progress or (lambda _: None)
    family = MODELS[plan.model].family
    # meta for the forward-counted models: their passes on a CPU, weights that hold no memory, under ShapesOnly
    shapes_only = plan.device == "meta" and family not in PIECEWISE
    build_device = "cpu" if shapes_only else plan.device
    dtype = DTYPES[plan.dtype]
    weights = "weights holding no memory, FLOPs only" if shapes_only else "random weights"
    say(f"building {plan.model} on {build_device} ({plan.dtype}, {weights})")
    model = build_model(plan.model, build_device, dtype, plan.shrink, weights=not shapes_only,
                        depth_factor=plan.depth_factor)
    data = make_batch(model, plan.model, plan.batch, build_device, dtype)
    result = E2eResult(Environment.here(plan.device), plan.model, "random", "timed" if plan.timed else "FLOPs counted",
                       plan.device, plan.dtype, plan.batch, plan.image_tokens, TEXT_TOKENS, plan.methods, rows=[],
                       shrink=plan.shrink, depth_factor=plan.depth_factor)
    times: dict[int, RoundTimes] = {}
    with torch.no_grad():
        if plan.timed:
            before = load_average()
            times, tower = time_rounds(model, family, data, plan, say)
            result.repeats, result.warmup_rounds = plan.repeats, WARMUP_ROUNDS
            result.load_average = LoadAverage(before, load_average())
            if tower:
                result.vision_tower_ms, result.vision_tower_rounds_ms = statistics.median(tower), tower
        say("counting FLOPs")
        flops = count_flops(model, family, data, plan, shapes_only)
    result.rows = [E2eRow.of(keep, counted, times.get(keep)) for keep, counted in zip(plan.keeps, flops)]
    return result
