"""``PruneFunction``: the operator as a ``torch.autograd.Function`` (as Liger-Kernel's ``LigerXFunction``).

Its forward runs the registered forward op (``desap::prune``, or ``desap::prune_triton`` for
``backend="triton"``); its ``setup_context`` and ``backward`` are the ops' own
(``ops.autograd_setup_context``, ``ops.autograd_backward``), so there is one backward, through the
registered ``desap::prune_backward``. The Function calls the ops, never the reverse, so the ops stay
differentiable on their own and this class is only a second, familiar door to the same kernels.
The backward of the backward exists because ``desap::prune_backward`` is itself differentiable.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import ops
from .reference import AUTO


class PruneFunction(torch.autograd.Function):
    """``PruneFunction.apply(hidden, attn, text, saliency, keep, text_mask, task_ratio, merge,
    metric, text_reduce, backend, text_budget)`` -> (tokens, indices, assignment, task_scores,
    task_keep).

    Arguments as :func:`desap_ops.prune`, all positional; ``backend`` is "auto" or "triton" (the
    reference has its own autograd through plain PyTorch). Only ``tokens`` is differentiable, and
    only with respect to ``hidden`` (docs/contract.md, "Gradients").
    """

    @staticmethod
    def forward(hidden: Tensor, attn: Tensor, text: Tensor, saliency: Tensor, keep: int,
                text_mask: Optional[Tensor] = None, task_ratio: Union[float, str] = 0.5, merge: bool = True,
                metric: Optional[Tensor] = None, text_reduce: str = "max", backend: str = "auto",
                text_budget: Optional[int] = None) -> ops.OpResult:
        op = ops.prune_triton if backend == "triton" else ops.prune
        ratio = None if task_ratio == AUTO else task_ratio   # the op's schema spells "auto" None
        return op(hidden, attn, text, text_mask, saliency, metric, keep, ratio, merge, text_reduce, text_budget)

    setup_context = staticmethod(ops.autograd_setup_context)
    backward = staticmethod(ops.autograd_backward)
