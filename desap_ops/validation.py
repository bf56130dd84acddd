"""Input checks shared by every entry point.

They read only metadata (shape, dtype, device) and scalars, so they never synchronise with a device,
and they run unchanged on fake tensors and symbolic sizes inside ``torch.compile`` (dynamic shapes
included). The rules are the contract's (docs/contract.md, "Inputs" and "Errors"); what the steps
mean (``AUTO`` among them) is the reference's, so this module imports the reference and never the
reverse.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from .reference import AUTO

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TEXT_REDUCTIONS = ("max", "mean")
BACKENDS = ("auto", "triton", "reference")


class CheckedOptions(NamedTuple):
    """The scalar options of one call, checked and normalised by :func:`check_inputs`. The field
    names are the keyword arguments of ``reference.prune`` and ``triton_backend.prune``."""

    keep: int                       # K, in [1, N] (a SymInt under torch.compile stays one)
    task_ratio: Union[float, str]   # rho in [0, 1], or AUTO (the op's None comes back as AUTO)
    merge: bool
    text_reduce: str                # one of TEXT_REDUCTIONS
    text_budget: Optional[int]      # M >= 1, or None for every text token


def _check_tensor(name: str, value, rank: int, shape_hint: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(value).__name__}")
    if value.dim() != rank:
        raise ValueError(
            f"{name} must have {rank} dimensions {shape_hint}, got shape {tuple(value.shape)}"
        )


def _check_float(name: str, value: torch.Tensor) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {value.dtype}"
        )


def _check_dim(name: str, dim: int, got, expected, what: str) -> None:
    if got != expected:
        raise ValueError(f"{name}.shape[{dim}] ({what}) must be {expected}, got {got}")


def check_inputs(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    text: torch.Tensor,
    text_mask: Optional[torch.Tensor],
    saliency: torch.Tensor,
    metric: Optional[torch.Tensor],
    keep: int,
    task_ratio: float,
    merge: bool,
    text_reduce: str,
    text_budget: Optional[int] = None,
) -> CheckedOptions:
    """Raise ``TypeError``/``ValueError`` naming the bad argument (contract, "Errors"); return the
    normalised scalar options."""
    _check_tensor("hidden", hidden, 3, "(B, N, D)")
    _check_float("hidden", hidden)
    batch, tokens = hidden.shape[0], hidden.shape[1]
    if tokens < 1:
        raise ValueError(f"hidden must hold at least one visual token (N >= 1), got shape {tuple(hidden.shape)}")

    _check_tensor("attn", attn, 3, "(B, N, C)")
    _check_float("attn", attn)
    _check_dim("attn", 0, attn.shape[0], batch, "batch B, as in hidden")
    _check_dim("attn", 1, attn.shape[1], tokens, "visual tokens N, as in hidden")

    _check_tensor("text", text, 3, "(B, L, C)")
    _check_float("text", text)
    _check_dim("text", 0, text.shape[0], batch, "batch B, as in hidden")
    _check_dim("text", 2, text.shape[2], attn.shape[2], "text-space width C, as in attn")
    if text.shape[1] < 1:
        raise ValueError(
            "text must hold at least one token (L >= 1), got L = 0; "
            "to prune on saliency alone pass text_mask with every entry False"
        )

    if text_mask is not None:
        _check_tensor("text_mask", text_mask, 2, "(B, L)")
        if text_mask.dtype != torch.bool:
            raise TypeError(f"text_mask must be a bool tensor (True = valid token), got {text_mask.dtype}")
        if tuple(text_mask.shape) != (batch, text.shape[1]):
            raise ValueError(
                f"text_mask must have shape (B, L) = {(batch, text.shape[1])}, got {tuple(text_mask.shape)}"
            )

    _check_tensor("saliency", saliency, 2, "(B, N)")
    _check_float("saliency", saliency)
    if tuple(saliency.shape) != (batch, tokens):
        raise ValueError(f"saliency must have shape (B, N) = {(batch, tokens)}, got {tuple(saliency.shape)}")

    if metric is not None:
        _check_tensor("metric", metric, 3, "(B, N, E)")
        _check_float("metric", metric)
        _check_dim("metric", 0, metric.shape[0], batch, "batch B, as in hidden")
        _check_dim("metric", 1, metric.shape[1], tokens, "visual tokens N, as in hidden")

    device = hidden.device
    for name, value in (("attn", attn), ("text", text), ("text_mask", text_mask),
                        ("saliency", saliency), ("metric", metric)):
        if value is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {device}; all tensors must share one device")

    return CheckedOptions(*check_options(keep, task_ratio, merge, text_reduce, tokens=tokens),
                        check_text_budget(text_budget))


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def _as_integer(name: str, value):
    """``value`` as an int (a SymInt under torch.compile stays one): what ``operator.index`` takes
    (int, NumPy integer, one-element integer tensor), never a bool."""
    if _is_bool(value):
        raise TypeError(f"{name} must be an integer, got a bool ({value!r})")
    if isinstance(value, (int, torch.SymInt)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer (int, NumPy integer or integer tensor), "
                        f"got {type(value).__name__}") from None


def check_keep(keep, tokens: Optional[int] = None) -> int:
    """``keep`` as an int, in [1, tokens] when ``tokens`` is given. Comparisons on a SymInt become
    guards, so this stays traceable."""
    keep = _as_integer("keep", keep)
    if keep < 1 or (tokens is not None and keep > tokens):
        bound = f"[1, N] = [1, {tokens}]" if tokens is not None else "[1, N]"
        raise ValueError(f"keep must lie in {bound}, got {keep}")
    return keep


def check_text_budget(text_budget) -> Optional[int]:
    """None, or an integer M >= 1: the most text tokens per image that take part (contract, step 0)."""
    if text_budget is None:
        return None
    text_budget = _as_integer("text_budget", text_budget)
    if text_budget < 1:
        raise ValueError(f"text_budget must be at least 1 (or None for every text token), got {text_budget}")
    return text_budget


def check_task_ratio(task_ratio) -> Union[float, str]:
    """``task_ratio`` as a float (or a SymFloat under torch.compile) in [0, 1], or "auto" (None,
    which the registered op's schema uses for "auto", means "auto" too).

    Takes any real number PyTorch would (float, int, NumPy scalar, one-element tensor), never a
    bool or a string. NaN is found with ``x != x``, which a traced value supports (math.isnan does
    not).
    """
    if task_ratio is None or (isinstance(task_ratio, str) and task_ratio == AUTO):
        return AUTO
    if _is_bool(task_ratio) or isinstance(task_ratio, (str, bytes)):
        raise TypeError(f"task_ratio must be a real number or 'auto', got {type(task_ratio).__name__} "
                        f"{task_ratio!r}")
    if not isinstance(task_ratio, (float, torch.SymFloat)):
        if isinstance(task_ratio, torch.Tensor) and (task_ratio.numel() != 1 or task_ratio.is_complex()):
            raise TypeError(f"task_ratio must be a real number or 'auto', got a tensor of shape {tuple(task_ratio.shape)}")
        try:
            task_ratio = float(task_ratio)
        except (TypeError, ValueError):
            raise TypeError(f"task_ratio must be a real number or 'auto', got {type(task_ratio).__name__}") from None
    if task_ratio != task_ratio or task_ratio < 0.0 or task_ratio > 1.0:
        raise ValueError(f"task_ratio must lie in [0, 1], got {task_ratio}")
    return task_ratio


def check_merge(merge) -> bool:
    """``merge`` as a bool: a bool, or an integer 0 or 1 (as the registered op's schema takes it)."""
    if isinstance(merge, (bool, np.bool_)):
        return bool(merge)
    if isinstance(merge, (int, np.integer)) and merge in (0, 1):
        return bool(merge)
    raise TypeError(f"merge must be a bool (or 0 or 1), got {type(merge).__name__} {merge!r}")


def check_options(keep, task_ratio, merge, text_reduce,
                  tokens: Optional[int] = None) -> tuple[int, Union[float, str], bool, str]:
    """The scalar options, checked and normalised: (keep, task_ratio, merge, text_reduce)."""
    keep = check_keep(keep, tokens)
    task_ratio = check_task_ratio(task_ratio)
    merge = check_merge(merge)
    if text_reduce not in TEXT_REDUCTIONS:
        raise ValueError(f"text_reduce must be one of {TEXT_REDUCTIONS}, got {text_reduce!r}")
    return keep, task_ratio, merge, text_reduce


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend
