"""Running a method: DeSAP as the operator itself; any other method's selection checked, then its
dropped tokens merged (or not) exactly as DeSAP's are (the contract's step 4, from the reference)."""
from __future__ import annotations

import torch

from .. import reference
from ..api import prune
from ..reference import PruneResult
from .interface import DEFAULT_METHOD, Method, MethodFailure, MethodInputs, Selection


def run_method(method: Method, inputs: MethodInputs, merge: bool) -> PruneResult:
    """``method`` on ``inputs``: the kept tokens (B, K, D), merged when ``merge``. Every method but
    DeSAP gives zero task scores and task_keep. A method that raises or gives back a wrong
    selection raises :class:`MethodFailure` naming it."""
    if method.name == DEFAULT_METHOD:
        return prune(inputs.hidden, inputs.attn, inputs.text.to(inputs.attn.dtype), inputs.saliency, inputs.keep,
                     text_mask=inputs.text_mask, task_ratio=inputs.task_ratio, merge=merge,
                     text_reduce=inputs.text_reduce, backend=inputs.backend, text_budget=inputs.text_budget)
    hidden = inputs.hidden
    try:
        with torch.no_grad():
            chosen = method.select(inputs)
    except Exception as error:
        raise MethodFailure(f"pruning method {method.name!r} raised {error!r}") from error
    indices, assignment = check_selection(method.name, chosen, hidden.shape[0], hidden.shape[1], inputs.keep,
                                          hidden.device)
    if assignment is None or not merge:
        assignment = reference.assign_tokens(indices, hidden.detach(), merge)
    tokens = reference.merge_tokens(hidden, indices, assignment, merge)
    batch, count = hidden.shape[:2]
    return PruneResult(tokens, indices, assignment, torch.zeros(batch, count, device=hidden.device),
                       torch.zeros(batch, dtype=torch.long, device=hidden.device))


def check_selection(name: str, chosen, batch: int, tokens: int, keep: int, device):
    """(indices, assignment or None) of a method's result, or a MethodFailure that names the method
    and what is wrong."""
    def fail(what: str):
        return MethodFailure(f"pruning method {name!r} returned {what}")

    indices, assignment = chosen if isinstance(chosen, Selection) else (chosen, None)
    if not isinstance(indices, torch.Tensor):
        raise fail(f"{type(indices).__name__}, not a tensor of indices (or a Selection)")
    if indices.dtype not in (torch.int64, torch.int32):
        raise fail(f"indices of dtype {indices.dtype}; they must be int64 (or int32)")
    if tuple(indices.shape) != (batch, keep):
        raise fail(f"indices of shape {tuple(indices.shape)}; expected (images, keep) = {(batch, keep)}")
    indices = indices.to(device=device, dtype=torch.int64)
    if keep and bool(((indices < 0) | (indices >= tokens)).any()):
        raise fail(f"indices outside [0, {tokens})")
    if keep > 1 and not bool((indices[:, 1:] > indices[:, :-1]).all()):
        raise fail("indices that are not strictly ascending (sorted and distinct)")
    if assignment is None:
        return indices, None
    if not isinstance(assignment, torch.Tensor) or tuple(assignment.shape) != (batch, tokens):
        raise fail(f"an assignment that is not a ({batch}, {tokens}) tensor")
    if assignment.dtype not in (torch.int64, torch.int32):
        raise fail(f"an assignment of dtype {assignment.dtype}; it must be int64 (or int32)")
    assignment = assignment.to(device=device, dtype=torch.int64)
    own = torch.arange(keep, device=device).expand(batch, keep)
    if bool(((assignment < 0) | (assignment >= keep)).any()) or not torch.equal(assignment.gather(1, indices), own):
        raise fail("an assignment that does not send each kept token to its own position and every "
                   f"token to one in [0, {keep})")
    return indices, assignment
