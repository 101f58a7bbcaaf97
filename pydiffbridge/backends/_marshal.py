"""torch <-> numpy marshalling for the external engines (SciPy, Julia): the only place that
does it.

* :func:`to_numpy` gives a numpy *view* of a CPU tensor (no copy, strides kept, so
  non-contiguous tensors stay views too); other devices and dtypes numpy lacks (bfloat16)
  are copied.
* :func:`to_torch` wraps a numpy array as a tensor of the wanted dtype/device, without a copy
  when the array already has them.
* :class:`NumpyRHS` turns the flat torch right-hand side ``func(t, y) -> dy`` into the
  ``fun(t, y_ndarray) -> ndarray`` an engine calls, counting evaluations and noting
  non-finite values.  Tuple states are flattened by the API before they reach a backend
  (:class:`pydiffbridge._tree.Tree`), so the engines only ever see one flat vector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["to_numpy", "to_torch", "engine_dtype", "tol_to_numpy", "NumpyRHS", "MaxCallsReached"]

_NO_NUMPY = {torch.bfloat16}


def engine_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype an engine integrates in for a state of ``dtype``: float64, or
    complex128 for complex states (SciPy and OrdinaryDiffEq work best in double)."""
    return np.dtype(np.complex128) if dtype.is_complex else np.dtype(np.float64)


def to_numpy(x: torch.Tensor, dtype: np.dtype | None = None) -> np.ndarray:
    """A numpy array with ``x``'s values; a view sharing memory when ``x`` is on the CPU and
    already has ``dtype`` (or ``dtype`` is None)."""
    x = x.detach()
    if x.is_conj():
        x = x.resolve_conj()
    if x.device.type != "cpu" or x.dtype in _NO_NUMPY:
        x = x.to("cpu", torch.float32 if x.dtype in _NO_NUMPY else x.dtype)
    a = x.numpy()
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return a


def to_torch(a: Any, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of ``dtype`` on ``device`` with the values of ``a``; shares memory with ``a``
    when ``a`` is a writable numpy array that already has them (CPU)."""
    arr = np.asarray(a)
    if not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr) if arr.dtype != object else torch.as_tensor(arr.tolist())
    if dtype.is_complex is False and t.is_complex():
        t = t.real
    return t.to(device=device, dtype=dtype)


def tol_to_numpy(tol: Any) -> float | np.ndarray:
    """``rtol``/``atol`` as the engines take them: a float or a float64 vector."""
    if isinstance(tol, torch.Tensor):
        return to_numpy(tol, np.dtype(np.float64)) if tol.numel() > 1 else float(tol)
    return float(tol)


class MaxCallsReached(Exception):
    """Raised inside an engine's callback to stop a solve that exceeded its budget."""


class NumpyRHS:
    """``fun(t, y) -> dy`` over numpy arrays, calling a flat torch ``func`` under ``no_grad``.

    Args:
        func: the flat torch right-hand side ``func(t_tensor, y_flat) -> dy_flat``.
        dtype, device: of the torch state (restored before each call).
        t_dtype: dtype of the time tensor handed to ``func``.
        max_calls: raise :class:`MaxCallsReached` after this many calls (``None``: no limit).
        grad: call ``func`` with autograd enabled (for right-hand sides that need it
            themselves, e.g. an adjoint's vector-Jacobian products).
    """

    def __init__(self, func: Callable, dtype: torch.dtype, device: torch.device,
                 t_dtype: torch.dtype, max_calls: int | None = None, grad: bool = False):
        self.func = func
        self.dtype = dtype
        self.device = torch.device(device)
        self.t_dtype = t_dtype
        self.out_dtype = engine_dtype(dtype)
        self.max_calls = max_calls
        self.grad = grad
        self.calls = 0
        self.nonfinite = False

    def tensor(self, y: np.ndarray) -> torch.Tensor:
        y = np.asarray(y)
        if not self.dtype.is_complex and np.iscomplexobj(y):
            y = y.real
        return to_torch(y, self.dtype, self.device)

    def __call__(self, t: float, y: np.ndarray) -> np.ndarray:
        if self.max_calls is not None and self.calls >= self.max_calls:
            raise MaxCallsReached(self.calls)
        self.calls += 1
        tt = torch.tensor(float(t) if not isinstance(t, complex) else t.real,
                          dtype=self.t_dtype, device=self.device)
        with torch.set_grad_enabled(self.grad):
            out = self.func(tt, self.tensor(y))
        res = to_numpy(out, self.out_dtype)
        if not np.isfinite(res).all():
            self.nonfinite = True
        return res
