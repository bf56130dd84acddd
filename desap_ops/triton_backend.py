"""The Triton path of the operator: three launches forward, one (after a zero fill) backward."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import reference
from .reference import AUTO, split_budget
from .kernels import merge as merge_kernels
from .kernels import selection, similarity

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_kernel_dtypes(**tensors: Optional[torch.Tensor]) -> None:
    for name, value in tensors.items():
        if value is not None and value.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"the Triton kernels take float16, bfloat16 or float32, but {name} is {value.dtype}; "
                "use backend='reference' for float64"
            )


def auto_split() -> selection.AutoSplit:
    """The reference's constants of task_ratio="auto" (contract, step 2), as the selection kernel
    takes them: kernels never import the operator, so the operator hands them down. Read at each
    call, and ``width`` is AUTO_HIGH - AUTO_LOW in Python floats, as the reference computes it."""
    return selection.AutoSplit(low=reference.AUTO_LOW, width=reference.AUTO_HIGH - reference.AUTO_LOW,
                               max_share=reference.AUTO_MAX_SHARE, mad_to_sigma=reference.MAD_TO_SIGMA)


def prune(hidden: torch.Tensor, attn: torch.Tensor, text: torch.Tensor, text_mask: Optional[torch.Tensor],
          saliency: torch.Tensor, metric: Optional[torch.Tensor], keep: int, task_ratio: Union[float, str],
          merge: bool, text_reduce: str, text_budget: Optional[int] = None):
    """(tokens, indices, assignment, task_scores, task_keep) from checked inputs
    (``validation.check_inputs``), contract steps 0-5."""
    _check_kernel_dtypes(hidden=hidden, attn=attn, text=text, saliency=saliency, metric=metric)
    selection.check_tokens(hidden.shape[1])  # before the first launch (contract, "Errors")
    # contract step 0 runs in PyTorch on the device (no host sync): one shared rule, exact agreement
    text, text_mask = reference.budget_text(attn, text, text_mask, text_budget)
    k_task = None if task_ratio == AUTO else split_budget(keep, task_ratio)[1]
    # exact ties (contract, "Exact ties"): twins' scores and merge targets as the reference settles them
    scores = reference.tie_exact(similarity.task_scores(attn, text, text_mask, text_reduce), attn)
    metric = hidden if metric is None else metric
    indices, assignment, task_keep = selection.select_and_assign(
        saliency, scores, text_mask, metric, keep, k_task, merge, auto_split=auto_split(),
    )
    if merge:
        kept = reference.output_positions(indices, assignment.shape[1])
        assignment = torch.where(kept >= 0, kept, reference.settle_twins(assignment, indices, metric))
    tokens = merge_kernels.merge_tokens(hidden, indices, assignment, merge)
    return tokens, indices, assignment, scores, task_keep


def prune_backward(grad_tokens: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    _check_kernel_dtypes(grad_tokens=grad_tokens)
    return merge_kernels.unmerge_grad(grad_tokens, assignment)
