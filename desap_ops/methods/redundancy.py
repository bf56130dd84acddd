"""Two built-ins that choose by redundancy among an image's rows, each the nearest form of its
paper this tree can host (docs/methods.md says exactly what differs, and why):

- ``dart-input``: DART (Wen et al. 2025, arXiv 2502.11494) at the input of the language model.
  Pivot tokens by L1 norm, then, pivot by pivot, the tokens least similar (cosine) to it.
- ``cdpruner-lm``: CDPruner (Zhang et al. 2025, arXiv 2506.10967), a conditional DPP whose kernel
  is relevance x cosine similarity x relevance, solved by the fast greedy MAP inference of Chen et
  al. (NeurIPS 2018), with the relevance read in the language model's own space.

Both are exact about ties: every score is computed once per distinct row and gathered, so
bit-identical tokens score bit-identically, and equal scores go to the lower index."""
from __future__ import annotations

import torch

from .. import reference
from .interface import MethodInputs

DART_IMAGE_PIVOTS = 4    # DART's defaults (pivot_image_token, pivot_text_token in the authors' scripts)
DART_TEXT_PIVOTS = 4
RELEVANCE_OFFSET = 1e-6  # CDPruner's min-max normalisation: (r - min + 1e-6) / (max - min)
ZERO_GAIN = 1e-12        # a DPP gain at most this times the image's largest is no gain (rounding, a twin)


def distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct (U, C), inverse (N,)): ``rows`` (N, C) == ``distinct[inverse]``. Scores computed on
    the distinct rows and gathered are bitwise equal for equal rows, whatever a matrix product's
    blocking would round them to. float64 stays float64; other dtypes go to float32 (exact).
    Rows are compared by their bits (so NaN never upsets the sort), -0.0 read as +0.0."""
    rows = (rows if rows.dtype == torch.float64 else rows.float()) + 0.0     # -0.0 + 0.0 is +0.0
    bits = rows.view(torch.int64 if rows.dtype == torch.float64 else torch.int32)
    distinct, inverse = torch.unique(bits, dim=0, return_inverse=True)
    return distinct.view(rows.dtype), inverse


def unit64(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float64 (any finite float32 row: no overflow); a row of zeros stays zero."""
    rows = rows.double()
    return rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def first_ranked(scores: torch.Tensor, count: int, excluded=None) -> torch.Tensor:
    """(count,) the tokens of highest ``scores`` (N,), best first: ties to the lower index, NaN and
    then ``excluded`` last (the contract's order)."""
    return reference.descending_rank(scores, excluded).argsort()[:count]


# --- DART at the input (dart-input) ---------------------------------------------------------------

def dart_input(inputs: MethodInputs) -> torch.Tensor:
    """DART's duplication-aware selection on the rows the language model receives, with its image
    pivots and the prompt's text pivots (see ``dart_select``)."""
    return dart_select(inputs.projected, inputs.keep, inputs.text.to(inputs.projected.dtype), inputs.text_mask)


def dart_select(rows: torch.Tensor, keep: int, text=None, text_mask=None, image_pivots: int = DART_IMAGE_PIVOTS,
                text_pivots: int = DART_TEXT_PIVOTS) -> torch.Tensor:
    """(B, K) ascending. Per image of ``rows`` (B, N, C): the P = min(image_pivots, K) tokens of
    largest L1 norm are the image pivots, and are kept; then the prompt's ``text_pivots`` rows of
    largest L1 norm (``text`` (B, L, C) in the rows' space, valid where ``text_mask``) when text is
    given. Pivot by pivot (image pivots, then text pivots, each by decreasing norm), each takes its
    share of the K - P left, ceil(left / pivots left), from the tokens not kept yet: those of lowest
    cosine similarity to it. Ties go to the lower index, NaN last."""
    batch, tokens, _ = rows.shape
    picked = torch.empty(batch, keep, dtype=torch.int64, device=rows.device)
    for b in range(batch):
        distinct, inverse = distinct_rows(rows[b])
        l1 = distinct.double().abs().sum(dim=-1)[inverse]                   # (N,) float64
        unit = unit64(distinct)                                            # (U, C)
        image = first_ranked(l1, min(image_pivots, keep))
        pivots = list(unit[inverse[image]])
        if text is not None and text_pivots > 0:
            valid = torch.ones(text.shape[1], dtype=torch.bool, device=text.device) if text_mask is None \
                else text_mask[b]
            count = min(text_pivots, int(valid.sum()))
            words = first_ranked(text[b].double().abs().sum(dim=-1), count, excluded=~valid)
            pivots += list(unit64(text[b, words]))
        kept = torch.zeros(tokens, dtype=torch.bool, device=rows.device)
        kept[image] = True
        left = keep - image.numel()
        for done, pivot in enumerate(pivots):
            if left == 0:
                break
            share = -(-left // (len(pivots) - done))
            cosine = (unit @ pivot)[inverse]                               # (N,) per distinct row, gathered
            kept[first_ranked(-cosine, share, excluded=kept)] = True
            left -= share
        # the kept tokens in ascending order (a stable sort puts them first)
        picked[b] = torch.sort((~kept).to(torch.int8), stable=True).indices[:keep]
    return picked


# --- CDPruner with the language model's relevance (cdpruner-lm) -----------------------------------

def cdpruner_lm(inputs: MethodInputs) -> torch.Tensor:
    """CDPruner's conditional DPP: relevance from the attention branch against the prompt's text
    embeddings (both in the language model's space), similarity from the rows the language model
    receives."""
    return dpp_select(inputs.projected, conditional_relevance(inputs.attn, inputs.text, inputs.text_mask), inputs.keep)


def conditional_relevance(attn: torch.Tensor, text: torch.Tensor, text_mask=None) -> torch.Tensor:
    """(B, N) float64: each token's mean cosine with the image's valid prompt tokens (the contract's
    task score with "mean", per distinct row), min-max normalised per image as CDPruner does,
    (r - min + 1e-6) / (max - min). An image with no valid text, or with one relevance for every
    token, has relevance 1 everywhere: the DPP over similarity alone."""
    batch, tokens, _ = attn.shape
    text = text.to(attn.dtype)
    relevance = torch.ones(batch, tokens, dtype=torch.float64, device=attn.device)
    for b in range(batch):
        distinct, inverse = distinct_rows(attn[b])
        mask = None if text_mask is None else text_mask[b:b + 1]
        score = reference.task_scores(distinct[None], text[b:b + 1].to(distinct.dtype), mask, "mean")[0]
        score = score.double()[inverse]
        finite = torch.isfinite(score)
        low = score.masked_fill(~finite, float("inf")).amin()
        span = score.masked_fill(~finite, float("-inf")).amax() - low
        scaled = (score - low + RELEVANCE_OFFSET) / span
        relevance[b] = torch.where(torch.isfinite(span) & (span > 0), scaled, relevance[b])
    return relevance


def dpp_select(rows: torch.Tensor, relevance: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, K) ascending: the greedy MAP of the DPP with kernel L_ij = r_i cos(x_i, x_j) r_j, by Chen
    et al.'s incremental Cholesky in float64. Each step keeps the token of largest gain d_j (the
    Schur complement of L_jj); equal gains go to the lower index. A gain at most ZERO_GAIN times the
    image's largest counts as zero: such a token adds nothing, and once every gain is zero the rest
    are kept in index order. Tokens with equal rows and relevance share one state, so a twin's gain
    is exactly zero once one of them is kept. NaN gains rank below zero."""
    batch, tokens, _ = rows.shape
    picked = torch.empty(batch, keep, dtype=torch.int64, device=rows.device)
    for b in range(batch):
        key = torch.cat([rows[b].double(), relevance[b, :, None]], dim=1)
        distinct, inverse = distinct_rows(key)
        unit, weight = unit64(distinct[:, :-1]), distinct[:, -1]          # (U, C), (U,)
        # the kernel's diagonal, exactly: cos(x, x) is 1 (0 for a row of zeros, NaN for one holding
        # NaN or inf), so equal relevance ties exactly rather than by the rounding of each row's norm
        self_cosine = torch.where(unit.isnan().any(dim=-1), float("nan"), unit.ne(0).any(dim=-1).double())
        gain = weight * weight * self_cosine                              # (U,)
        zero = ZERO_GAIN * gain.nan_to_num(nan=0.0).amax()
        vectors = torch.zeros(keep, distinct.shape[0], dtype=torch.float64, device=rows.device)
        taken = torch.zeros(tokens, dtype=torch.bool, device=rows.device)
        for step in range(keep):
            score = gain[inverse]
            score = torch.where(score > zero, score, torch.zeros_like(score).masked_fill(score.isnan(), -1.0))
            j = score.masked_fill(taken, float("-inf")).argmax()          # the first of equal maxima
            picked[b, step] = j
            taken[j] = True
            u = inverse[j]
            row = weight[u] * weight * (unit @ unit[u])                   # (U,) L_u.
            residual = row - vectors[:step].T @ vectors[:step, u]
            d = gain[u]
            useful = d > zero
            e = torch.where(useful, residual / d.clamp_min(torch.finfo(torch.float64).tiny).sqrt(),
                            torch.zeros_like(residual))
            vectors[step] = e
            gain = gain - e * e
            gain[u] = 0.0
        picked[b] = picked[b].sort().values
    return picked
