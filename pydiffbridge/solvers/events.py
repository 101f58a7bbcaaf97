"""Terminal events: detect a sign change of ``event_fn(t, y)`` over an accepted step, locate
the root on the step's dense output, and make the event time differentiable.

The root is found without gradients (Illinois regula falsi on the interpolant; bisection on
the sign where the step ends exactly on a zero, which also finds where a piecewise event
function such as ``zeros_like(t)`` past a terminal time switches on).  The differentiable event
time is then ``t* = t_r - (g - g.detach()) / (dg/dt)`` with ``g = g(t_r, y(t_r))`` and the
slope ``dg/dt`` along the step's interpolant held constant: its value is the root ``t_r`` and
its derivative is the implicit-function-theorem derivative ``-(∂g/∂θ) / (dg/dt)``.  The state
reported at the event is the interpolant at ``t*``, so it carries ``f · dt*/dθ`` too.

The dense output is a callable ``dense(theta, detach=False)`` of the fraction
``theta = (t - t_c) / h`` of the step: the adaptive loop's Runge-Kutta interpolant
(:meth:`EventTracker.check`) or the linear / cubic Hermite interpolant of a fixed-grid step
(:mod:`pydiffbridge.solvers.fixed_events`).  With gradients w.r.t. ``t`` (``t_first``: the
tensor ``t[0]``) every time is ``t_first + (t - t0)``, so the event time moves with ``t[0]``.

As torchdiffeq (which differentiates the event function with ``torch.autograd.functional.vjp``)
``event_fn`` gets a ``t`` (and a state) through which autograd works: both require grad, it
runs with grad mode on, and an output that depends on neither is fine (its derivative is 0).
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import SolverError
from .interp import dop853_extra_stages, dop853_weights, interp_weights

__all__ = ["EventTracker", "call_event"]

_SCALAR_WARNING = "Converting a tensor with requires_grad=True to a scalar"


def call_event(fn, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``fn(t, y).reshape(-1)`` with autograd working through ``t`` and ``y`` inside ``fn``.

    An argument that does not require grad is handed as a detached leaf that does; the output
    keeps its graph only where grad mode is on and it depends on something besides those
    private leaves (parameters, or the caller's ``t``/``y``)."""
    grad_on = torch.is_grad_enabled()
    private = []
    if not t.requires_grad:
        t = t.detach().requires_grad_(True)
        private.append(t)
    if not y.requires_grad:
        y = y.detach().requires_grad_(True)
        private.append(y)
    with torch.enable_grad():
        if private:  # float(t) in fn would warn about our private leaves on every call
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SCALAR_WARNING)
                out = fn(t, y)
        else:
            out = fn(t, y)
    out = torch.as_tensor(out).reshape(-1)
    if not grad_on or (len(private) == 2 and not _reaches_beyond(out, private)):
        out = out.detach()
    return out


def _reaches_beyond(out: torch.Tensor, private: list[torch.Tensor]) -> bool:
    """Whether ``out``'s graph reaches a leaf other than ``private`` (one walk of the event
    function's own graph: the caller's inputs are the private leaves)."""
    if not out.requires_grad:
        return False
    if out.grad_fn is None:
        return all(out is not p for p in private)
    mine = {id(p) for p in private}
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in mine:
            return True
        todo.extend(nxt for nxt, _ in node.next_functions)
    return False


class EventTracker:
    def __init__(self, event_fn, tdtype, device, t0: float, y0: torch.Tensor, t_first=None):
        self.fn = event_fn
        self.tdtype = tdtype
        self.device = device
        self.t0 = t0
        self.t_first = t_first  # t[0] as a tensor when gradients w.r.t. t flow, else None
        with torch.no_grad():
            self.g0 = self._g(t0, y0.detach())

    def _time(self, t: float) -> torch.Tensor:
        """The time ``t`` as a tensor: ``t_first + (t - t0)`` with gradients w.r.t. ``t``."""
        if self.t_first is not None and torch.is_grad_enabled():
            return self.t_first + torch.scalar_tensor(t - self.t0, dtype=self.tdtype,
                                                      device=self.device)
        return torch.tensor(t, dtype=self.tdtype, device=self.device)

    def _g(self, t: float, y: torch.Tensor) -> torch.Tensor:
        return call_event(self.fn, torch.tensor(t, dtype=self.tdtype, device=self.device), y)

    @staticmethod
    def _interp(tab, y, K, hs, theta):
        W = interp_weights(tab, theta.reshape(1).to(K.real.dtype))
        if K.is_complex():
            W = W.to(K.dtype)
        return y + hs * (W @ K)[0]

    def check(self, tc, t1, hs, y, y1, K, tab, f=None):
        """An accepted Runge-Kutta step from ``tc`` to ``t1 = tc + hs`` with stages ``K``.

        For dopri8, given ``f(t, y)`` (float ``t``), the root is located on DOP853's own
        seventh-order dense output; its three extra stages are evaluated only in a step where
        the event function changes sign (the cubic Hermite fallback is only third order)."""
        if f is not None and tab.error_kind == "dop853":
            return self.check_step(tc, t1, hs, y1, _Dop853Dense(f, tc, y, K, hs))

        def dense(theta, detach=False):
            if detach:
                return self._interp(tab, y.detach(), K.detach(), hs, theta)
            return self._interp(tab, y, K, hs, theta)

        return self.check_step(tc, t1, hs, y1, dense)

    def check_step(self, tc: float, t1: float, hs: float, y1: torch.Tensor, dense):
        """``None``, or ``(event_t, y_event)`` if ``event_fn`` crossed zero in the step from
        ``tc`` to ``t1`` (``hs = t1 - tc``) whose interpolant is ``dense``."""
        with torch.no_grad():
            g1 = self._g(t1, y1.detach())
            g0 = self.g0
            crossed = ((g0 * g1) < 0) | ((g1 == 0) & (g0 != 0))
            if not bool(crossed.any()):
                self.g0 = g1
                return None
            rdt = y1.real.dtype
            best = None
            for c in torch.nonzero(crossed).reshape(-1).tolist():
                def g_at(th: float, c: int = c) -> float:
                    theta = torch.tensor(th, dtype=rdt, device=y1.device)
                    return float(self._g(tc + th * hs, dense(theta, detach=True))[c])

                th = self._root(g_at, float(g0[c]), float(g1[c]))
                if best is None or th < best[0]:
                    best = (th, c)
        th, c = best
        t_r = tc + th * hs
        theta_r = torch.tensor(th, dtype=rdt, device=y1.device)
        if not torch.is_grad_enabled():
            return self._time(t_r), dense(theta_r)
        # differentiable event time: the root plus a frozen-slope Newton correction of value 0
        t_rt = self._time(t_r)
        y_r = dense(theta_r)
        g = call_event(self.fn, t_rt, y_r)[c]
        slope = self._slope(t_r, tc, hs, dense, c)
        if not g.requires_grad:
            return t_rt, y_r
        if slope == 0.0 or not math.isfinite(slope):
            raise SolverError(f"event at t={t_r:.6g}: the event function's time derivative along"
                              " the solution is zero or not finite there (a tangential crossing)"
                              ", so the event time is not differentiable")
        t_ev = t_rt - (g - g.detach()).to(self.tdtype) / slope
        theta = theta_r + (t_ev - t_rt).to(rdt) / hs
        return t_ev, dense(theta)

    def _slope(self, t_r: float, tc: float, hs: float, dense, c: int) -> float:
        """``d/dt g(t, y(t))`` along the interpolant at ``t_r`` (0 if ``g`` ignores both)."""
        with torch.enable_grad():
            tt = torch.tensor(t_r, dtype=self.tdtype, device=self.device).requires_grad_(True)
            yy = dense((tt - tc) / hs, detach=True)
            gg = call_event(self.fn, tt, yy)[c]
            if not gg.requires_grad:
                return 0.0
            (s,) = torch.autograd.grad(gg, tt, allow_unused=True)
        return 0.0 if s is None else float(s)

    @staticmethod
    def _root(fun, ga: float, gb: float, tol: float = 1e-13, iters: int = 200) -> float:
        """A root of ``fun`` on [0, 1] with g(0)=ga, g(1)=gb of opposite signs or gb == 0:
        Illinois regula falsi; bisection on the sign where gb == 0 (the first point where the
        sign leaves that of ``ga``, for event functions that switch to zero)."""
        a, b = 0.0, 1.0
        if gb == 0.0:
            pos = ga > 0
            while b - a > tol:
                m = 0.5 * (a + b)
                gm = fun(m)
                if gm != 0.0 and (gm > 0) == pos:
                    a = m
                else:
                    b = m
            return b
        side = 0
        c_prev = -1.0
        for _ in range(iters):
            c = (a * gb - b * ga) / (gb - ga)
            gc = fun(c)
            if gc == 0.0 or abs(b - a) < tol or abs(c - c_prev) < tol:
                return c
            c_prev = c
            if (gc > 0) == (gb > 0):
                b, gb = c, gc
                if side == -1:
                    ga /= 2
                side = -1
            else:
                a, ga = c, gc
                if side == 1:
                    gb /= 2
                side = 1
        return 0.5 * (a + b)


class _Dop853Dense:
    """``dense(theta, detach=False)`` on DOP853's dense output; the extra stages are made on
    first use, once without autograd (the root search) and once with it (the reported state)."""

    def __init__(self, f, tc, y, K, hs):
        self.f, self.tc, self.y, self.K, self.hs = f, tc, y, K, hs
        self._K = {}

    def __call__(self, theta: torch.Tensor, detach: bool = False) -> torch.Tensor:
        key = detach or not torch.is_grad_enabled()
        Kx = self._K.get(key)
        y = self.y.detach() if key else self.y
        if Kx is None:
            K = self.K.detach() if key else self.K
            if key:
                with torch.no_grad():
                    Kx = torch.cat([K, dop853_extra_stages(self.f, self.tc, y, K, self.hs)])
            else:
                Kx = torch.cat([K, dop853_extra_stages(self.f, self.tc, y, K, self.hs)])
            self._K[key] = Kx
        W = dop853_weights(theta.reshape(1).to(Kx.real.dtype))
        if Kx.is_complex():
            W = W.to(Kx.dtype)
        return y + self.hs * (W @ Kx)[0]
