"""The registered operators.

- ``desap::prune``: the operator of docs/contract.md. CPU tensors run the PyTorch reference; CUDA tensors run the
  Triton kernels (float64 on CUDA falls back to the reference, the kernels compute in float32).
- ``desap::prune_triton``: the same schema, always the Triton kernels (CPU tensors only under
  ``TRITON_INTERPRET=1``); it is what ``backend="triton"`` calls and what the kernel tests exercise.
- ``desap::prune_backward``: grad(tokens) -> grad(hidden) with the assignment held fixed. Both
  forward ops, and ``PruneFunction``, reach it through the one ``autograd_backward`` here, so
  torch.compile and AOTAutograd see one graph.

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

OpResult = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _triton_module():
    """Import the kernels lazily: importing desap_ops must not import triton or query a device."""
    try:
        from . import triton_backend
    except ImportError as err:  # triton missing (not Linux) or broken
        raise RuntimeError(f"the Triton backend needs the triton package: {err}") from err
    return triton_backend


def _run_reference(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                   text_reduce, text_budget=None) -> OpResult:
    options = check_inputs(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                           text_reduce, text_budget)
    with torch.no_grad():  # the op's own autograd formula applies, not the reference's graph
        return tuple(reference.prune(hidden, attn, text, saliency, text_mask=text_mask, metric=metric,
                                     **options._asdict()))


def _run_triton(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                text_reduce, text_budget=None) -> OpResult:
    options = check_inputs(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                           text_reduce, text_budget)
    if hidden.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "the Triton kernels got CPU tensors: move the tensors to CUDA, use backend='reference', "
            "or set TRITON_INTERPRET=1 before triton is imported to interpret the kernels on the CPU"
        )
    return _triton_module().prune(hidden, attn, text, text_mask, saliency, metric, **options._asdict())


def _fake_outputs(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                  text_reduce, text_budget=None) -> OpResult:
    # shapes and arguments only, never values; keep may be a SymInt under dynamic shapes
    keep = check_inputs(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                        text_reduce, text_budget).keep
    batch, tokens, width = hidden.shape
    return (
        hidden.new_empty((batch, keep, width)),
        hidden.new_empty((batch, keep), dtype=torch.int64),
        hidden.new_empty((batch, tokens), dtype=torch.int64),
        hidden.new_empty((batch, tokens), dtype=torch.float32),
        hidden.new_empty((batch,), dtype=torch.int64),
    )


# task_ratio: a number in [0, 1], or None for "auto" (the schema has no string-or-float type)
@torch.library.custom_op("desap::prune", mutates_args=())
def prune(hidden: Tensor, attn: Tensor, text: Tensor, text_mask: Optional[Tensor], saliency: Tensor,
          metric: Optional[Tensor], keep: int, task_ratio: Optional[float], merge: bool,
          text_reduce: str, text_budget: Optional[int] = None) -> OpResult:
    raise NotImplementedError(f"desap::prune has no kernel for device {hidden.device.type}")


@prune.register_kernel("cpu")
def _prune_cpu(*args, **kwargs) -> OpResult:
    return _run_reference(*args, **kwargs)


@prune.register_kernel("cuda")
def _prune_cuda(hidden, *args, **kwargs) -> OpResult:
    from .kernels.selection import MAX_TOKENS  # here: importing the kernels needs triton

    # float64 keeps its precision (the kernels compute in float32); an image larger than the
    # whole-image selection holds in registers runs the reference rather than failing
    if hidden.dtype == torch.float64 or hidden.shape[1] > MAX_TOKENS:
        return _run_reference(hidden, *args, **kwargs)
    return _run_triton(hidden, *args, **kwargs)


@torch.library.custom_op("desap::prune_triton", mutates_args=())
def prune_triton(hidden: Tensor, attn: Tensor, text: Tensor, text_mask: Optional[Tensor],
                 saliency: Tensor, metric: Optional[Tensor], keep: int, task_ratio: Optional[float],
                 merge: bool, text_reduce: str, text_budget: Optional[int] = None) -> OpResult:
    return _run_triton(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio, merge,
                       text_reduce, text_budget)


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


def autograd_setup_context(ctx, inputs, output) -> None:
    """What the backward keeps of a forward (both forward ops and ``PruneFunction``): the assignment."""
    _, _, assignment, task_scores, task_keep = output
    ctx.save_for_backward(assignment)
    ctx.mark_non_differentiable(task_scores, task_keep)   # integer outputs never are


def autograd_backward(ctx, grad_tokens: Optional[Tensor], *unused_grads):
    """The one backward of both forward ops and of ``PruneFunction``: grad(tokens) -> grad(hidden)
    through ``desap::prune_backward``, None for every other input, counted from
    ``ctx.needs_input_grad`` (one entry per input of whichever forward ran)."""
    (assignment,) = ctx.saved_tensors
    grad_hidden = None
    if ctx.needs_input_grad[0] and grad_tokens is not None:
        grad_hidden = prune_backward(grad_tokens.contiguous(), assignment)
    return (grad_hidden,) + (None,) * (len(ctx.needs_input_grad) - 1)


for _op in (prune, prune_triton):
    _op.register_fake(_fake_outputs)
    _op.register_autograd(autograd_backward, setup_context=autograd_setup_context)


@register_flop_formula([torch.ops.desap.prune, torch.ops.desap.prune_triton])
def prune_flops(hidden, attn, text, text_mask, saliency, metric, keep, task_ratio=None, merge=True,
                text_reduce="max", text_budget=None, *, out_shape=None, **kwargs) -> int:
    """FLOPs of one call from the argument shapes (what ``FlopCounterMode`` counts): the similarity
    (2 N L C, over at most ``text_budget`` text tokens), the nearest-kept match (2 N K E), the merge
    sums (N D), per image; with a budget below L also the sketch that picks the text tokens
    (2 (N + L) C S + 2 N L S, S = reference.SKETCH_WIDTH)."""
    batch, tokens, width = hidden
    length, text_width = text[1], attn[2]
    metric_width = (metric or hidden)[2]
    kept_text = length if text_budget is None else min(length, text_budget)
    sketch = 0
    if kept_text < length:
        sketch = 2 * (tokens + length) * text_width * reference.SKETCH_WIDTH + \
            2 * tokens * length * reference.SKETCH_WIDTH
    return batch * (2 * tokens * kept_text * text_width + 2 * tokens * keep * metric_width + tokens * width + sketch)
