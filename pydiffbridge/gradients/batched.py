"""The joint adjoint over a batch whose forward pass steps per sample.

The bridge (:mod:`pydiffbridge.gradients.bridge`) runs its forward solve through
:class:`_PerSampleBackend` (per-sample steps, :func:`~pydiffbridge.solvers.batched.solve_batched`)
and its backward augmented solve on the shared-step torch backend, so parameters shared by the
samples get one joint gradient at O(1) memory.  Per-sample output times are handled by solving
on a shared grid ``s = 0, 1, ..., m-1`` with each sample's time a monotonic map of ``s``
(:class:`_TimeMap`) and the right-hand side scaled by ``dt/ds``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..backends.base import SolveSpec, get_backend
from ..errors import InputError
from ..solution import Solution
from ..solvers.batched import solve_batched
from ..solvers.batched_stiff import AUTO_ONLY, BATCHED_STIFF_METHODS, solve_batched_stiff
from ..solvers.rosenbrock import STIFF_OPTIONS
from ..solvers.tableaus import TABLEAUS
from .bridge import bridge_solve
from .common import block_norm

__all__ = ["bridge_batched"]

#: the per-sample stiff options that the (shared-step) backward solve takes over
_SHARED_STIFF = STIFF_OPTIONS & {"dtype", "max_num_steps", "first_step", "min_step", "max_step",
                                 "safety", "ifactor", "dfactor"}


class _TimeMap:
    """Per-sample output times ``T`` of shape ``(B, m)`` as functions of one shared variable
    ``s``: ``t_b(k) = T[b, k]`` at the integers, C1 piecewise-cubic Hermite in between (slopes:
    harmonic means of the adjacent secants, so each ``t_b`` stays monotonic).  The joint
    adjoint integrates ``dy/ds = f(t(s), y) dt/ds`` on the shared grid ``s = 0, 1, ..., m-1``;
    C1 matters: an endpoint evaluation sees the same ``dt/ds`` from either interval."""

    def __init__(self, T: torch.Tensor):
        self.T = T.detach()
        sec = self.T[:, 1:] - self.T[:, :-1]
        inner = 2 * sec[:, 1:] * sec[:, :-1] / (sec[:, 1:] + sec[:, :-1])
        self.d = torch.cat([sec[:, :1], inner, sec[:, -1:]], 1)

    def _pieces(self, s: torch.Tensor):
        m = self.T.shape[1]
        k = torch.floor(s.detach().to(self.T.dtype)).clamp(0, m - 2).long()
        u = s.detach().to(self.T.dtype) - k
        T, d = self.T, self.d
        return T[:, k], T[:, k + 1], d[:, k], d[:, k + 1], u

    def at(self, s: torch.Tensor) -> torch.Tensor:
        """``t_b(s)`` for 1-D ``s``: shape ``(B, len(s))``; exact at the integers."""
        t0, t1, d0, d1, u = self._pieces(s)
        u2, u3 = u * u, u * u * u
        return ((2 * u3 - 3 * u2 + 1) * t0 + (u3 - 2 * u2 + u) * d0 + (3 * u2 - 2 * u3) * t1
                + (u3 - u2) * d1)

    def rate(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t_b(s), dt_b/ds)`` for a scalar ``s``: two tensors of shape ``(B,)``."""
        t0, t1, d0, d1, u = self._pieces(s.reshape(1))
        u2 = u * u
        dt = (6 * u2 - 6 * u) * (t0 - t1) + (3 * u2 - 4 * u + 1) * d0 + (3 * u2 - 2 * u) * d1
        return self.at(s.reshape(1))[:, 0], dt[:, 0]


class _PerSampleBackend:
    """Forward solves of the adjoint bridge with per-sample stepping (the Backend protocol).

    ``func`` is the bridge's flat rhs; the core calls it with each sample's own times (shape
    ``(B,)``).  Output times are the bridge's 1-D ``t``, mapped through a :class:`_TimeMap`
    for per-sample output times.  Stats and status stay per-sample tensors."""

    name = "torch"
    supports_direct_grad = True

    def __init__(self, B: int, n: int, method: str, rtol: Any, atol: Any, opts: dict,
                 parts: list[int], tdtype: torch.dtype, tmap: _TimeMap | None):
        self.B, self.n, self.method, self.rtol, self.atol = B, n, method, rtol, atol
        self.opts, self.parts, self.tdtype, self.tmap = opts, parts, tdtype, tmap

    def methods(self) -> list[str]:
        return [self.method]

    def resolve_method(self, method: str | None) -> str:
        return self.method

    def solve(self, func: Callable, y0: torch.Tensor, t: torch.Tensor, spec: Any,
              event_fn: Callable | None = None) -> Solution:
        if event_fn is not None:
            raise InputError("batch_dims does not support event_fn")
        B, n = self.B, self.n
        tb = t.detach().expand(B, -1) if self.tmap is None else self.tmap.at(t)
        fb = lambda tt, yy: func(tt, yy.reshape(-1)).reshape(B, n)  # noqa: E731
        parts = self.parts if len(self.parts) > 1 else None
        if self.method in BATCHED_STIFF_METHODS:
            sol = solve_batched_stiff(fb, y0.reshape(B, n), tb, self.method, self.rtol,
                                      self.atol, self.opts, parts, self.tdtype)
        else:
            sol = solve_batched(fb, y0.reshape(B, n), tb, TABLEAUS[self.method], self.rtol,
                                self.atol, self.opts, parts, self.tdtype)
        sol.ys = sol.ys.reshape(len(t), B * n)
        return sol


def bridge_batched(f: Callable, flat0: torch.Tensor, t: torch.Tensor, tb: torch.Tensor,
                    method: str, rtol: Any, atol: Any, opts: dict, parts: list[int],
                    tdtype: torch.dtype, params: tuple, gradient: str, adj: dict) -> Solution:
    """Per-sample forward, joint adjoint backward: the batch ``(B, n)`` is one flat state of
    the bridge, whose backward solves run on the torch backend with shared steps and an error
    norm that is the max over samples (and parts) of the per-block RMS.

    The bridge's rhs ``F(t, y)`` takes ``t`` of shape ``(B,)`` (each sample's own time, from
    the forward core) or a scalar (the backward solve): shared output times are expanded to
    the batch; per-sample output times go through a :class:`_TimeMap` (``t`` is then ``s``)."""
    from types import SimpleNamespace


    B, n = flat0.shape
    tmap = None
    if t.ndim > 1:
        if t.requires_grad:
            raise InputError("gradients w.r.t. per-sample output times are not available with "
                             "gradient='adjoint'; pass t.detach(), shared 1-D t, or use "
                             "gradient='direct'")
        tmap = _TimeMap(tb)
        t = torch.arange(tb.shape[1], dtype=tb.dtype, device=tb.device)

    def F(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        yb = y.reshape(B, n)
        if s.ndim == 1:  # each sample's own time, from the per-sample forward core
            return f(s.to(tdtype), yb).reshape(-1)
        if tmap is None:
            return f(s.to(tdtype).expand(B), yb).reshape(-1)
        tt, rate = tmap.rate(s)
        return (f(tt.to(tdtype), yb) * rate.to(yb.dtype)[:, None]).reshape(-1)

    def flat(v):
        return v.reshape(-1) if isinstance(v, torch.Tensor) else v

    norm = block_norm(parts * B, B * n)
    spec = SolveSpec(method, flat(rtol), flat(atol), opts, norm)
    aopts = dict(adj["options"] or {})
    anorm = aopts.pop("norm", None)
    be = get_backend("torch")
    base = opts
    back = be.resolve_method(adj["method"]) if adj["method"] else method
    if method in BATCHED_STIFF_METHODS:
        # the step-size settings carry over to the backward solve (and auto's switching
        # settings to a backward auto); a per-sample jac (of f, not of the augmented system)
        # and the per-sample output setting do not
        take = _SHARED_STIFF | (AUTO_ONLY if back == "auto" else frozenset())
        base = {k: v for k, v in opts.items() if k in take}
    aspec = SolveSpec(back,
                      flat(adj["rtol"] if adj["rtol"] is not None else rtol),
                      flat(adj["atol"] if adj["atol"] is not None else atol),
                      {**base, **aopts}, anorm)
    p = SimpleNamespace(y0=flat0.reshape(-1), t=t, func=F, spec=spec, event_fn=None, backend=be,
                        tree=SimpleNamespace(sizes=parts * B, is_tuple=False,
                                             shapes=(torch.Size([B * n]),),
                                             unflatten=lambda x: x))
    fwd = _PerSampleBackend(B, n, method, rtol, atol, opts, parts, tdtype, tmap)
    return bridge_solve(p, params, aspec, gradient, forward_backend=fwd)
