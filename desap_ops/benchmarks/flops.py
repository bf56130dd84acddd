"""FLOPs as ``torch.utils.flop_counter`` counts them, for ``desap bench e2e``: formulas for SDPA's
CPU kernel and the matrix-vector product (which torch leaves uncounted), and :class:`ShapesOnly`,
which counts a full-size forward pass on a CPU in little memory."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

# torch counts no FLOPs for SDPA's CPU kernel (it does for the CUDA ones): the same count as theirs
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


# nor for a matrix-vector product (DivPrune's greedy steps): 2 FLOPs per element of the matrix
if torch.ops.aten.mv not in flop_registry:
    @register_flop_formula(torch.ops.aten.mv)
    def _mv_flops(matrix_shape, vector_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * matrix_shape[0] * matrix_shape[1]


class ShapesOnly(TorchDispatchMode):
    """Every op the FLOP counter counts (the matrix products, convolutions and attention of torch)
    runs on meta copies of its inputs and gives zeros of its output's shape and strides: inside a
    ``FlopCounterMode`` a forward pass is counted exactly while the rest of it (token ids, grids,
    positions, indexing, elementwise work and DeSAP's own op) runs as it is, at a small share of
    the cost. With :func:`desap_ops.testing.real_shapes.build_real_shape`'s ``weights=False`` this
    counts a full-size model whose forward reads token ids (Qwen, video) on a CPU in little memory."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten" or func.overloadpacket not in flop_registry:
            return func(*args, **kwargs)
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        out = func(*meta_args, **meta_kwargs)
        zeros = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).zero_()  # noqa: E731
        return tree_map_only(torch.Tensor, zeros, out)


def flops_of(fn: Callable[[], object], shapes_only: bool = False) -> int:
    """FLOPs ``torch.utils.flop_counter`` counts in one call of ``fn`` (DeSAP's op included);
    ``shapes_only``: under :class:`ShapesOnly` (the same count, none of the matrix work)."""
    with FlopCounterMode(display=False) as counter:
        if shapes_only:
            with ShapesOnly():
                fn()
        else:
            fn()
    return int(counter.get_total_flops())
