"""Launch 2: two-stage top-K selection and nearest-kept assignment.

Grid (B, cdiv(N, BLOCK_J)). Every program of an image first runs the whole selection for that
image in registers: it is O(N) work on 8 bytes per token, cheap next to the metric product, and
running it redundantly removes a launch and any cross-program dependency. Then each program:

- writes the kept indices (every program of an image writes the same values to the same places,
  so the result does not depend on which program writes last);
- for its own BLOCK_J tokens, recomputes whether each is kept and at which output position from
  the thresholds, without reading anything another program wrote;
- if merging, after a CTA barrier reads the kept indices back and finds, for each of its tokens,
  the kept token of highest cosine similarity: a tiled (BLOCK_J x E) @ (E x BLOCK_K) product per
  block of kept tokens, with norms on the fly and a running argmax (ties to the lower position).

Selection without sorting: scores become int64 keys with the float order (NaN below every number,
excluded tokens below NaN, padding lanes below all). The k-th largest key t is found by bisection
on the key range (33 counting passes); every key above t is taken, and among keys equal to t the
lowest indices, so ties go to the lower index exactly. This needs neither tl.sort nor tl.topk,
whose limits differ between triton 3.6 and 3.9.

Bytes: saliency and scores 8 B/token per program (L2-resident), metric rows of the block and of
the kept tokens. FLOPs: 2 * B * N * K * E for the assignment.
"""
from typing import NamedTuple, Optional

import triton
import triton.language as tl
import torch

from .common import cosine_tile, dot_in_fp32, launch, next_block, scale_target

NAN_KEY = tl.constexpr(-2147483648)       # below every number (-inf maps to -2139095041)
EXCLUDED_KEY = tl.constexpr(-2147483649)  # chosen in stage 1: out of stage 2
PAD_KEY = tl.constexpr(-2147483650)       # lanes past N: never counted


@triton.jit
def _order_key(x):
    """float32 -> int64 with the same order; -0.0 equals +0.0; NaN -> NAN_KEY."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return tl.where(x != x, NAN_KEY, key)


@triton.jit
def _kth_key(key, k):
    """Largest t with count(key >= t) >= k (for k >= 1 the k-th largest key)."""
    lo = tl.full([], EXCLUDED_KEY, tl.int64)   # every real token has key >= lo
    hi = lo + 4294967298                       # above every key: count is 0
    for _ in range(33):
        mid = lo + ((hi - lo) >> 1)
        enough = tl.sum((key >= mid).to(tl.int32), axis=0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return lo


@triton.jit
def _take(key, t, quota, ties_before):
    """Keys above t, and the first ``quota`` keys equal to t counting ``ties_before`` earlier ones."""
    tie = (key == t).to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
    return (key > t) | ((tie != 0) & (tie_rank < quota))


@triton.jit
def _key_value(key):
    """The float32 a key of _order_key came from (-0.0 comes back as +0.0, NAN_KEY as NaN)."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.int32)
    return tl.where(key == NAN_KEY, float("nan"), bits.to(tl.float32, bitcast=True))


class AutoSplit(NamedTuple):
    """The constants of task_ratio="auto" (contract, step 2). desap_ops.reference names them; the
    operator passes them in (triton_backend.auto_split), and the kernel takes them as constexprs,
    each rounded to float32 as PyTorch rounds a Python float against a float32 tensor."""

    low: float            # g at which the task share leaves 0 (AUTO_LOW)
    width: float          # AUTO_HIGH - AUTO_LOW: the g over which the share rises to max_share
    max_share: float      # AUTO_MAX_SHARE
    mad_to_sigma: float   # MAD_TO_SIGMA


@triton.jit
def _auto_task_keep(task, n_ok, N, keep, LOW: tl.constexpr, WIDTH: tl.constexpr,
                    MAX_SHARE: tl.constexpr, MAD_TO_SIGMA: tl.constexpr):
    """task_ratio="auto" (contract, step 2), the float32 operations of reference.task_budget in the
    same order: g = (max - median) / (MAD_TO_SIGMA MAD) of the task scores, then
    K_task = round-half-up(MAX_SHARE K clamp((g - LOW) / WIDTH, 0, 1))."""
    half = (N + 1) // 2
    key = tl.where(n_ok, _order_key(task), PAD_KEY)
    top = _key_value(_kth_key(key, 1))
    median = _key_value(_kth_key(key, half))
    deviation = tl.where(n_ok, _order_key(tl.abs(task - median)), PAD_KEY)
    spread = _key_value(_kth_key(deviation, half)) * MAD_TO_SIGMA
    share = ((top - median) / spread - LOW) / WIDTH
    share = tl.where(share != share, 0.0, tl.minimum(tl.maximum(share, 0.0), 1.0))
    wanted = share * (keep.to(tl.float32) * MAX_SHARE)
    whole = tl.floor(wanted)
    return whole.to(tl.int32) + (wanted - whole >= 0.5).to(tl.int32)


@triton.jit
def _select_assign_kernel(
    sal_ptr, score_ptr, mask_ptr, metric_ptr, idx_ptr, assign_ptr, task_keep_ptr,
    N, L, E, K, K_TASK,
    stride_sb, stride_sn, stride_mb, stride_ml,
    stride_xb, stride_xn, stride_xe,
    HAS_MASK: tl.constexpr, AUTO: tl.constexpr, MERGE: tl.constexpr, DOT_FP32: tl.constexpr,
    AUTO_LOW: tl.constexpr, AUTO_WIDTH: tl.constexpr, AUTO_MAX_SHARE: tl.constexpr, MAD_TO_SIGMA: tl.constexpr,
    TARGET: tl.constexpr, N_POW2: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j0 = tl.program_id(1) * BLOCK_J
    keep = tl.cast(K, tl.int32)  # tl.cast, not .to: an argument equal to 1 arrives as a constant
    n = tl.arange(0, N_POW2)
    n_ok = n < N
    sal = tl.load(sal_ptr + b * stride_sb + n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    task = tl.load(score_ptr + b * N + n, mask=n_ok, other=0.0)

    # The split: a fixed K_TASK, or read from this image's own scores; none without valid text.
    if AUTO:
        k_task = _auto_task_keep(task, n_ok, tl.cast(N, tl.int32), keep,
                                 AUTO_LOW, AUTO_WIDTH, AUTO_MAX_SHARE, MAD_TO_SIGMA)
    else:
        k_task = tl.cast(K_TASK, tl.int32)
    if HAS_MASK:
        n_text = tl.zeros([BLOCK_L], tl.int32)
        for l0 in range(0, L, BLOCK_L):
            l = l0 + tl.arange(0, BLOCK_L)
            valid = tl.load(mask_ptr + b * stride_mb + l * stride_ml, mask=l < L, other=0)
            n_text += (valid != 0).to(tl.int32)
        k_task = tl.where(tl.sum(n_text, axis=0) > 0, k_task, 0)
    k_sal = keep - k_task
    tl.store(task_keep_ptr + b, k_task.to(tl.int64), mask=tl.program_id(1) == 0)

    # Whole-image selection, in registers.
    key1 = tl.where(n_ok, _order_key(sal), PAD_KEY)
    t1 = _kth_key(key1, k_sal)
    quota1 = k_sal - tl.sum((key1 > t1).to(tl.int32), axis=0)
    chosen1 = _take(key1, t1, quota1, 0)
    key2 = tl.where(n_ok, tl.where(chosen1, EXCLUDED_KEY, _order_key(task)), PAD_KEY)
    t2 = _kth_key(key2, k_task)
    quota2 = k_task - tl.sum((key2 > t2).to(tl.int32), axis=0)
    kept = chosen1 | _take(key2, t2, quota2, 0)
    kept_i = kept.to(tl.int32)
    position = tl.cumsum(kept_i, axis=0) - 1
    tl.store(idx_ptr + b * keep + position, n.to(tl.int64), mask=kept)

    # This program's tokens: kept or not, and where, from the thresholds alone.
    j = j0 + tl.arange(0, BLOCK_J)
    j_ok = j < N
    before = n < j0
    sal_j = tl.load(sal_ptr + b * stride_sb + j * stride_sn, mask=j_ok, other=0.0).to(tl.float32)
    task_j = tl.load(score_ptr + b * N + j, mask=j_ok, other=0.0)
    kj1 = tl.where(j_ok, _order_key(sal_j), PAD_KEY)
    chosen1_j = _take(kj1, t1, quota1, tl.sum((before & (key1 == t1)).to(tl.int32), axis=0))
    kj2 = tl.where(j_ok, tl.where(chosen1_j, EXCLUDED_KEY, _order_key(task_j)), PAD_KEY)
    kept_j = chosen1_j | _take(kj2, t2, quota2, tl.sum((before & (key2 == t2)).to(tl.int32), axis=0))
    kept_ji = kept_j.to(tl.int32)
    position_j = tl.sum(tl.where(before, kept_i, 0), axis=0) + tl.cumsum(kept_ji, axis=0) - kept_ji
    result = tl.where(kept_j, position_j, -1).to(tl.int64)

    if MERGE:
        tl.debug_barrier()  # this CTA's index stores are visible to all its threads
        metric_b = metric_ptr + b * stride_xb
        row_j = metric_b + j.to(tl.int64)[:, None] * stride_xn
        best = tl.full([BLOCK_J], float("-inf"), tl.float32)
        nearest = tl.zeros([BLOCK_J], tl.int32)
        for k0 in range(0, keep, BLOCK_K):
            slot = k0 + tl.arange(0, BLOCK_K)
            slot_ok = slot < keep
            kept_index = tl.load(idx_ptr + b * keep + slot, mask=slot_ok, other=0)
            row_k = metric_b + kept_index[:, None] * stride_xn
            # scale-free cosines, as in launch 1 (contract, step 4)
            cos = cosine_tile(row_j, j_ok, stride_xe, row_k, slot_ok, stride_xe, E,
                              BLOCK_J, BLOCK_K, BLOCK_E, DOT_FP32, TARGET)
            cos = tl.where(slot_ok[None, :] & (cos == cos), cos, float("-inf"))
            block_best = tl.max(cos, axis=1)
            block_arg = tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int32) + k0
            better = block_best > best      # strict: an equal later block loses the tie
            best = tl.where(better, block_best, best)
            nearest = tl.where(better, block_arg, nearest)
        result = tl.where(kept_j, result, nearest.to(tl.int64))

    tl.store(assign_ptr + b * N + j, result, mask=j_ok)


# The whole-image selection keeps N_POW2-wide vectors in registers. Compiled for sm_90 with triton
# 3.9 (tests/sm90_compile.py, which compiles N = MAX_TOKENS): N_POW2 = 8192 on 8 warps takes 216-255
# registers and no stack; 16384 spills at every warp count (stack 152-1056 B on 8 warps, 104-520 B
# on 16, 152-344 B on 32). Larger images run the reference (desap::prune on CUDA) or are refused.
MAX_TOKENS = 8192


def check_tokens(tokens: int) -> None:
    """Refuse images the whole-image selection cannot hold; callers check before any launch."""
    if tokens > MAX_TOKENS:
        raise ValueError(
            f"the Triton selection kernel takes N <= {MAX_TOKENS} tokens per image, got N = {tokens}; "
            "use backend='reference' for larger images"
        )


def select_and_assign(saliency: torch.Tensor, scores: torch.Tensor, text_mask: Optional[torch.Tensor],
                      metric: torch.Tensor, keep: int, k_task: Optional[int], merge: bool, *,
                      auto_split: AutoSplit):
    """(indices (B, K) ascending, assignment (B, N), task_keep (B,)), contract steps 2-4 (the
    assignment); ``k_task`` None: task_ratio="auto", each image's split from its own scores by
    ``auto_split``."""
    batch, tokens = saliency.shape
    check_tokens(tokens)
    indices = torch.empty((batch, keep), dtype=torch.int64, device=saliency.device)
    assignment = torch.empty((batch, tokens), dtype=torch.int64, device=saliency.device)
    task_keep = torch.empty((batch,), dtype=torch.int64, device=saliency.device)
    n_pow2 = triton.next_power_of_2(tokens)
    mask = text_mask.view(torch.uint8) if text_mask is not None else saliency
    mask_strides = text_mask.stride() if text_mask is not None else (0, 0)
    n_text = text_mask.shape[1] if text_mask is not None else 1
    fp32 = dot_in_fp32(metric, metric)
    # tiles without spills on sm_90 up to N = MAX_TOKENS on 8 warps (see MAX_TOKENS)
    block = 32 if fp32 else 64
    block_j = block
    grid = (batch, triton.cdiv(tokens, block_j))
    launch(
        _select_assign_kernel, grid,
        (saliency, scores, mask, metric, indices, assignment, task_keep, tokens, n_text, metric.shape[2], keep,
         0 if k_task is None else k_task, *saliency.stride(), *mask_strides, *metric.stride()),
        dict(HAS_MASK=text_mask is not None, AUTO=k_task is None, MERGE=merge, DOT_FP32=fp32,
             AUTO_LOW=auto_split.low, AUTO_WIDTH=auto_split.width, AUTO_MAX_SHARE=auto_split.max_share,
             MAD_TO_SIGMA=auto_split.mad_to_sigma, TARGET=scale_target(metric, metric), N_POW2=n_pow2,
             BLOCK_J=block_j, BLOCK_K=next_block(keep, block),
             BLOCK_E=next_block(metric.shape[2], 32), BLOCK_L=next_block(n_text, 128)),
        num_warps=8,
    )
    return indices, assignment, task_keep
