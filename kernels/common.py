"""Helpers shared by the kernel families: launch-side choices, and the scale-free row scaling."""
import os

import torch
import triton
import triton.language as tl

HALF_DTYPES = (torch.float16, torch.bfloat16)
NEG_INF = tl.constexpr(float("-inf"))   # the masked logit, shared by the kernels


def next_block(size: int, cap: int, floor: int = 16) -> int:
    """A power-of-two tile covering ``size`` up to ``cap``; at least 16, the smallest tl.dot tile."""
    return max(floor, min(cap, triton.next_power_of_2(size)))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_in_fp32(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether tl.dot must take float32 tiles (and exact "ieee" products).

    tl.dot takes one dtype: half pairs multiply natively (their products are exact in the float32
    accumulator), anything else is upcast. The interpreter multiplies bfloat16 bit patterns as
    integers (numpy has no bfloat16), so there bfloat16 tiles are upcast too: same exact products.
    """
    if a.dtype != b.dtype or a.dtype not in HALF_DTYPES:
        return True
    return a.dtype == torch.bfloat16 and interpreting()


def launch(kernel, grid, args, constexprs, num_warps: int) -> None:
    """The one place kernels are launched; tests/sm90_compile.py captures it to compile each
    launcher's exact configuration for a Hopper GPU without one."""
    kernel[grid](*args, **constexprs, num_warps=num_warps)


def scale_target(a: torch.Tensor, b: torch.Tensor) -> int:
    """log2 of where row scaling puts each row's largest magnitude: [2**15, 65504] when both are
    float16 (every factor is then >= 1, so no float16 value loses a bit and their tl.dot stays
    native), else [1, 2)."""
    return 15 if a.dtype == b.dtype == torch.float16 else 0


@triton.jit
def floor_log2(m):
    """int32 floor(log2 m) of float32 magnitudes, from the exponent bits, clamped to [-126, 126]
    (zero and subnormals: -126). The same rule as desap_ops.reference.floor_log2."""
    exponent = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.minimum(tl.maximum(exponent - 127, -126), 126)


@triton.jit
def power_of_two(e):
    """2 ** e in float32, exactly: 0 below -126, capped at 2 ** 127."""
    bits = (tl.minimum(tl.maximum(e, -126), 127) + 127) << 23
    return tl.where(e < -126, 0.0, bits.to(tl.float32, bitcast=True))


@triton.jit
def rescale_rows(x32, exponent, TARGET: tl.constexpr):
    """Online, exact row scaling (contract, step 1) for one tile of rows.

    ``exponent`` is each row's largest floor(log2 |x|) over the tiles seen so far. Returns the
    updated exponents, the factor (a power of two <= 1) by which sums built under the old
    exponents must be multiplied, and this tile scaled by 2 ** (TARGET - exponent): every product
    and square after it is free of overflow and underflow, and being powers of two the factors
    change no rounding.
    """
    new = tl.maximum(exponent, floor_log2(tl.max(tl.abs(x32), axis=1)))
    fix = power_of_two(exponent - new)
    return new, fix, x32 * power_of_two(TARGET - new)[:, None]


@triton.jit
def cosine_tile(a_rows, a_ok, stride_a, b_rows, b_ok, stride_b, F,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
                DOT_FP32: tl.constexpr, TARGET: tl.constexpr):
    """(BLOCK_A, BLOCK_B) float32 cosines between the rows at ``a_rows`` and ``b_rows`` (row
    pointers, shape (BLOCK_*, 1)) over F features: one tiled product, norms taken from the same
    tiles, every row scaled on the fly (rescale_rows), norms clamped below at 1e-6."""
    dots = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    sq_a = tl.zeros([BLOCK_A], tl.float32)
    sq_b = tl.zeros([BLOCK_B], tl.float32)
    exp_a = tl.full([BLOCK_A], -126, tl.int32)
    exp_b = tl.full([BLOCK_B], -126, tl.int32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        f_ok = f < F
        a = tl.load(a_rows + f[None, :] * stride_a, mask=a_ok[:, None] & f_ok[None, :], other=0.0)
        b = tl.load(b_rows + f[None, :] * stride_b, mask=b_ok[:, None] & f_ok[None, :], other=0.0)
        exp_a, fix_a, a32 = rescale_rows(a.to(tl.float32), exp_a, TARGET)
        exp_b, fix_b, b32 = rescale_rows(b.to(tl.float32), exp_b, TARGET)
        dots = dots * fix_a[:, None] * fix_b[None, :]
        sq_a = sq_a * fix_a * fix_a + tl.sum(a32 * a32, axis=1)
        sq_b = sq_b * fix_b * fix_b + tl.sum(b32 * b32, axis=1)
        if DOT_FP32:  # exact float32 products: tf32 would blur near-ties
            dots += tl.dot(a32, tl.trans(b32), input_precision="ieee")
        else:  # half pairs: scaled by powers of two they are still exact in their own dtype
            dots += tl.dot(a32.to(a.dtype), tl.trans(b32.to(b.dtype)))
    return dots / tl.maximum(tl.sqrt(sq_a), 1e-6)[:, None] / tl.maximum(tl.sqrt(sq_b), 1e-6)[None, :]
