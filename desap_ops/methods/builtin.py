"""The built-in methods: DeSAP and the baselines the field compares it with. Each keeps K of N
tokens per image; ties always go to the lower index, so that both engines keep the same tokens."""
from __future__ import annotations

from typing import Callable

import torch

from .. import reference
from .registry import DEFAULT_METHOD, Method, MethodInputs

DIVPRUNE_BLOCK = 1024   # rows of the cosine-distance matrix formed at once


def top_scores(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, K) ascending: the ``keep`` highest ``scores`` (B, N) per row, ties to the lower index, NaN last."""
    order = reference.descending_rank(scores.float()).argsort(dim=-1)
    return order[:, :keep].sort(dim=-1).values


def desap(inputs: MethodInputs) -> torch.Tensor:
    """Never called: ``run.run_method`` runs DeSAP as the operator itself (kernels, merge and all)."""
    raise AssertionError("DeSAP runs through desap_ops.prune")


def first(inputs: MethodInputs) -> torch.Tensor:
    """The first K tokens, in order, unscored: the benchmark's ideal, merged or not."""
    batch, tokens = inputs.hidden.shape[:2]
    return torch.arange(inputs.keep, device=inputs.hidden.device).expand(batch, -1)


def random(inputs: MethodInputs) -> torch.Tensor:
    """K tokens drawn at random, seeded by a hash of the image's pixels: the same image keeps the same
    tokens in every run and in both engines, and two images draw apart."""
    tokens = inputs.hidden.shape[1]
    rows = []
    for seed in inputs.seeds.tolist():
        generator = torch.Generator().manual_seed(seed)
        rows.append(torch.randperm(tokens, generator=generator)[:inputs.keep].sort().values)
    return torch.stack(rows).to(inputs.hidden.device)


def saliency(inputs: MethodInputs) -> torch.Tensor:
    """The K most salient tokens ([CLS] attention, or the attention a token receives), as FasterVLM
    and VisionZip's dominant tokens choose them."""
    return top_scores(inputs.saliency, inputs.keep)


def similarity(inputs: MethodInputs) -> torch.Tensor:
    """The K tokens of highest task score (the contract's steps 0 to 1b, with the same
    ``text_reduce`` and ``text_budget``); an image with no prompt text keeps its first K."""
    text, mask = reference.budget_text(inputs.attn, inputs.text.to(inputs.attn.dtype), inputs.text_mask,
                                       inputs.text_budget)
    return top_scores(reference.task_scores(inputs.attn, text, mask, inputs.text_reduce), inputs.keep)


def divprune(inputs: MethodInputs) -> torch.Tensor:
    """DivPrune (Alvar et al., CVPR 2025): greedy max-min diversity under cosine distance. The first
    token kept is the one farthest from its nearest neighbour; each next one the token farthest from
    everything kept so far."""
    rows = []
    for hidden in inputs.hidden:
        unit = reference.unit_rows(hidden.float())                               # (N, D)
        tokens = unit.shape[0]
        nearest = torch.empty(tokens, device=unit.device)
        for start in range(0, tokens, DIVPRUNE_BLOCK):
            distance = 1 - unit[start:start + DIVPRUNE_BLOCK] @ unit.T                # (b, N)
            own = torch.arange(start, min(start + DIVPRUNE_BLOCK, tokens), device=unit.device)
            distance[own - start, own] = float("inf")
            nearest[start:start + DIVPRUNE_BLOCK] = distance.amin(dim=1)
        chosen = torch.zeros(tokens, dtype=torch.bool, device=unit.device)
        picked = []
        score = nearest
        for _ in range(inputs.keep):
            best = int(score.masked_fill(chosen, float("-inf")).argmax())   # the first of equal maxima
            picked.append(best)
            chosen[best] = True
            distance = 1 - unit @ unit[best]
            score = distance if len(picked) == 1 else torch.minimum(score, distance)
        rows.append(torch.tensor(sorted(picked), device=unit.device))
    return torch.stack(rows)


BUILTIN: dict[str, tuple[Callable, frozenset]] = {
    DEFAULT_METHOD: (desap, frozenset({"saliency", "attn", "text"})),
    "first": (first, frozenset()),
    "random": (random, frozenset({"seed"})),
    "saliency": (saliency, frozenset({"saliency"})),
    "similarity": (similarity, frozenset({"attn", "text"})),
    "divprune": (divprune, frozenset()),
}


def register_builtins(add: Callable[[Method], None]) -> None:
    for name, (select, reads) in BUILTIN.items():
        add(Method(name, select, reads))
