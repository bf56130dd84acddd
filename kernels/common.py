"""Small helpers shared by the launchers (host side only)."""
import os

import torch
import triton

HALF_DTYPES = (torch.float16, torch.bfloat16)


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
