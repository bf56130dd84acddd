"""Running a method, whatever its kind: a selecting method's indices checked, then its dropped
tokens merged (or not) exactly as DeSAP's are (the contract's step 4, from the reference); a
pruning method's whole result checked. Every failure is a :class:`MethodFailure` naming the method."""
from __future__ import annotations

import torch

from .. import reference
from ..reference import PruneResult
from .interface import Method, MethodFailure, MethodInputs, Selection


def run_method(method: Method, inputs: MethodInputs, merge: bool) -> PruneResult:
    """``method`` on ``inputs``: the kept tokens (B, K, D), merged when ``merge``. A selecting
    method records no task scores (``task_scores`` and ``task_keep`` None). A method that raises
    or gives back a wrong result raises :class:`MethodFailure` naming it, but for a prune method
    made with ``checked=False`` (DeSAP), which runs as it is."""
    if method.prune is not None:
        if not method.checked:
            return method.prune(inputs, merge)
        return check_prune_result(method.name, _call(method, method.prune, inputs, merge), inputs, merge)
    hidden = inputs.hidden
    with torch.no_grad():
        chosen = _call(method, method.select, inputs)
    indices, assignment = check_selection(method.name, chosen, hidden.shape[0], hidden.shape[1], inputs.keep,
                                          hidden.device)
    if assignment is None or not merge:
        assignment = reference.assign_tokens(indices, hidden.detach(), merge)
    tokens = reference.merge_tokens(hidden, indices, assignment, merge)
    return PruneResult(tokens, indices, assignment, task_scores=None, task_keep=None)


def _call(method: Method, fn, *args):
    """``fn(*args)``, what it raises as a MethodFailure naming ``method``."""
    try:
        return fn(*args)
    except Exception as error:
        raise MethodFailure(f"pruning method {method.name!r} raised {error!r}") from error


def check_prune_result(name: str, result, inputs: MethodInputs, merge: bool) -> PruneResult:
    """A prune method's ``result`` with its indices and assignment as int64, or a MethodFailure that
    names the method and what is wrong: tokens (B, K, D) of ``hidden``'s dtype, indices as a
    selection's, an assignment (B, N) sending each kept token to its own position and every dropped
    one into [0, K) when merging, to -1 when not; task scores None or (B, N), task_keep None or (B,)."""
    def fail(what: str):
        return MethodFailure(f"pruning method {name!r} returned {what}")

    hidden = inputs.hidden
    batch, tokens, width = hidden.shape
    keep = inputs.keep
    if not isinstance(result, PruneResult):
        raise fail(f"{type(result).__name__}, not a PruneResult")
    if not isinstance(result.tokens, torch.Tensor) or tuple(result.tokens.shape) != (batch, keep, width):
        raise fail(f"tokens that are not a (B, K, D) = {(batch, keep, width)} tensor")
    if result.tokens.dtype != hidden.dtype:
        raise fail(f"tokens of dtype {result.tokens.dtype}; they must be hidden's, {hidden.dtype}")
    indices, _ = check_selection(name, result.indices, batch, tokens, keep, hidden.device)
    assignment = result.assignment
    if not isinstance(assignment, torch.Tensor) or tuple(assignment.shape) != (batch, tokens) or \
            assignment.dtype not in (torch.int64, torch.int32):
        raise fail(f"an assignment that is not a ({batch}, {tokens}) int64 (or int32) tensor")
    assignment = assignment.to(device=hidden.device, dtype=torch.int64)
    own = torch.arange(keep, device=hidden.device).expand(batch, keep)
    kept = torch.zeros(batch, tokens, dtype=torch.bool, device=hidden.device).scatter_(1, indices, True)
    dropped_ok = ((assignment >= 0) & (assignment < keep)) if merge else (assignment == -1)
    if not torch.equal(assignment.gather(1, indices), own) or not bool((dropped_ok | kept).all()):
        where = f"into [0, {keep})" if merge else "to -1 (merge=False)"
        raise fail(f"an assignment that does not send each kept token to its own position and every dropped "
                   f"token {where}")
    for field, shape in (("task_scores", (batch, tokens)), ("task_keep", (batch,))):
        value = getattr(result, field)
        if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != shape):
            raise fail(f"{field} that are neither None nor a {shape} tensor")
    return result._replace(indices=indices, assignment=assignment)


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
