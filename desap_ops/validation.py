"""Input checks shared by every entry point.

They read only metadata (shape, dtype, device), so they never synchronise with a device and they
run unchanged on fake tensors inside ``torch.compile``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TEXT_REDUCTIONS = ("max", "mean")
BACKENDS = ("auto", "triton", "reference")


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
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad argument; return None when all is well."""
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

    check_options(keep, task_ratio, merge, text_reduce, tokens=tokens)


def check_keep(keep, tokens=None) -> int:
    """``keep`` as an int, in [1, tokens] when ``tokens`` is given."""
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int, got {type(keep).__name__}")
    if keep < 1 or (tokens is not None and keep > tokens):
        bound = f"[1, N] = [1, {tokens}]" if tokens is not None else "[1, N]"
        raise ValueError(f"keep must lie in {bound}, got {keep}")
    return keep


def check_task_ratio(task_ratio) -> float:
    if isinstance(task_ratio, bool) or not isinstance(task_ratio, (int, float)):
        raise TypeError(f"task_ratio must be a float, got {type(task_ratio).__name__}")
    if math.isnan(task_ratio) or not 0.0 <= task_ratio <= 1.0:
        raise ValueError(f"task_ratio must lie in [0, 1], got {task_ratio}")
    return float(task_ratio)


def check_options(keep, task_ratio, merge, text_reduce, tokens=None) -> tuple[int, float, bool, str]:
    """The scalar options of the operator, checked; returned as (keep, task_ratio, merge, text_reduce)."""
    keep = check_keep(keep, tokens)
    task_ratio = check_task_ratio(task_ratio)
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be a bool, got {type(merge).__name__}")
    if text_reduce not in TEXT_REDUCTIONS:
        raise ValueError(f"text_reduce must be one of {TEXT_REDUCTIONS}, got {text_reduce!r}")
    return keep, task_ratio, merge, text_reduce


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def split_budget(keep: int, task_ratio: float) -> tuple[int, int]:
    """SPEC step 2: K_task = floor(rho * K + 0.5), K_sal = K - K_task."""
    k_task = int(math.floor(float(task_ratio) * keep + 0.5))
    return keep - k_task, k_task
