"""Fixed-grid solvers: explicit RK methods on a grid, and Adams-Bashforth(-Moulton) methods.

The grid is ``t`` itself, or ``options["step_size"]`` steps from ``t[0]`` to ``t[-1]``, or
whatever ``options["grid_constructor"](func, y0, t)`` returns.  Values at output times that fall
between grid points come from linear interpolation (the default, as in torchdiffeq) or cubic
Hermite interpolation (``interp="cubic"``).

Adams coefficients are computed for the actual (possibly non-uniform) grid by integrating the
Lagrange interpolant of past slopes exactly with Gauss-Legendre quadrature (Hairer, Norsett &
Wanner, *Solving ODEs I*, Sec. III.1 and III.5).  The first steps are taken with the 3/8-rule
RK4 so that the starting values are fourth-order accurate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..solution import Solution, Stats, Status
from .tableaus import RK4, Tableau

__all__ = ["solve_fixed", "make_grid", "ADAMS"]

ADAMS = ("explicit_adams", "implicit_adams", "fixed_adams")
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


def make_grid(func, y0, t: torch.Tensor, opts: dict) -> torch.Tensor:
    if opts.get("grid_constructor") is not None:
        grid = opts["grid_constructor"](func, y0, t)
        return torch.as_tensor(grid, dtype=t.dtype, device=t.device)
    step = opts.get("step_size")
    if step is None:
        return t
    step = abs(float(step))
    t0, t1 = float(t[0]), float(t[-1])
    n = max(1, math.ceil(abs(t1 - t0) / step - 1e-9))
    direction = 1.0 if t1 >= t0 else -1.0
    grid = [t0 + direction * step * i for i in range(n)] + [t1]
    return torch.tensor(grid, dtype=t.dtype, device=t.device)


def _rk_step(fc, tab: Tableau, t0: float, h: float, y, f0, perturb: bool):
    ks = [f0]
    for i in range(1, tab.stages):
        yi = y
        for j, a in enumerate(tab.a[i]):
            if a != 0.0:
                yi = yi + (h * a) * ks[j]
        ti = t0 + tab.c[i] * h
        if perturb and tab.c[i] == 1.0:
            ti = math.nextafter(ti, t0)
        ks.append(fc(ti, yi))
    y1 = y
    for bi, k in zip(tab.b, ks, strict=True):
        if bi != 0.0:
            y1 = y1 + (h * bi) * k
    return y1


def _adams_coeffs(nodes: list[float], a: float, b: float) -> list[float]:
    """∫_a^b L_j(s) ds / (b - a) for the Lagrange basis over ``nodes``."""
    xs = 0.5 * (b - a) * _GL_X + 0.5 * (a + b)
    out = []
    for j, nj in enumerate(nodes):
        L = np.ones_like(xs)
        for k, nk in enumerate(nodes):
            if k != j:
                L = L * (xs - nk) / (nj - nk)
        out.append(float(0.5 * np.sum(_GL_W * L)))
    return out


def solve_fixed(f: Callable, y0: torch.Tensor, t: torch.Tensor, method: str, tab: Tableau | None,
                opts: dict, norm: Callable, rtol, atol) -> Solution:
    tdtype = opts.get("dtype") or t.dtype
    dev = y0.device
    nfe = [0]
    perturb = bool(opts.get("perturb", False))

    def fc(tt: float, yy):
        nfe[0] += 1
        return f(torch.scalar_tensor(tt, dtype=tdtype, device=dev), yy)

    if t.requires_grad and torch.is_grad_enabled():
        from ..errors import InputError

        raise InputError("gradients with respect to t are not available through fixed-grid "
                         "methods with direct backprop (the grid is built from t); use "
                         "odeint_adjoint / gradient='adjoint', or an adaptive method")
    grid_t = make_grid(f, y0, t, opts)
    grid = [float(v) for v in grid_t.tolist()]
    ts = [float(v) for v in t.tolist()]
    if len(grid) >= 2 and (grid[0] != ts[0] or grid[-1] != ts[-1]):
        from ..errors import InputError

        raise InputError(f"grid_constructor returned a grid from {grid[0]} to {grid[-1]}; it must "
                         f"start at t[0]={ts[0]} and end at t[-1]={ts[-1]}")
    direction = 1.0 if ts[-1] >= ts[0] else -1.0
    cubic = opts.get("interp", "linear") == "cubic"
    max_iters = int(opts.get("max_iters", 4)) if method == "implicit_adams" else 1
    order = int(opts.get("max_order", 4))
    stats = Stats()
    outputs: list = [None] * len(ts)
    outputs[0] = y0
    j = 1
    y = y0
    f0 = None
    hist_t: list[float] = []
    hist_f: list[torch.Tensor] = []
    status, message = Status.SUCCESS, ""
    for i in range(len(grid) - 1):
        ta, tb = grid[i], grid[i + 1]
        h = tb - ta
        if f0 is None:
            f0 = fc(math.nextafter(ta, tb) if perturb else ta, y)
        if method in ADAMS:
            hist_t.append(ta)
            hist_f.append(f0)
            hist_t, hist_f = hist_t[-order:], hist_f[-order:]
            if len(hist_t) < order:
                y1 = _rk_step(fc, RK4, ta, h, y, f0, perturb)
            else:
                beta = _adams_coeffs(hist_t, ta, tb)
                y1 = y + h * sum(bj * fj for bj, fj in zip(beta, hist_f, strict=True))
                if method != "explicit_adams":
                    gam = _adams_coeffs([tb] + hist_t[1:], ta, tb)
                    known = y + h * sum(g * fj for g, fj in zip(gam[1:], hist_f[1:], strict=True))
                    for _ in range(max_iters):
                        y_new = known + (h * gam[0]) * fc(tb, y1)
                        with torch.no_grad():
                            scale = torch.maximum(y_new.abs(), y1.abs()) * rtol + atol
                            delta = float(norm((y_new - y1) / scale))
                        y1 = y_new
                        if method == "implicit_adams" and delta < 1.0:
                            break
        else:
            y1 = _rk_step(fc, tab, ta, h, y, f0, perturb)
        stats.steps += 1
        stats.accepted += 1
        f1 = None
        if cubic or method in ADAMS or tab is None:
            f1 = fc(math.nextafter(tb, ta) if perturb else tb, y1)
        while j < len(ts) and (ts[j] - tb) * direction <= 0:
            if ts[j] == tb:
                outputs[j] = y1
            else:
                s = (t[j].to(y.real.dtype) - ta) / h
                if cubic:
                    f1 = f1 if f1 is not None else fc(tb, y1)
                    s2, s3 = s * s, s * s * s
                    outputs[j] = ((2 * s3 - 3 * s2 + 1) * y + (s3 - 2 * s2 + s) * h * f0
                                  + (-2 * s3 + 3 * s2) * y1 + (s3 - s2) * h * f1)
                else:
                    outputs[j] = y + s * (y1 - y)
            j += 1
        if not bool(torch.isfinite(y1).all()):
            status, message = Status.NONFINITE, f"the solution became NaN/Inf at t={tb:.6g}"
            y = y1
            break
        y = y1
        f0 = f1 if (f1 is not None and not perturb) else None
    stats.nfe = nfe[0]
    nan = torch.full_like(y0, float("nan"))
    ys = torch.stack([o if o is not None else nan for o in outputs])
    return Solution(ys=ys, ts=t, stats=stats, status=status, message=message)
