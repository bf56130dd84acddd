"""The attention each token receives (Qwen's saliency): two passes, never the N x N matrix.

For each token j of segment s (a contiguous range of n tokens: an image, a frame), the mean over
the n queries i of s and over the H heads of softmax_j(q_i . k_j * scale) within s. Softmax
weights are exp(q.k * scale - lse_q), so one pass finds each query's log-sum-exp and a second
sums those weights per key, with the same tiles as FlashAttention (exp2, log2(e) folded into the
scale; float32 accumulation whatever the inputs' dtype).

Work is cut into BLOCK-token tiles that never cross a segment: the launcher lists them, with their
segment's range, in a small int32 table (ragged segments waste only their last tile's tail).

- Pass 1, ``_lse_kernel``, grid (tiles, H): one query tile against every key tile of its segment,
  online max and sum; writes lse (T, H) float32, in base-2 units (log2 of sum 2 ** (s*log2 e)).
- Pass 2, ``_received_kernel``, grid (tiles, H): one key tile, its keys held in registers, against
  every query tile of its segment; sums exp2(logit - lse) over the queries and writes that sum /
  (n * H) to its head's row of a (H, T) float32 buffer; the launcher then sums the H rows.
  Heads sit on the grid (H times the programs of a loop over heads: a single 4096-token image
  fills an H100 with 1024 programs, not 64) and each output is written by one program, then
  summed in a fixed order: no atomics, bitwise-deterministic.

Bytes, per segment of n tokens, e bytes per element, d the head dim (floor: q and k read once,
2 * n * H * d * e):
- pass 1 reads q once and k once per query tile (n / BLOCK times: L2 traffic, the segment's keys
  of one head are n * d * e bytes), writes 4 * n * H;
- pass 2 reads k once, q and lse once per key tile (n / BLOCK times, from L2), writes 4 * n * H;
  the head sum reads 4 * n * H and writes 4 * n.
DRAM traffic is thus the floor plus 16 * n * H bytes of float32 side buffers:
n = 4096, H = 16, d = 72 in bf16: floor 18.9 MB (2 * 4096 * 16 * 72 * 2), side buffers 1.05 MB;
L2 re-reads 64 tiles * 9.4 MB = 604 MB per pass.
FLOPs: each pass is one Q K^T, 2 * n^2 * H * d: 4 * n^2 * H * d in all, the same as one attention
call (Q K^T and P V): 77.3 GFLOP at n = 4096, H = 16, d = 72. Tensor cores run the padded head dim
BLOCK_D = 128 (next power of two), 137.4 GFLOP issued; and each pass takes one exp2 per logit,
2 * n^2 * H in all against the attention's n^2 * H.

Half inputs (float16, bfloat16) go through tl.dot natively with the held tile (q in pass 1, k in
pass 2) in registers. Float32 inputs take ieee products on the CUDA cores, both tiles loaded
FP32_BLOCK_F features at a time (a whole 64 x 128 float32 pair spills): the same bytes from DRAM,
BLOCK_D / FP32_BLOCK_F loads of the held tile per step from L1/L2.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import triton
import triton.language as tl
import torch

from .common import NEG_INF, dot_in_fp32, launch, next_block

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# 64-token tiles of 128 head features: no spills on sm_90 (tests/sm90_compile.py)
BLOCK = 64
FP32_BLOCK_F = 16


@triton.jit
def _tile(table_ptr):
    """This program's tile: (first token, segment start, segment end), int32."""
    row = table_ptr + 3 * tl.program_id(0)
    return tl.load(row), tl.load(row + 1), tl.load(row + 2)


@triton.jit
def _rows(ptr, tokens, ok, stride_t, d, d_ok, DOT_FP32: tl.constexpr):
    """(len(tokens), len(d)) tile of one head's rows (masked to zero), as tl.dot takes it."""
    rows = tl.load(ptr + tokens.to(tl.int64)[:, None] * stride_t + d[None, :],
                   mask=ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        rows = rows.to(tl.float32)
    return rows


@triton.jit
def _dot(q, k, DOT_FP32: tl.constexpr):
    """(BLOCK, BLOCK) float32 q @ k^T."""
    if DOT_FP32:  # exact float32 products: tf32 would be a float16-sized error on every logit
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    return tl.dot(q, tl.trans(k))  # half pairs: exact products, float32 accumulator


@triton.jit
def _logits(q_head, q_tokens, q_ok, stride_qt, k_head, k_tokens, k_ok, stride_kt, D, qk_scale,
            DOT_FP32: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """(BLOCK, BLOCK) float32 q.k * scale * log2(e), both tiles loaded BLOCK_F features at a time
    (float32 tiles: a whole 64 x 128 pair would spill)."""
    s = tl.zeros([BLOCK, BLOCK], tl.float32)
    for f0 in tl.static_range(0, BLOCK_D, BLOCK_F):
        d = f0 + tl.arange(0, BLOCK_F)
        d_ok = d < D
        q = _rows(q_head, q_tokens, q_ok, stride_qt, d, d_ok, DOT_FP32)
        k = _rows(k_head, k_tokens, k_ok, stride_kt, d, d_ok, DOT_FP32)
        s += _dot(q, k, DOT_FP32)
    return s * qk_scale


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, table_ptr, lse_ptr,
    qk_scale, H, D,
    stride_qt, stride_qh, stride_kt, stride_kh,
    DOT_FP32: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    first, seg_start, seg_end = _tile(table_ptr)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rows = first + tl.arange(0, BLOCK)
    rows_ok = rows < seg_end
    q_head = q_ptr + h * stride_qh
    k_head = k_ptr + h * stride_kh
    if BLOCK_F == BLOCK_D:  # one feature chunk: the query tile stays in registers
        q = _rows(q_head, rows, rows_ok, stride_qt, d, d_ok, DOT_FP32)
    best = tl.full([BLOCK], NEG_INF, tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for c0 in range(seg_start, seg_end, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        cols_ok = cols < seg_end
        if BLOCK_F == BLOCK_D:
            s = _dot(q, _rows(k_head, cols, cols_ok, stride_kt, d, d_ok, DOT_FP32), DOT_FP32) * qk_scale
        else:
            s = _logits(q_head, rows, rows_ok, stride_qt, k_head, cols, cols_ok, stride_kt, D, qk_scale,
                        DOT_FP32, BLOCK, BLOCK_D, BLOCK_F)
        s = tl.where(cols_ok[None, :], s, NEG_INF)
        new_best = tl.maximum(best, tl.max(s, axis=1))  # finite: every tile has a key in range
        total = total * tl.math.exp2(best - new_best) + tl.sum(tl.math.exp2(s - new_best[:, None]), axis=1)
        best = new_best
    tl.store(lse_ptr + rows.to(tl.int64) * H + h, best + tl.math.log2(total), mask=rows_ok)


@triton.jit
def _received_kernel(
    q_ptr, k_ptr, table_ptr, lse_ptr, out_ptr,
    qk_scale, T, H, D,
    stride_qt, stride_qh, stride_kt, stride_kh,
    DOT_FP32: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    first, seg_start, seg_end = _tile(table_ptr)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    cols = first + tl.arange(0, BLOCK)
    cols_ok = cols < seg_end
    q_head = q_ptr + h * stride_qh
    k_head = k_ptr + h * stride_kh
    if BLOCK_F == BLOCK_D:  # one feature chunk: the key tile stays in registers
        k = _rows(k_head, cols, cols_ok, stride_kt, d, d_ok, DOT_FP32)
    received = tl.zeros([BLOCK], tl.float32)
    for r0 in range(seg_start, seg_end, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        rows_ok = rows < seg_end
        if BLOCK_F == BLOCK_D:
            s = _dot(_rows(q_head, rows, rows_ok, stride_qt, d, d_ok, DOT_FP32), k, DOT_FP32) * qk_scale
        else:
            s = _logits(q_head, rows, rows_ok, stride_qt, k_head, cols, cols_ok, stride_kt, D, qk_scale,
                        DOT_FP32, BLOCK, BLOCK_D, BLOCK_F)
        lse = tl.load(lse_ptr + rows.to(tl.int64) * H + h, mask=rows_ok, other=0.0)
        weights = tl.math.exp2(s - lse[:, None])
        received += tl.sum(tl.where(rows_ok[:, None], weights, 0.0), axis=0)
    share = received / ((seg_end - seg_start) * H).to(tl.float32)
    tl.store(out_ptr + h.to(tl.int64) * T + cols, share, mask=cols_ok)


def _check(queries: torch.Tensor, keys: torch.Tensor, boundaries: Sequence[int]) -> list[int]:
    for name, value in (("queries", queries), ("keys", keys)):
        if not isinstance(value, torch.Tensor) or value.dim() != 3:
            raise ValueError(f"{name} must be a (T, H, d) tensor, got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        if value.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {value.dtype}")
        if value.shape[-1] > 1 and value.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {value.stride()}")
    if queries.shape != keys.shape or queries.dtype != keys.dtype or queries.device != keys.device:
        raise ValueError(f"queries and keys must match in shape, dtype and device, got {tuple(queries.shape)} "
                         f"{queries.dtype} {queries.device} and {tuple(keys.shape)} {keys.dtype} {keys.device}")
    try:
        cuts = [operator.index(b) for b in boundaries]
    except TypeError:
        raise TypeError(f"boundaries must be a sequence of ints, got {boundaries!r}") from None
    tokens = queries.shape[0]
    if not cuts or cuts[0] != 0 or cuts[-1] != tokens or any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"boundaries must rise strictly from 0 to T = {tokens}, got {cuts}")
    return cuts


def received_attention(queries: torch.Tensor, keys: torch.Tensor, boundaries: Sequence[int],
                       scale: float) -> torch.Tensor:
    """(T,) float32: for each token j of segment s, the mean over the queries i of s and over the
    H heads of softmax_j(q_i . k_j * scale) within s.

    queries, keys: (T, H, d), float16, bfloat16 or float32, contiguous in d (other strides free);
    boundaries: S + 1 ints, 0 = b0 < b1 < ... < bS = T, segment s the tokens [b_s, b_s+1).
    """
    cuts = _check(queries, keys, boundaries)
    tokens, heads, width = queries.shape
    if tokens == 0 or heads == 0:
        return torch.zeros(tokens, dtype=torch.float32, device=queries.device)
    table = torch.tensor([(first, start, end) for start, end in zip(cuts, cuts[1:])
                          for first in range(start, end, BLOCK)], dtype=torch.int32).to(queries.device)
    lse = torch.empty((tokens, heads), dtype=torch.float32, device=queries.device)
    shares = torch.empty((heads, tokens), dtype=torch.float32, device=queries.device)
    fp32 = dot_in_fp32(queries, keys)
    block_d = next_block(width, 256)
    strides = (queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1))
    # float32 tiles take the head dim FP32_BLOCK_F features at a time (a whole tile pair would spill)
    constexprs = dict(DOT_FP32=fp32, BLOCK=BLOCK, BLOCK_D=block_d,
                      BLOCK_F=min(block_d, FP32_BLOCK_F) if fp32 else block_d)
    grid = (table.shape[0], heads)
    qk_scale = float(scale) * math.log2(math.e)
    # 4 warps for half tiles, 8 for float32 ones (twice the registers): no spills on sm_90
    warps = 4 if not fp32 else 8
    launch(_lse_kernel, grid, (queries, keys, table, lse, qk_scale, heads, width, *strides),
           constexprs, num_warps=warps)
    launch(_received_kernel, grid, (queries, keys, table, lse, shares, qk_scale, tokens, heads, width, *strides),
           constexprs, num_warps=warps)
    return shares.sum(dim=0)
