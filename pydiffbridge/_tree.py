"""Flatten and restore tensor-or-tuple states: the only place that does it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._validate import check_tolerance
from .errors import InputError, RHSError

__all__ = ["Tree"]


@dataclass(frozen=True)
class Tree:
    """The structure of a state: one tensor, or a tuple of tensors of one dtype and device."""

    is_tuple: bool
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def of(y0, name: str = "y0") -> Tree:
        if isinstance(y0, torch.Tensor):
            return Tree(False, (y0.shape,), y0.dtype, y0.device)
        if isinstance(y0, (tuple, list)) and len(y0) > 0 and all(
                isinstance(v, torch.Tensor) for v in y0):
            dtypes = {v.dtype for v in y0}
            devices = {v.device for v in y0}
            if len(dtypes) > 1:
                raise InputError(f"{name}: the tensors of a tuple state must share one dtype, got "
                                 f"{sorted(map(str, dtypes))}; cast them with .to(dtype)")
            if len(devices) > 1:
                raise InputError(f"{name}: the tensors of a tuple state must be on one device, "
                                 f"got {sorted(map(str, devices))}")
            return Tree(True, tuple(v.shape for v in y0), y0[0].dtype, y0[0].device)
        raise InputError(f"{name} must be a torch.Tensor or a non-empty tuple of tensors, got "
                         f"{type(y0).__name__}")

    def flatten(self, y) -> torch.Tensor:
        if not self.is_tuple:
            return y.reshape(-1)
        return torch.cat([v.reshape(-1) for v in y])

    def unflatten(self, flat: torch.Tensor, lead: tuple[int, ...] = ()):
        """Inverse of :meth:`flatten`; ``lead`` keeps leading dimensions (e.g. time)."""
        if not self.is_tuple:
            return flat.reshape((*lead, *self.shapes[0]))
        parts = torch.split(flat, self.sizes, dim=len(lead))
        return tuple(p.reshape((*lead, *s)) for p, s in zip(parts, self.shapes, strict=True))

    def flat_values(self, v, name: str) -> torch.Tensor | float:
        """Per-component ``rtol``/``atol``: a number, or tensors broadcastable to the state;
        checked (finite, ``>= 0``, no grad) by :func:`pydiffbridge._validate.check_tolerance`."""
        check_tolerance(v, name)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(v)
        items = v if (self.is_tuple and isinstance(v, (tuple, list))) else None
        if self.is_tuple and items is None:
            raise InputError(f"{name}: for a tuple state give a number or a tuple of tensors, one "
                             "per state tensor")
        items = items if items is not None else (v,)
        if len(items) != len(self.shapes):
            raise InputError(f"{name}: got {len(items)} entries for a state of {len(self.shapes)}"
                             " tensors")
        parts = []
        for i, (x, shape) in enumerate(zip(items, self.shapes, strict=True)):
            x = torch.as_tensor(x, dtype=self.dtype if not self.dtype.is_complex else None,
                                device=self.device)
            x = x.real if x.is_complex() else x
            try:
                parts.append(x.broadcast_to(shape).reshape(-1))
            except RuntimeError as exc:
                raise InputError(f"{name}[{i}] of shape {tuple(x.shape)} does not broadcast to the "
                                 f"state's shape {tuple(shape)}") from exc
        return torch.cat(parts)

    def wrap_func(self, func: Callable, where: str = "func") -> Callable:
        """``func(t, y_user) -> dy_user`` as a flat ``(t, y_flat) -> dy_flat`` with checks.

        As in torchdiffeq, ``func`` receives ``t`` in the state's (real) dtype and a floating
        result of another dtype is cast to the state's.  The flat function carries the user's
        callbacks and perturb support as ``.hooks`` (see :mod:`pydiffbridge.solvers.hooks`)
        and takes ``perturb=`` (forwarded only to a ``func`` that names it).
        """
        from .solvers.hooks import accepts_perturb, adapt_callbacks, find_callbacks

        tree = self
        tdt = self.dtype.to_real() if self.dtype.is_complex else self.dtype
        takes_perturb = accepts_perturb(func)
        if not self.is_tuple:
            shape, dtype = self.shapes[0], self.dtype
            # reshape(*ints) is about twice as fast as reshape(torch.Size) (a call per NFE)
            dims = tuple(int(d) for d in shape) or ((),)

            def flat_func_tensor(t, y, perturb=None):
                if t.dtype != tdt:
                    t = t.to(tdt)
                out = (func(t, y.reshape(*dims)) if perturb is None or not takes_perturb
                       else func(t, y.reshape(*dims), perturb=perturb))
                # fast path for the common case; anything else gets the full check (and error)
                if type(out) is torch.Tensor and out.shape == shape and out.dtype == dtype:
                    return out.reshape(-1)
                return tree.check_output(out, where, t)

            flat = flat_func_tensor
            if not takes_perturb:
                # for the no-autograd loop that calls func on views of its own buffers
                flat.shaped = (func, shape, dtype,
                               lambda out, t: tree.check_output(out, where, t))
        else:
            def flat_func(t, y, perturb=None):
                if t.dtype != tdt:
                    t = t.to(tdt)
                out = (func(t, tree.unflatten(y)) if perturb is None or not takes_perturb
                       else func(t, tree.unflatten(y), perturb=perturb))
                return tree.check_output(out, where, t)

            flat = flat_func
        flat.hooks = adapt_callbacks(find_callbacks(func), self.unflatten, tdt, self.device,
                                     perturb=True)
        flat.user_func = func
        return flat

    def check_output(self, out, where: str, t) -> torch.Tensor:
        if self.is_tuple:
            if not isinstance(out, (tuple, list)) or len(out) != len(self.shapes):
                raise RHSError(f"{where} returned {type(out).__name__} at t={float(t):.6g}; for a "
                               f"tuple state of {len(self.shapes)} tensors it must return a tuple"
                               " of as many tensors")
            items = out
        else:
            if not isinstance(out, torch.Tensor):
                raise RHSError(f"{where} returned {type(out).__name__} at t={float(t):.6g}; it "
                               "must return a torch.Tensor")
            items = (out,)
        cast = False
        for i, (o, shape) in enumerate(zip(items, self.shapes, strict=True)):
            if not isinstance(o, torch.Tensor) or o.shape != shape:
                got = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                raise RHSError(f"{where} returned shape {got} (component {i}) at t={float(t):.6g}"
                               f" but the state has shape {tuple(shape)}; dy/dt must have the "
                               "state's shape")
            if o.dtype != self.dtype:
                if not (o.dtype.is_floating_point or o.dtype.is_complex) or (
                        o.dtype.is_complex and not self.dtype.is_complex):
                    raise RHSError(f"{where} returned dtype {o.dtype} at t={float(t):.6g} but the"
                                   f" state is {self.dtype}; return a floating-point tensor")
                cast = True
        if cast:  # torchdiffeq's rule: the state's dtype wins
            items = tuple(o.to(self.dtype) for o in items)
            out = items if self.is_tuple else items[0]
        return self.flatten(out)
