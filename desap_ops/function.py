"""``PruneFunction``: the operator as a ``torch.autograd.Function`` (as Liger-Kernel's ``LigerXFunction``).

Its forward runs the registered forward op (``desap::prune``, or ``desap::prune_triton`` for
``backend="triton"``) and its backward runs the registered ``desap::prune_backward``: the Function
calls the ops, never the reverse, so the ops stay differentiable on their own (each has
``register_autograd``) and this class is only a second, familiar door to the same kernels. The
backward of the backward exists because ``desap::prune_backward`` is itself differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .validation import AUTO


class PruneFunction(torch.autograd.Function):
    """``PruneFunction.apply(hidden, attn, text, saliency, keep, text_mask, task_ratio, merge,
    metric, text_reduce, backend, text_budget)`` -> (tokens, indices, assignment, task_scores,
    task_keep).

    Arguments as :func:`desap_ops.prune`, all positional; ``backend`` is "auto" or "triton" (the
    reference has its own autograd through plain PyTorch). Only ``tokens`` is differentiable, and
    only with respect to ``hidden`` (docs/contract.md, "Gradients").
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, attn: Tensor, text: Tensor, saliency: Tensor, keep: int,
                text_mask: Optional[Tensor] = None, task_ratio: float = 0.5, merge: bool = True,
                metric: Optional[Tensor] = None, text_reduce: str = "max", backend: str = "auto",
                text_budget: Optional[int] = None):
        op = ops.prune_triton if backend == "triton" else ops.prune
        ratio = None if task_ratio == AUTO else task_ratio   # the op's schema spells "auto" None
        outputs = op(hidden, attn, text, text_mask, saliency, metric, keep, ratio, merge, text_reduce,
                     text_budget)
        _, indices, assignment, scores, task_keep = outputs
        ctx.save_for_backward(assignment)
        ctx.mark_non_differentiable(indices, assignment, scores, task_keep)
        return outputs

    @staticmethod
    def backward(ctx, grad_tokens, *unused_grads):
        (assignment,) = ctx.saved_tensors
        grad_hidden = None
        if ctx.needs_input_grad[0] and grad_tokens is not None:
            grad_hidden = ops.prune_backward(grad_tokens.contiguous(), assignment)
        return (grad_hidden,) + (None,) * 11
