"""Fixed-grid solvers: explicit RK methods on a grid, Adams-Bashforth(-Moulton) methods, and the
implicit Runge-Kutta methods of :mod:`pydiffbridge.solvers.implicit`.

The grid is ``t`` itself, or ``options["step_size"]`` steps from ``t[0]`` to ``t[-1]``, or
whatever ``options["grid_constructor"](func, y0, t)`` returns.  Values at output times that fall
between grid points come from linear interpolation (the default, as in torchdiffeq) or cubic
Hermite interpolation (``interp="cubic"``).  Terminal events: :mod:`.fixed_events`.

Adams coefficients are computed for the actual (possibly non-uniform) grid by integrating the
Lagrange interpolant of past slopes exactly with Gauss-Legendre quadrature (Hairer, Norsett &
Wanner, *Solving ODEs I*, Sec. III.1 and III.5).  The first steps are taken with the 3/8-rule
RK4 so that the starting values are fourth-order accurate.

As torchdiffeq's ``FixedGridODESolver``:

* time gradients under direct backprop: the grid is made of tensors that depend on ``t``
  (``t`` itself, ``t[0] + k * step_size`` closed by ``t[-1]``, or the grid constructor's
  tensor), and every time handed to ``func``, every step size and every output fraction is
  computed from them.  Without gradients w.r.t. ``t`` times are Python floats (cheaper);
* callbacks (:mod:`.hooks`): ``func.callback_step(t0, y0, dt)`` before every step, and no
  other (torchdiffeq warns that the accept/reject callbacks are not supported on a fixed
  grid, and so do we).  ``t0`` is the grid time, ``dt`` the step's length (positive, as
  torchdiffeq's, which integrates decreasing ``t`` as increasing ``-t``);
* ``perturb=True``: ``func`` is evaluated just after the step's start (``Perturb.NEXT``) and
  just before its end (``Perturb.PREV``, the stages at ``c = 1``), through
  :func:`.hooks.call_perturbed`; the time moves by one ulp of the dtype ``func`` computes in
  (torchdiffeq moves it in the state's dtype).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ..errors import InputError
from ..solution import Solution, Stats, Status
from .hooks import Perturb, call_perturbed, hooks_of
from .implicit import IMPLICIT_METHODS, implicit_step
from .tableaus import RK4, Tableau, advance

__all__ = ["solve_fixed", "make_grid", "ADAMS", "FixedStepper", "GridTime", "hermite"]

ADAMS = ("explicit_adams", "implicit_adams", "fixed_adams")
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


def make_grid(func, y0, t: torch.Tensor, opts: dict) -> torch.Tensor:
    """The grid as a tensor; built from ``t`` so that it is differentiable in ``t``."""
    if t.numel() < 2:
        return t
    if opts.get("grid_constructor") is not None:
        grid = opts["grid_constructor"](func, y0, t)
        return torch.as_tensor(grid, dtype=t.dtype, device=t.device)
    step = opts.get("step_size")
    if step is None:
        return t
    step = abs(float(step))
    t0, t1 = t.detach()[[0, -1]].tolist()
    n = max(1, math.ceil(abs(t1 - t0) / step - 1e-9))
    direction = 1.0 if t1 >= t0 else -1.0
    k = torch.arange(n, dtype=t.dtype, device=t.device) * (direction * step)
    return torch.cat([t[:1] + k, t[-1:]])


class GridTime(NamedTuple):
    """A grid time: ``f`` its float value, ``x`` the same as a tensor with gradients w.r.t.
    ``t`` (else the float again)."""

    f: float
    x: float | torch.Tensor


def hermite(s, h, y, f0, y1, f1):
    """Cubic Hermite interpolant at fraction ``s`` of a step of length ``h``."""
    s2, s3 = s * s, s * s * s
    return ((2 * s3 - 3 * s2 + 1) * y + (s3 - 2 * s2 + s) * h * f0
            + (-2 * s3 + 3 * s2) * y1 + (s3 - s2) * h * f1)


def _adams_coeffs(nodes: list, a, b) -> list:
    """∫_a^b L_j(s) ds / (b - a) for the Lagrange basis over ``nodes`` (tensors in, tensors out
    when the times are tensors, so that the coefficients are differentiable in the grid)."""
    tensor = isinstance(a, torch.Tensor)
    if tensor:
        gx = torch.as_tensor(_GL_X, dtype=a.dtype, device=a.device)
        gw = torch.as_tensor(_GL_W, dtype=a.dtype, device=a.device)
    else:
        gx, gw = _GL_X, _GL_W
    xs = 0.5 * (b - a) * gx + 0.5 * (a + b)
    out = []
    for j, nj in enumerate(nodes):
        L = torch.ones_like(xs) if tensor else np.ones_like(xs)
        for k, nk in enumerate(nodes):
            if k != j:
                L = L * (xs - nk) / (nj - nk)
        w = 0.5 * (gw * L).sum()
        out.append(w if tensor else float(w))
    return out


class FixedStepper:
    """One fixed-grid scheme: ``step(ta, tb, y, f0) -> y1`` between two :class:`GridTime`s,
    counting evaluations in ``nfe``; ``start``/``end`` evaluate ``func`` at a step's ends."""

    def __init__(self, f: Callable, y0: torch.Tensor, method: str, tab: Tableau | None,
                 opts: dict, norm: Callable, rtol, atol, tdtype: torch.dtype):
        self.f, self.method, self.tab, self.opts = f, method, tab, opts
        self.norm, self.rtol, self.atol = norm, rtol, atol
        self.tdtype, self.dev = tdtype, y0.device
        self.nfe = 0
        self.perturb = bool(opts.get("perturb", False))
        self.hooks = hooks_of(f)
        self.implicit = method in IMPLICIT_METHODS
        self.cubic = opts.get("interp", "linear") == "cubic"
        self.max_iters = int(opts.get("max_iters", 4)) if method == "implicit_adams" else 1
        self.order = int(opts.get("max_order", 4))
        self.hist: list[tuple[GridTime, torch.Tensor]] = []
        unsupported = [n for n, cb in (("callback_accept_step", self.hooks.accept),
                                       ("callback_reject_step", self.hooks.reject))
                       if cb is not None]
        if unsupported:
            warnings.warn(f"Solver '{method}' does not support callbacks {set(unsupported)}",
                          stacklevel=4)

    # -- evaluations ----------------------------------------------------------------------
    def fc(self, tt, y):
        self.nfe += 1
        if not isinstance(tt, torch.Tensor):
            tt = torch.scalar_tensor(tt, dtype=self.tdtype, device=self.dev)
        return self.f(tt, y)

    def fp(self, at: GridTime, toward: float, flag: Perturb, y):
        """``func`` one representable time beside grid time ``at``, towards ``toward``."""
        self.nfe += 1
        tf = at.f

        def make_t(v: float) -> torch.Tensor:  # v: moved at the coarser of t's and y's dtype
            if isinstance(at.x, torch.Tensor):
                return at.x + (v - tf)  # keeps the gradient w.r.t. t
            return torch.scalar_tensor(v, dtype=self.tdtype, device=self.dev)

        return call_perturbed(self.f, tf, toward, y, flag, make_t)

    def start(self, ta: GridTime, tb: GridTime, y):
        return self.fp(ta, tb.f, Perturb.NEXT, y) if self.perturb else self.fc(ta.x, y)

    def end(self, ta: GridTime, tb: GridTime, y1):
        return self.fp(tb, ta.f, Perturb.PREV, y1) if self.perturb else self.fc(tb.x, y1)

    def callback(self, ta: GridTime, tb: GridTime, y) -> None:
        if self.hooks.step is not None:
            dt = tb.x - ta.x
            self.hooks.step(ta.x, y, -dt if tb.f < ta.f else dt)

    # -- steps ----------------------------------------------------------------------------
    def advance(self, ta: GridTime, tb: GridTime, y, f0, stats: Stats):
        """One counted step from ``ta`` to ``tb`` (the grid loop's and the event search's): the
        step callback, the first slope unless one is carried over, the step.  ``(y1, f0)``."""
        self.callback(ta, tb, y)
        if f0 is None:
            f0 = self.start(ta, tb, y)
        y1 = self.step(ta, tb, y, f0)
        stats.steps += 1
        stats.accepted += 1
        return y1, f0

    def end_slope(self, ta: GridTime, tb: GridTime, y1):
        """``f(tb, y1)`` where the cubic interpolant or the next step uses it, else ``None``."""
        if self.cubic or (self.reuses_end and (self.method in ADAMS or self.tab is None)):
            return self.end(ta, tb, y1)
        return None

    def carried(self, f1):
        """The next step's first slope: ``f1`` where the method may reuse it, else ``None``."""
        return f1 if (f1 is not None and self.reuses_end) else None

    def step(self, ta: GridTime, tb: GridTime, y, f0):
        if self.implicit:
            return self._implicit(ta, tb, y, f0)
        if self.method in ADAMS:
            return self._adams(ta, tb, y, f0)
        return self._rk(self.tab, ta, tb, y, f0)

    def _rk(self, tab: Tableau, ta: GridTime, tb: GridTime, y, f0):
        h = tb.x - ta.x
        ks = [f0]
        for i in range(1, tab.stages):
            yi = advance(y, h, tab.a[i], ks)
            if tab.c[i] == 1.0:
                ks.append(self.end(ta, tb, yi))
            else:
                ks.append(self.fc(ta.x + tab.c[i] * h, yi))
        return advance(y, h, tab.b, ks)

    def _adams(self, ta: GridTime, tb: GridTime, y, f0):
        self.hist = (self.hist + [(ta, f0)])[-self.order:]
        if len(self.hist) < self.order:
            return self._rk(RK4, ta, tb, y, f0)
        h = tb.x - ta.x
        nodes = [p[0].x for p in self.hist]
        fs = [p[1] for p in self.hist]
        beta = _adams_coeffs(nodes, ta.x, tb.x)
        y1 = y + h * sum(bj * fj for bj, fj in zip(beta, fs, strict=True))
        if self.method == "explicit_adams":
            return y1
        gam = _adams_coeffs([tb.x] + nodes[1:], ta.x, tb.x)
        known = y + h * sum(g * fj for g, fj in zip(gam[1:], fs[1:], strict=True))
        for _ in range(self.max_iters):
            y_new = known + (h * gam[0]) * self.end(ta, tb, y1)
            with torch.no_grad():
                scale = torch.maximum(y_new.abs(), y1.abs()) * self.rtol + self.atol
                delta = float(self.norm((y_new - y1) / scale))
            y1 = y_new
            if self.method == "implicit_adams" and delta < 1.0:
                break
        return y1

    def _implicit(self, ta: GridTime, tb: GridTime, y, f0):
        h = tb.x - ta.x
        hf = tb.f - ta.f
        opts = self.opts
        if isinstance(h, torch.Tensor):
            # gradients w.r.t. t: the same scheme for s in [0, 1], t = ta + s h, dy/ds = h f
            s0, s1, nxt, prv = 0.0, 1.0, math.nextafter(0.0, 1.0), math.nextafter(1.0, 0.0)

            def fi(s: float, yy):
                if self.perturb and s in (nxt, prv):
                    return h * (self.start(ta, tb, yy) if s == nxt else self.end(ta, tb, yy))
                return h * self.fc(tb.x if s == 1.0 else ta.x + s * h, yy)

            jac = opts.get("jacobian")
            if callable(jac):
                opts = {**opts, "jacobian": lambda s, yy: hf * jac(
                    torch.scalar_tensor(ta.f + float(s) * hf, dtype=yy.dtype), yy)}
            return implicit_step(fi, self.method, s0, s1, y, h * f0, opts, self.rtol,
                                 self.atol, perturb=self.perturb)
        t1 = ta.f + hf  # the step's end as implicit_step computes it
        nxt, prv = math.nextafter(ta.f, t1), math.nextafter(t1, ta.f)

        def fi(tt: float, yy):
            if self.perturb and tt in (nxt, prv):
                return self.start(ta, tb, yy) if tt == nxt else self.end(ta, tb, yy)
            return self.fc(tt, yy)

        return implicit_step(fi, self.method, ta.f, hf, y, f0, opts, self.rtol, self.atol,
                             perturb=self.perturb)

    @property
    def reuses_end(self) -> bool:
        """Whether ``f(tb, y1)`` is worth evaluating right after a step (the next ``f0``)."""
        return not self.perturb


def grid_times(grid_t: torch.Tensor, tgrad: bool) -> list[GridTime]:
    fl = [float(v) for v in grid_t.tolist()]
    if not tgrad:
        return [GridTime(v, v) for v in fl]
    return [GridTime(v, x) for v, x in zip(fl, grid_t.unbind(0), strict=True)]


def solve_fixed(f: Callable, y0: torch.Tensor, t: torch.Tensor, method: str, tab: Tableau | None,
                opts: dict, norm: Callable, rtol, atol, event_fn: Callable | None = None
                ) -> Solution:
    """Integrate on the fixed grid and report at ``t`` (with an ``event_fn``:
    :func:`~pydiffbridge.solvers.fixed_events.solve_fixed_until_event`)."""
    if event_fn is not None:
        raise InputError("solve_fixed does not search for events; call "
                         "solvers.fixed_events.solve_fixed_until_event")
    tdtype = opts.get("dtype") or t.dtype
    tgrad = t.requires_grad and torch.is_grad_enabled()
    st = FixedStepper(f, y0, method, tab, opts, norm, rtol, atol, tdtype)
    grid_t = make_grid(f, y0, t, opts)
    grid_t = grid_t.to(tdtype) if tgrad else grid_t.detach()
    pts = grid_times(grid_t, tgrad)
    ts = [float(v) for v in t.tolist()]
    if len(pts) >= 2 and (pts[0].f != ts[0] or pts[-1].f != ts[-1]):
        raise InputError(f"grid_constructor returned a grid from {pts[0].f} to {pts[-1].f}; it "
                         f"must start at t[0]={ts[0]} and end at t[-1]={ts[-1]}")
    direction = 1.0 if ts[-1] >= ts[0] else -1.0
    stats = Stats()
    outputs: list = [None] * len(ts)
    outputs[0] = y0
    j = 1
    y = y0
    f0 = None
    status, message = Status.SUCCESS, ""
    for ta, tb in zip(pts[:-1], pts[1:], strict=True):
        y1, f0 = st.advance(ta, tb, y, f0, stats)
        f1 = st.end_slope(ta, tb, y1)
        h = tb.x - ta.x
        while j < len(ts) and (ts[j] - tb.f) * direction <= 0:
            if ts[j] == tb.f and not tgrad:
                outputs[j] = y1
            else:
                s = ((t[j].to(tdtype) if tgrad else ts[j]) - ta.x) / h
                outputs[j] = hermite(s, h, y, f0, y1, f1) if st.cubic else y + s * (y1 - y)
            j += 1
        if not bool(torch.isfinite(y1).all()):
            status, message = Status.NONFINITE, f"the solution became NaN/Inf at t={tb.f:.6g}"
            y = y1
            break
        y = y1
        f0 = st.carried(f1)
    stats.nfe = st.nfe
    nan = torch.full_like(y0, float("nan"))
    ys = torch.stack([o if o is not None else nan for o in outputs])
    return Solution(ys=ys, ts=t, stats=stats, status=status, message=message)

