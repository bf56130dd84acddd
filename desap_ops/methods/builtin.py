"""The built-in methods: DeSAP and the baselines the field compares it with. Each keeps K of N
tokens per image; ties always go to the lower index, so that both engines keep the same tokens."""
from __future__ import annotations

import torch

from .. import reference
from ..api import prune
from ..reference import PruneResult
from .interface import Method, MethodInputs, Signal, TokenGrid
from .ranking import top_scores
from .redundancy import cdpruner_lm, dart_input
from .visionzip import visionzip

DIVPRUNE_BLOCK_BYTES = 64 * 2**20   # bound on the part of the (B, N, N) cosine distances formed at once


def desap(inputs: MethodInputs, merge: bool) -> PruneResult:
    """DeSAP, the contract: the operator itself (kernels, merge and task scores) on the inputs."""
    return prune(inputs.hidden, inputs.attn, inputs.text.to(inputs.attn.dtype), inputs.saliency, inputs.keep,
                 text_mask=inputs.text_mask, task_ratio=inputs.task_ratio, merge=merge,
                 text_reduce=inputs.text_reduce, backend=inputs.backend, text_budget=inputs.text_budget)


def first(inputs: MethodInputs) -> torch.Tensor:
    """The first K tokens, in order, unscored: the benchmark's ideal, merged or not."""
    batch, tokens = inputs.hidden.shape[:2]
    return torch.arange(inputs.keep, device=inputs.hidden.device).expand(batch, -1)


def random(inputs: MethodInputs) -> torch.Tensor:
    """K tokens drawn at random, seeded by a hash of the image's pixels: the same image keeps the same
    tokens in every run and in both engines, and two images draw apart."""
    tokens = inputs.hidden.shape[1]
    rows = []
    for seed in inputs.seed.tolist():
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
    scores = reference.tie_exact(reference.task_scores(inputs.attn, text, mask, inputs.text_reduce), inputs.attn)
    return top_scores(scores, inputs.keep)


def divprune(inputs: MethodInputs) -> torch.Tensor:
    """DivPrune (Alvar et al., CVPR 2025): greedy max-min diversity under cosine distance
    ``1 - cos(x_i, x_j)`` of the rows the language model receives (``projected``: after the
    projector, as the authors' code selects). The first token kept is the one farthest from its
    nearest other token; each next one the token farthest from the nearest token kept so far. Every image
    of the batch at once, with no synchronisation with the device: K steps of (B, N) work."""
    unit = reference.unit_rows(inputs.projected.float())                           # (B, N, C)
    batch, tokens, _ = unit.shape
    rows = torch.arange(batch, device=unit.device)
    # exact ties: bit-identical rows (twins) are at distance 0 exactly, and every distance is their
    # first twin's (reference.first_twin), so twins' scores are equal and argmax takes the lower index
    twins = reference.first_twin(inputs.projected)
    # each token's distance to its nearest other token, a block of rows at a time (B, b, N) ...
    nearest = torch.empty(batch, tokens, device=unit.device)
    block = max(1, DIVPRUNE_BLOCK_BYTES // (4 * batch * tokens))
    for start in range(0, tokens, block):
        stop = min(start + block, tokens)
        distance = 1 - unit[:, start:stop] @ unit.transpose(1, 2)
        distance = distance.gather(2, twins[:, None, :].expand_as(distance))
        distance = distance.masked_fill(twins[:, start:stop, None] == twins[:, None, :], 0.0)
        own = torch.arange(start, stop, device=unit.device)
        distance[:, own - start, own] = float("inf")
        nearest[:, start:stop] = distance.amin(dim=2)
    chosen = torch.zeros(batch, tokens, dtype=torch.bool, device=unit.device)
    picked = torch.empty(batch, inputs.keep, dtype=torch.int64, device=unit.device)
    score = nearest.gather(1, twins)
    for step in range(inputs.keep):
        best = score.masked_fill(chosen, float("-inf")).argmax(dim=1)          # the first of equal maxima
        picked[:, step] = best
        chosen[rows, best] = True
        distance = 1 - (unit @ unit[rows, best][:, :, None]).squeeze(2)         # (B, N) to the token just kept
        distance = distance.gather(1, twins).masked_fill(twins == twins[rows, best][:, None], 0.0)
        score = distance if step == 0 else torch.minimum(score, distance)
    return picked.sort(dim=1).values


# --- HiPrune (issue 36) --------------------------------------------------------------------------

HIPRUNE_ALPHA = 0.1   # HiPrune's share of the budget for anchors and their buffers (the authors' default)


def hiprune_anchors(keep: int) -> int:
    """How many anchor tokens HiPrune takes for a budget of ``keep``: ``round(keep * alpha / 5)``, as
    its authors' code computes it (Python's round: halves to even). Anchors and their at most four
    buffers never exceed the budget (5 * anchors <= keep for every keep >= 1)."""
    return round(keep * HIPRUNE_ALPHA / 5)


def grid_neighbours(grid: TokenGrid, device) -> torch.Tensor:
    """(N, 4) int64: each token's neighbour above, below, left and right within its block and frame
    of ``grid``, or -1 where it has none (an edge)."""
    rows = []
    start = 0
    for frames, height, width in grid.blocks:
        index = torch.arange(frames * height * width, device=device).view(frames, height, width) + start
        table = torch.full((frames, height, width, 4), -1, dtype=torch.int64, device=device)
        table[:, 1:, :, 0] = index[:, :-1]
        table[:, :-1, :, 1] = index[:, 1:]
        table[:, :, 1:, 2] = index[:, :, :-1]
        table[:, :, :-1, 3] = index[:, :, 1:]
        rows.append(table.view(-1, 4))
        start += frames * height * width
    return torch.cat(rows)


def hiprune(inputs: MethodInputs) -> torch.Tensor:
    """HiPrune (Liu et al., arXiv 2508.00553): anchors, the ``round(K * 0.1 / 5)`` tokens that
    receive the most attention at a middle, object-centric block of the tower (``layer_received``);
    buffers, the anchors' spatial neighbours (above, below, left, right in ``grid``); registers, the
    tokens that receive the most attention at the deep block (``received``) among the rest, as many
    as fill K. Ties to the lower index, NaN last. Every image of the batch at once."""
    hidden = inputs.hidden
    batch, tokens = hidden.shape[:2]
    grid = inputs.grid if inputs.grid is not None else TokenGrid.square(tokens)
    if grid.tokens != tokens:
        raise ValueError(f"grid: {grid.blocks} holds {grid.tokens} tokens, the images have {tokens}")
    chosen = torch.zeros(batch, tokens, dtype=torch.bool, device=hidden.device)
    anchors = hiprune_anchors(inputs.keep)
    if anchors:
        anchor = top_scores(inputs.layer_received, anchors)                            # (B, a)
        buffers = grid_neighbours(grid, hidden.device)[anchor].flatten(1)             # (B, 4a), -1: none
        rows = torch.arange(batch, device=hidden.device)[:, None]
        chosen[rows, anchor] = True
        chosen[rows.expand_as(buffers)[buffers >= 0], buffers[buffers >= 0]] = True
    registers = inputs.keep - chosen.sum(dim=1, keepdim=True)                          # (B, 1)
    rank = reference.descending_rank(inputs.received.float(), excluded=chosen)         # the rest first
    chosen |= rank < registers
    return chosen.nonzero()[:, 1].view(batch, inputs.keep)


BUILTIN: tuple[Method, ...] = (
    # the operator's argument checks surface as they are (checked=False): DeSAP is the operator
    Method("desap", prune=desap, reads=frozenset({Signal.SALIENCY, Signal.ATTN, Signal.TEXT}), checked=False),
    # the baselines drop what they do not keep, as their papers do (merges=False; docs/methods.md)
    Method("first", first, reads=frozenset(), merges=False),
    Method("random", random, reads=frozenset({Signal.SEED}), merges=False),
    Method("saliency", saliency, reads=frozenset({Signal.SALIENCY}), merges=False),
    Method("similarity", similarity, reads=frozenset({Signal.ATTN, Signal.TEXT}), merges=False),
    Method("divprune", divprune, reads=frozenset({Signal.PROJECTED}), merges=False),
    # the nearest forms of DART and CDPruner this tree hosts (redundancy.py; docs/methods.md says what
    # differs and why), both on the rows the language model receives
    Method("dart-input", dart_input, reads=frozenset({Signal.PROJECTED, Signal.TEXT}), merges=False),
    Method("cdpruner-lm", cdpruner_lm, reads=frozenset({Signal.PROJECTED, Signal.ATTN, Signal.TEXT}), merges=False),
    Method("hiprune", hiprune, reads=frozenset({Signal.LAYER_RECEIVED, Signal.RECEIVED}), merges=False),
    # VisionZip: dominant tokens and contextual tokens merged its own way (visionzip.py; docs/methods.md)
    Method("visionzip", prune=visionzip, reads=frozenset({Signal.SALIENCY, Signal.KEYS})),
)
