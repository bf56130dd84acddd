"""Launch 3: the mean merge of each group, and its backward.

Grid (B * K, cdiv(D, BLOCK_D)): one program per output token and feature slice. It scans the
image's assignment (8 B/token, L2-resident) for the tokens of its group and sums their hidden rows
in token order, skipping chunks with no member, so each hidden row is read once per feature slice
and the sum order is fixed: no atomics, bitwise-deterministic. Masked loads keep a NaN or inf in
one group out of every other group.

The backward mirrors it: each program spreads grad_tokens[k] / count[k] over its group's rows, so
every row of grad_hidden is written by exactly one program (rows of dropped tokens stay zero).

Bytes: hidden read once, tokens written once, assignment re-read from cache. FLOPs: B * N * D adds.
"""
import triton
import triton.language as tl
import torch

from .common import launch


@triton.jit
def _output_slot(K, D, BLOCK_D: tl.constexpr):
    """Program (b * K + k, d-block) -> (flat output row, image b, output k, features d, d in range)."""
    pid = tl.program_id(0).to(tl.int64)
    keep = tl.cast(K, tl.int64)  # tl.cast, not .to: an argument equal to 1 arrives as a constant
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return pid, pid // keep, pid % keep, d, d < D


@triton.jit
def _merge_kernel(
    hidden_ptr, idx_ptr, assign_ptr, out_ptr,
    N, K, D,
    stride_hb, stride_hn, stride_hd,
    MERGE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid, b, k, d, d_ok = _output_slot(K, D, BLOCK_D)
    hidden_b = hidden_ptr + b * stride_hb + d[None, :] * stride_hd
    if MERGE:
        total = tl.zeros([BLOCK_D], tl.float32)
        count = tl.full([], 0, tl.int32)
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            member = tl.load(assign_ptr + b * N + j, mask=j < N, other=-1) == k
            members = tl.sum(member.to(tl.int32), axis=0)
            if members > 0:
                rows = tl.load(hidden_b + j.to(tl.int64)[:, None] * stride_hn,
                               mask=member[:, None] & d_ok[None, :], other=0.0)
                total += tl.sum(rows.to(tl.float32), axis=0)
                count += members
        value = total / count.to(tl.float32)
    else:
        row = tl.load(idx_ptr + pid)
        value = tl.load(hidden_b + row * stride_hn, mask=d_ok[None, :], other=0.0).to(tl.float32)
        value = tl.sum(value, axis=0)  # (1, BLOCK_D) -> (BLOCK_D,)
    tl.store(out_ptr + pid * D + d, value.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _unmerge_grad_kernel(
    grad_ptr, assign_ptr, out_ptr,
    N, K, D,
    stride_gb, stride_gk, stride_gd,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid, b, k, d, d_ok = _output_slot(K, D, BLOCK_D)
    count = tl.full([], 0, tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        member = tl.load(assign_ptr + b * N + j, mask=j < N, other=-1) == k
        count += tl.sum(member.to(tl.int32), axis=0)
    grad = tl.load(grad_ptr + b * stride_gb + k * stride_gk + d * stride_gd, mask=d_ok, other=0.0)
    share = grad.to(tl.float32) / tl.maximum(count, 1).to(tl.float32)
    share = tl.broadcast_to(share[None, :], (BLOCK_J, BLOCK_D)).to(out_ptr.dtype.element_ty)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        member = tl.load(assign_ptr + b * N + j, mask=j < N, other=-1) == k
        if tl.sum(member.to(tl.int32), axis=0) > 0:
            target = out_ptr + (b * N + j.to(tl.int64))[:, None] * D + d[None, :]
            tl.store(target, share, mask=member[:, None] & d_ok[None, :])


# 32 x 256 row tiles on 4 warps: no spills on sm_90 (tests/sm90_compile.py)
BLOCK_J = 32


def _block_d(width: int) -> int:
    return min(256, triton.next_power_of_2(width))


def merge_tokens(hidden: torch.Tensor, indices: torch.Tensor, assignment: torch.Tensor,
                 merge: bool) -> torch.Tensor:
    """(B, K, D) in hidden's dtype: the mean of each group, or the kept rows without merge."""
    batch, tokens, width = hidden.shape
    keep = indices.shape[1]
    out = torch.empty((batch, keep, width), dtype=hidden.dtype, device=hidden.device)
    block_d = _block_d(width)
    grid = (batch * keep, triton.cdiv(width, block_d))
    launch(_merge_kernel, grid, (hidden, indices, assignment, out, tokens, keep, width, *hidden.stride()),
           dict(MERGE=merge, BLOCK_J=BLOCK_J, BLOCK_D=block_d), num_warps=4)
    return out


def unmerge_grad(grad_tokens: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """(B, N, D): grad_hidden[j] = grad_tokens[a_j] / count[a_j], zero where a_j = -1."""
    batch, keep, width = grad_tokens.shape
    tokens = assignment.shape[1]
    out = torch.zeros((batch, tokens, width), dtype=grad_tokens.dtype, device=grad_tokens.device)
    block_d = _block_d(width)
    grid = (batch * keep, triton.cdiv(width, block_d))
    launch(_unmerge_grad_kernel, grid, (grad_tokens, assignment, out, tokens, keep, width, *grad_tokens.stride()),
           dict(BLOCK_J=BLOCK_J, BLOCK_D=block_d), num_warps=4)
    return out
