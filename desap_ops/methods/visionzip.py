"""VisionZip (Yang et al., *VisionZip: Longer is Better but Not Necessary in Vision Language
Models*, CVPR 2025, arXiv 2412.04467; code: github.com/dvlab-research/VisionZip), written from the
paper and the authors' code for this tree's method interface.

Of an image's budget K, D tokens are *dominant*: the D most salient (``saliency``: [CLS] attention
averaged over heads at the tower's feature layer; on Qwen the attention each token receives). The
other C are *contextual*: among the tokens left, in the model's order, C *targets* are taken
uniformly (every ``max(1, R // C)``-th of the R left, the first C of them); every other token left
goes to the target of most similar key (cosine of the feature layer's keys averaged over heads,
``keys``), and a contextual token is its target plus the mean of the tokens that went to it (the
target alone where none did). The split is the authors' 5.4 : 1 (54 : 10 at K = 64, 108 : 20 at
128, 162 : 30 at 192): C = floor(K / 6.4), at least one.

Contextual tokens are new features, not kept rows, so this is a pruning method: its tokens are
the dominant rows and the contextual tokens at their targets' places (indices = dominant and
targets, ascending), and its assignment sends each other token to its target's position. With
``merge=False`` the tokens left are dropped: the dominant rows and the targets as they are.
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import PruneResult
from .interface import MethodInputs
from .ranking import top_scores

CONTEXTUAL_SHARE = (5, 32)   # C = floor(5 K / 32) = floor(K / 6.4): the authors' 54 : 10 split of 64


def contextual_count(keep: int) -> int:
    """C, how many of ``keep`` tokens are contextual: the authors' floor(K / 6.4), but at least one,
    so that every token not kept has a target to go to (their code divides by C)."""
    numerator, denominator = CONTEXTUAL_SHARE
    return max(1, keep * numerator // denominator)


def _first_of_twins(unit: torch.Tensor) -> torch.Tensor:
    """(B, C) bool: True for each row of ``unit`` (B, C, d) that no earlier row of its image equals
    bit for bit. A token equally similar to twin targets goes to the first of them (the lower
    index), whatever rounding the similarity's matrix product gives the two."""
    same = (unit[:, :, None, :] == unit[:, None, :, :]).all(dim=-1)         # (B, C, C)
    earlier = torch.ones(same.shape[1:], dtype=torch.bool, device=unit.device).tril(-1)
    return ~(same & earlier).any(dim=-1)


def visionzip(inputs: MethodInputs, merge: bool) -> PruneResult:
    """VisionZip on ``inputs`` (``hidden``, ``saliency`` and ``keys``): K = D dominant + C
    contextual tokens per image; see the module. Ties go to the lower index: equal saliencies
    (``ranking.top_scores``) and equally similar targets."""
    for signal in ("saliency", "keys"):
        if getattr(inputs, signal) is None:
            raise ValueError(f"visionzip reads {signal}: MethodInputs.{signal} must be given, got None")
    hidden, keep = inputs.hidden, inputs.keep
    batch, tokens, _ = hidden.shape
    device = hidden.device
    contextual = contextual_count(keep)
    dominant = keep - contextual
    with torch.no_grad():
        chosen = top_scores(inputs.saliency, dominant)                                  # (B, D) ascending
        is_dominant = torch.zeros(batch, tokens, dtype=torch.bool, device=device).scatter_(1, chosen, True)
        # the tokens left, in the model's order: a stable sort puts the non-dominant ones first
        left = torch.sort(is_dominant.to(torch.int8), dim=1, stable=True).indices[:, :tokens - dominant]
        step = max(1, (tokens - dominant) // contextual)
        slots = torch.arange(contextual, device=device) * step                          # positions among the left
        targets = left[:, slots]                                                        # (B, C) ascending
        indices = torch.cat([chosen, targets], dim=1).sort(dim=1).values                # (B, K)
        position = reference.output_positions(indices, tokens)                          # (B, N): kept -> own
        is_target = torch.zeros(batch, tokens - dominant, dtype=torch.bool, device=device)
        is_target[:, slots] = True
        unit = reference.unit_rows(inputs.keys.gather(1, left[..., None].expand(-1, -1, inputs.keys.shape[-1])))
        target_unit = unit[:, slots]                                                    # (B, C, d)
        similarity = unit @ target_unit.transpose(1, 2)                                 # (B, R, C)
        similarity = similarity.masked_fill(~_first_of_twins(target_unit)[:, None, :], float("-inf"))
        nearest = similarity.argmax(dim=2)                                              # the first of equal maxima
        goes_to = torch.where(is_target, left, targets.gather(1, nearest))              # (B, R): a target's index
        # each kept token to its own position (``position``: the others -1, dropped unmerged); merging,
        # each other token left to its target's
        assignment = position.scatter(1, left, position.gather(1, goes_to)) if merge else position
    width = hidden.shape[-1]
    kept = hidden.gather(1, indices[..., None].expand(-1, -1, width))
    if not merge:
        return PruneResult(kept, indices, assignment, task_scores=None, task_keep=None)
    # a contextual token is its target plus the mean of the tokens that went to it (float32 sums)
    slot = position.gather(1, goes_to)[..., None].expand(-1, -1, width)                # (B, R, D): output position
    weight = (~is_target).float()[..., None]                                            # the targets add nothing
    rows = hidden.gather(1, left[..., None].expand(-1, -1, width)).float() * weight
    sums = torch.zeros(batch, keep, width, dtype=torch.float32, device=device).scatter_add(1, slot, rows)
    counts = torch.zeros(batch, keep, 1, dtype=torch.float32, device=device).scatter_add(1, slot[..., :1], weight)
    tokens_out = (kept.float() + sums / counts.clamp(min=1)).to(hidden.dtype)
    return PruneResult(tokens_out, indices, assignment, task_scores=None, task_keep=None)
