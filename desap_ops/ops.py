"""The registered operators.

- ``desap::prune``: the operator of docs/contract.md. CPU tensors run the PyTorch reference; CUDA tensors run the
  Triton kernels (float64 on CUDA falls back to the reference, the kernels compute in float32).
- ``desap::prune_triton``: the same schema, always the Triton kernels (CPU tensors only under
  ``TRITON_INTERPRET=1``); it is what ``backend="triton"`` calls and what the kernel tests exercise.
- ``desap::prune_backward``: grad(tokens) -> grad(hidden) with the assignment held fixed. Both
  forward ops register it as their backward, so torch.compile and AOTAutograd see one graph.

The fake implementations depend only on shapes and arguments, never on values.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import reference
from .validation import check_inputs

OpResult = tuple[Tensor, Tensor, Tensor, Tensor]


def _triton_module():
    """Import the kernels lazily: importing desap_ops must not import triton or query a device."""
    try:
        from . import triton_backend
    except ImportError as err:  # triton missing (not Linux) or broken
        raise RuntimeError(f"the Triton backend needs the triton package: {err}") from err
    return triton_backend


def _positional_to_reference(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio,
                             merge, text_reduce):
    return (hidden, attn, text, saliency, keep), dict(
        text_mask=text_mask, task_ratio=task_ratio, merge=merge, metric=metric, text_reduce=text_reduce
    )


def _run_reference(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                   text_reduce) -> OpResult:
    args, kwargs = _positional_to_reference(hidden, attn, text, text_mask, saliency, metric, keep,
                                            task_ratio, merge, text_reduce)
    with torch.no_grad():  # the op's own autograd formula applies, not the reference's graph
        return tuple(reference.prune(*args, **kwargs))


def _run_triton(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                text_reduce) -> OpResult:
    keep, task_ratio, merge, text_reduce = check_inputs(hidden, attn, text, text_mask, saliency, metric, keep,
                                                        task_ratio, merge, text_reduce)
    if hidden.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "the Triton kernels got CPU tensors: move the tensors to CUDA, use backend='reference', "
            "or set TRITON_INTERPRET=1 before triton is imported to interpret the kernels on the CPU"
        )
    return _triton_module().prune(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio,
                                  merge, text_reduce)


def _fake_outputs(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                  text_reduce) -> OpResult:
    # shapes and arguments only, never values; keep may be a SymInt under dynamic shapes
    keep, *_ = check_inputs(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                            text_reduce)
    batch, tokens, width = hidden.shape
    return (
        hidden.new_empty((batch, keep, width)),
        hidden.new_empty((batch, keep), dtype=torch.int64),
        hidden.new_empty((batch, tokens), dtype=torch.int64),
        hidden.new_empty((batch, tokens), dtype=torch.float32),
    )


@torch.library.custom_op("desap::prune", mutates_args=())
def prune(hidden: Tensor, attn: Tensor, text: Tensor, text_mask: Optional[Tensor], saliency: Tensor,
          metric: Optional[Tensor], keep: int, task_ratio: float, merge: bool,
          text_reduce: str) -> OpResult:
    raise NotImplementedError(f"desap::prune has no kernel for device {hidden.device.type}")


@prune.register_kernel("cpu")
def _prune_cpu(*args) -> OpResult:
    return _run_reference(*args)


@prune.register_kernel("cuda")
def _prune_cuda(hidden, *args) -> OpResult:
    if hidden.dtype == torch.float64:  # the kernels compute in float32; float64 keeps its precision
        return _run_reference(hidden, *args)
    return _run_triton(hidden, *args)


@torch.library.custom_op("desap::prune_triton", mutates_args=())
def prune_triton(hidden: Tensor, attn: Tensor, text: Tensor, text_mask: Optional[Tensor],
                 saliency: Tensor, metric: Optional[Tensor], keep: int, task_ratio: float,
                 merge: bool, text_reduce: str) -> OpResult:
    return _run_triton(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                       text_reduce)


@torch.library.custom_op("desap::prune_backward", mutates_args=())
def prune_backward(grad_tokens: Tensor, assignment: Tensor) -> Tensor:
    raise NotImplementedError(f"desap::prune_backward has no kernel for device {grad_tokens.device.type}")


@prune_backward.register_kernel("cpu")
def _prune_backward_cpu(grad_tokens: Tensor, assignment: Tensor) -> Tensor:
    return reference.prune_backward(grad_tokens, assignment)


@prune_backward.register_kernel("cuda")
def _prune_backward_cuda(grad_tokens: Tensor, assignment: Tensor) -> Tensor:
    if grad_tokens.dtype == torch.float64:
        return reference.prune_backward(grad_tokens, assignment)
    return _triton_module().prune_backward(grad_tokens, assignment)


@prune_backward.register_fake
def _prune_backward_fake(grad_tokens: Tensor, assignment: Tensor) -> Tensor:
    return grad_tokens.new_empty((grad_tokens.shape[0], assignment.shape[1], grad_tokens.shape[2]))


def _prune_backward_setup(ctx, inputs, output) -> None:
    grad_tokens, assignment = inputs
    ctx.save_for_backward(assignment)
    ctx.keep = grad_tokens.shape[1]


def _prune_backward_backward(ctx, grad_hidden: Tensor):
    # prune_backward is linear in grad_tokens; its adjoint is the mean over each group.
    (assignment,) = ctx.saved_tensors
    return reference.group_mean(grad_hidden, assignment, ctx.keep), None


prune_backward.register_autograd(_prune_backward_backward, setup_context=_prune_backward_setup)


def _setup_context(ctx, inputs, output) -> None:
    _, _, assignment, task_scores = output
    ctx.save_for_backward(assignment)
    ctx.mark_non_differentiable(task_scores)


def _backward(ctx, grad_tokens, grad_indices, grad_assignment, grad_scores):
    (assignment,) = ctx.saved_tensors
    grad_hidden = None
    if ctx.needs_input_grad[0] and grad_tokens is not None:
        grad_hidden = prune_backward(grad_tokens.contiguous(), assignment)
    return grad_hidden, None, None, None, None, None, None, None, None, None


for _op in (prune, prune_triton):
    _op.register_fake(_fake_outputs)
    _op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula([torch.ops.desap.prune, torch.ops.desap.prune_triton])
def prune_flops(hidden, attn, text, text_mask, saliency, metric, keep, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one call from the argument shapes (what ``FlopCounterMode`` counts): the similarity
    (2 N L C), the nearest-kept match (2 N K E) and the merge sums (N D), per image."""
    batch, tokens, width = hidden
    metric_width = (metric or hidden)[2]
    return batch * (2 * tokens * text[1] * attn[2] + 2 * tokens * keep * metric_width + tokens * width)
