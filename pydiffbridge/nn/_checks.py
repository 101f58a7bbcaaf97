"""Argument checks shared by the ``pydiffbridge.nn`` modules (each raises
:class:`~pydiffbridge.errors.InputError` naming the argument, what it got and what is needed)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .timeseries import IrregularBatch, check_batch_shapes

__all__ = ["check_size", "check_positive", "check_nonneg", "check_obs", "check_t_end",
           "check_query_mask"]


def check_size(value: Any, what: str, low: int = 1) -> int:
    """``value`` as an ``int >= low`` (an integral number, not a bool), else InputError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if (not isinstance(value, bool) and isinstance(value, numbers.Real)
                and float(value).is_integer()):
            value = int(value)
        else:
            raise InputError(f"{what}: expected an integer >= {low}, got {value!r} "
                             f"({type(value).__name__}).")
    if int(value) < low:
        raise InputError(f"{what}: must be >= {low}, got {value}.")
    return int(value)


def _real(value: Any, what: str, need: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{what}: expected a number {need}, got {value!r} "
                         f"({type(value).__name__}).")
    f = float(value)
    if not math.isfinite(f):
        raise InputError(f"{what}: expected a finite number {need}, got {value!r}.")
    return f


def check_positive(value: Any, what: str) -> float:
    """``value`` as a finite ``float > 0``, else InputError."""
    f = _real(value, what, "> 0")
    if f <= 0:
        raise InputError(f"{what}: must be > 0, got {value!r}.")
    return f


def check_nonneg(value: Any, what: str) -> float:
    """``value`` as a finite ``float >= 0``, else InputError."""
    f = _real(value, what, ">= 0")
    if f < 0:
        raise InputError(f"{what}: must be >= 0, got {value!r}.")
    return f


def check_obs(batch: Any, where: str, input_dim: int, name: str = "obs") -> None:
    """Shapes (``times [N]``, ``values``/``mask [B, N, input_dim]``) and increasing times."""
    if not isinstance(batch, IrregularBatch):
        raise InputError(f"{where}: {name} must be an IrregularBatch (see collate), got "
                         f"{type(batch).__name__}.")
    check_batch_shapes(batch, f"{where}: {name}")
    if batch.values.shape[-1] != input_dim:
        raise InputError(f"{where}: {name} has {batch.values.shape[-1]} channels (values "
                         f"{tuple(batch.values.shape)}), the model was built for "
                         f"input_dim={input_dim}.")
    t = batch.times
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise InputError(f"{where}: {name}.times must be strictly increasing (the union grid "
                         "of collate); sort the times and reorder values and mask alike.")


def check_t_end(t_end: float | Tensor, like: Tensor, where: str) -> Tensor:
    te = torch.as_tensor(t_end, dtype=like.dtype, device=like.device)
    if te.dim() > 1 or (te.dim() == 1 and te.shape[0] != like.shape[0]):
        raise InputError(f"{where}: t_end must be a number or a [B] = [{like.shape[0]}] tensor, "
                         f"got shape {tuple(te.shape)}.")
    return te


def check_query_mask(mask: Tensor | None, B: int, times: Tensor, D: int, where: str) -> None:
    if times.dim() != 1:
        raise InputError(f"{where}: times must be 1-D [N], got shape {tuple(times.shape)}.")
    N = times.shape[0]
    if mask is not None and tuple(mask.shape) not in ((B, N), (B, N, D)):
        raise InputError(f"{where}: mask must be [B, len(times)] = {(B, N)} or [B, len(times), "
                         f"D] = {(B, N, D)}, got {tuple(mask.shape)}.")
