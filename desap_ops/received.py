"""The attention each token receives, as an operator: ``desap::received_attention``.

For each segment (an image or a frame) of T tokens laid out one after another, the softmax
attention each key receives, averaged over that segment's queries and over heads: the saliency of
encoders without a [CLS] token (the Qwen families), read at one block from that block's own queries
and keys.

- CPU, float32 and float64: the scores of a block of queries of a few heads at a time (a matrix
  product against the segment's keys, then one fused softmax), summed over the block: one product
  of the attention's two, and a block small enough to stay in cache (``CPU_BLOCK_BYTES``). The
  n x n matrix of all heads is never formed.
- CPU, bfloat16 and float16: two calls of torch's fused CPU attention, which returns each query's
  log-sum-exp and never forms the n x n matrix; its half-precision products outrun a float32
  softmax over the block. Pass 1 gives ``lse_i = log sum_j exp(q_i . k_j * scale)``; pass 2 swaps
  the roles, keys attending over the queries with the additive bias ``-lse_i``, whose log-sum-exp
  is ``log sum_i softmax_j(q_i . k_j * scale) = log(n * received_j)``. The attention's value
  output is not needed: zeros go in (the kernel needs a value of the queries' head size). The
  passes run in the inputs' dtype (products accumulate in float32 there), the bias stays float32.
- CUDA: the Triton kernel ``desap_ops.kernels.received`` (float64 runs the reference).
- :func:`received_attention_reference`: the oracle, an eager float32 softmax one block of queries
  at a time.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .validation import FLOAT_DTYPES

QUERY_BLOCK_BYTES = 64 * 2**20   # the reference: bound on the scores of one block of queries
# the CPU path in float32: bound on the scores of one block (heads x queries x keys), small enough
# for the softmax to read them back from cache; blocks of one head and many queries run the
# product fastest (measured on 2 cores, 1024 to 7056 patches of 16 heads)
CPU_BLOCK_BYTES = 16 * 2**20


def check_received_inputs(queries: Tensor, keys: Tensor, boundaries: Sequence[int], scale: float) -> None:
    """ValueError/TypeError naming the argument unless queries and keys are (T, H, d) float tensors
    of one dtype and device, ``boundaries`` rise strictly from 0 to T, and ``scale`` is a positive
    finite number."""
    for name, tensor in (("queries", queries), ("keys", keys)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"received_attention: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != 3:
            raise ValueError(f"received_attention: {name} must be (T, H, d), got shape {tuple(tensor.shape)}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"received_attention: {name} must be float16, bfloat16, float32 or float64, "
                            f"got {tensor.dtype}")
    if queries.shape != keys.shape:
        raise ValueError(f"received_attention: queries {tuple(queries.shape)} and keys {tuple(keys.shape)} "
                         "must have one shape")
    if queries.dtype != keys.dtype or queries.device != keys.device:
        raise TypeError(f"received_attention: queries ({queries.dtype}, {queries.device}) and keys "
                        f"({keys.dtype}, {keys.device}) must have one dtype and device")
    tokens = queries.shape[0]
    bounds = list(boundaries)
    if (len(bounds) < 2 or not all(isinstance(b, int) for b in bounds) or bounds[0] != 0
            or bounds[-1] != tokens or any(b >= a for b, a in zip(bounds[:-1], bounds[1:]))):
        raise ValueError(f"received_attention: boundaries must be ints rising strictly from 0 to T = {tokens}, "
                         f"got {bounds}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"received_attention: scale must be a positive finite number, got {scale!r}")


def received_attention_reference(queries: Tensor, keys: Tensor, boundaries: Sequence[int],
                                 scale: float) -> Tensor:
    """(T,) float32, the oracle: the softmax of each block of queries against its segment's keys
    in float32 (float64 inputs: float64), summed over the queries, then divided by the segment's
    length and averaged over heads."""
    tokens, heads, _ = keys.shape
    work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    out = torch.zeros(tokens, dtype=work, device=keys.device)
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        k = keys[start:end].transpose(0, 1).to(work)                              # (H, n, d)
        block = max(1, QUERY_BLOCK_BYTES // (4 * heads * (end - start)))
        for first in range(start, end, block):
            q = queries[first:min(first + block, end)].transpose(0, 1).to(work)   # (H, b, d)
            weights = ((q @ k.transpose(1, 2)) * scale).softmax(dim=-1)            # (H, b, n)
            out[start:end] += weights.sum(dim=1).mean(dim=0)
        out[start:end] /= end - start
    return out.float()


def _blocked_cpu(queries: Tensor, keys: Tensor, boundaries: Sequence[int], scale: float) -> Tensor:
    """Float32 and float64: the softmax of a block of queries of a few heads at a time, summed over
    the block (as many queries as ``CPU_BLOCK_BYTES`` allows against the segment's keys, then as
    many heads)."""
    tokens, heads, _ = queries.shape
    out = torch.empty(tokens, dtype=queries.dtype)
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        n = end - start
        row_bytes = queries.element_size() * n
        rows = max(1, min(n, CPU_BLOCK_BYTES // row_bytes))
        head_block = max(1, min(heads, CPU_BLOCK_BYTES // (row_bytes * rows)))
        q = queries[start:end].transpose(0, 1)                      # (H, n, d)
        keys_t = keys[start:end].permute(1, 2, 0)                   # (H, d, n)
        total = torch.zeros(n, dtype=queries.dtype)
        for head in range(0, heads, head_block):
            for first in range(0, n, rows):
                scores = torch.matmul(q[head:head + head_block, first:first + rows],
                                      keys_t[head:head + head_block]).mul_(scale)        # (h, b, n)
                total += torch.softmax(scores, dim=-1).sum(dim=(0, 1))
        out[start:end] = total / (n * heads)
    return out.float()


def _fused_cpu(queries: Tensor, keys: Tensor, boundaries: Sequence[int], scale: float) -> Tensor:
    """bfloat16 and float16: the two fused-attention passes of the module's docstring, segment by segment."""
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out = torch.empty(queries.shape[0], dtype=torch.float32)
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        # (1, H, n, d), contiguous: the kernel is several times slower on strided operands
        q = queries[start:end].transpose(0, 1).unsqueeze(0).contiguous()
        k = keys[start:end].transpose(0, 1).unsqueeze(0).contiguous()
        zeros = torch.zeros_like(k)
        _, query_lse = attention(q, k, zeros, scale=scale)                                  # (1, H, n) float32
        # the bias per query (1, H, 1, n), contiguous: the log-sum-exp comes out with heads innermost,
        # and a strided mask is several times slower
        bias = (-query_lse).unsqueeze(2).contiguous()
        _, key_lse = attention(k, q, zeros, attn_mask=bias, scale=scale)
        out[start:end] = (key_lse.squeeze(0) - math.log(end - start)).exp().mean(dim=0)
    return out


@torch.library.custom_op("desap::received_attention", mutates_args=())
def received_attention(queries: Tensor, keys: Tensor, boundaries: list[int], scale: float) -> Tensor:
    """(T,) float32: for each token j of segment s (tokens ``boundaries[s]`` to ``boundaries[s+1]``),
    the mean over the queries i of segment s and over the H heads of softmax_j(q_i . k_j * scale)
    within the segment. queries, keys: (T, H, d), float16, bfloat16, float32 or float64."""
    raise NotImplementedError(f"desap::received_attention has no kernel for device {queries.device.type}")


@received_attention.register_kernel("cpu")
def _received_cpu(queries: Tensor, keys: Tensor, boundaries: list[int], scale: float) -> Tensor:
    check_received_inputs(queries, keys, boundaries, scale)
    with torch.no_grad():
        if queries.dtype in (torch.float32, torch.float64):
            return _blocked_cpu(queries, keys, boundaries, float(scale))
        return _fused_cpu(queries, keys, boundaries, float(scale))


@received_attention.register_kernel("cuda")
def _received_cuda(queries: Tensor, keys: Tensor, boundaries: list[int], scale: float) -> Tensor:
    check_received_inputs(queries, keys, boundaries, scale)
    with torch.no_grad():
        if queries.dtype == torch.float64:   # the kernel computes in float32
            return received_attention_reference(queries, keys, boundaries, float(scale))
        from .kernels import received as kernel   # here: importing the kernels needs triton
        return kernel.received_attention(queries, keys, list(boundaries), float(scale))


@received_attention.register_fake
def _received_fake(queries: Tensor, keys: Tensor, boundaries: list[int], scale: float) -> Tensor:
    check_received_inputs(queries, keys, boundaries, scale)
    return queries.new_empty((queries.shape[0],), dtype=torch.float32)


@register_flop_formula(torch.ops.desap.received_attention)
def received_flops(queries, keys, boundaries, scale, *, out_shape=None, **kwargs) -> int:
    """FLOPs of one call from the argument shapes (what ``FlopCounterMode`` counts; the op is opaque
    to it otherwise): two products Q K^T per segment of n tokens, 4 n^2 H d, as the CUDA kernel's
    two passes and the CPU's two half-precision passes run them (the CPU's float32 path runs one)."""
    _, heads, width = queries
    return sum(4 * (end - start) ** 2 * heads * width for start, end in zip(boundaries[:-1], boundaries[1:]))
