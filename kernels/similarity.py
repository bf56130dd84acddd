"""Launch 1: decoupled similarity -> task scores.

One program scores BLOCK_N visual tokens of one image against every text token: a tiled
(BLOCK_N x C) @ (C x BLOCK_L) product per text tile, with the L2 norms taken on the fly from the
same tiles (each row scaled on the fly by an exact power of two, so that no square overflows:
contract, step 1), the text mask applied, and a running max (or sum and count) over the text tiles. Only
the (B, N) float32 scores are written; the (B, N, L) similarity never reaches memory.

Bytes: attn once per text tile (once when L <= BLOCK_L), text once per token block, 4 B/token out.
FLOPs: 2 * B * N * L * C.
"""
import triton
import triton.language as tl
import torch

from .common import NEG_INF, cosine_tile, dot_in_fp32, launch, next_block, scale_target


@triton.jit
def _task_score_kernel(
    attn_ptr, text_ptr, mask_ptr, out_ptr,
    N, L, C,
    stride_ab, stride_an, stride_ac,
    stride_tb, stride_tl, stride_tc,
    stride_mb, stride_ml,
    HAS_MASK: tl.constexpr, REDUCE_MEAN: tl.constexpr, DOT_FP32: tl.constexpr, TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    attn_row = attn_ptr + b * stride_ab + n.to(tl.int64)[:, None] * stride_an
    text_base = text_ptr + b * stride_tb

    best = tl.full([BLOCK_N], NEG_INF, tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    saw_nan = tl.zeros([BLOCK_N], tl.int32)
    n_valid = tl.zeros([BLOCK_L], tl.int32)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        l_ok = l < L
        text_row = text_base + l.to(tl.int64)[:, None] * stride_tl
        cos = cosine_tile(attn_row, n_ok, stride_ac, text_row, l_ok, stride_tc, C,
                          BLOCK_N, BLOCK_L, BLOCK_C, DOT_FP32, TARGET)
        valid = l_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * stride_mb + l * stride_ml, mask=l_ok, other=0) != 0)
        valid2 = valid[None, :] & n_ok[:, None]
        is_nan = cos != cos
        saw_nan = tl.maximum(saw_nan, tl.max((is_nan & valid2).to(tl.int32), axis=1))
        if REDUCE_MEAN:
            total += tl.sum(tl.where(valid2, cos, 0.0), axis=1)
        else:
            best = tl.maximum(best, tl.max(tl.where(valid2 & ~is_nan, cos, NEG_INF), axis=1))
        n_valid += valid.to(tl.int32)

    count = tl.sum(n_valid, axis=0)
    if REDUCE_MEAN:
        score = total / tl.maximum(count, 1).to(tl.float32)
    else:
        score = best
    score = tl.where(saw_nan > 0, float("nan"), score)
    score = tl.where(count > 0, score, NEG_INF)
    tl.store(out_ptr + b * N + n, score, mask=n_ok)


def task_scores(attn: torch.Tensor, text: torch.Tensor, text_mask, text_reduce: str) -> torch.Tensor:
    """(B, N) float32 task scores, contract step 1."""
    batch, tokens, width = attn.shape
    n_text = text.shape[1]
    out = torch.empty((batch, tokens), dtype=torch.float32, device=attn.device)
    fp32 = dot_in_fp32(attn, text)
    # 64 x 64 x 32 tiles on 8 warps: no spills on sm_90 in fp16, bf16 or fp32 (tests/sm90_compile.py)
    block_n = next_block(tokens, 64)
    block_l = next_block(n_text, 64)
    block_c = next_block(width, 32)
    # bool -> uint8 is a free reinterpretation; without a mask the pointer is never read
    mask = text_mask.view(torch.uint8) if text_mask is not None else out
    mask_strides = text_mask.stride() if text_mask is not None else (0, 0)
    grid = (batch, triton.cdiv(tokens, block_n))
    launch(
        _task_score_kernel, grid,
        (attn, text, mask, out, tokens, n_text, width, *attn.stride(), *text.stride(), *mask_strides),
        dict(HAS_MASK=text_mask is not None, REDUCE_MEAN=text_reduce == "mean", DOT_FP32=fp32,
             TARGET=scale_target(attn, text),
             BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_C=block_c),
        num_warps=8,
    )
    return out
