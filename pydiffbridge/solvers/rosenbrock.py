"""Adaptive Rosenbrock (linearly implicit) methods for stiff problems, in native torch.

Two methods, each one LU factorisation of ``M = I / (h gamma) - J`` per step, reused by all
stages (``J = df/dy`` at the step's start; kept across rejected retries):

* ``rosenbrock23``: the L-stable (2,3) pair of ``ode23s``, L. F. Shampine and M. W. Reichelt,
  "The MATLAB ODE Suite", SIAM J. Sci. Comput. 18(1), 1997, Sec. 2 (the formulas after
  eq. (2.4)): ``d = 1/(2 + sqrt 2)``, ``e32 = 6 + sqrt 2``, a W-method (second order with any
  ``J``), error estimate ``h/6 (k1 - 2 k2 + k3)`` and the paper's interpolant
  ``y(t + s h) = y + h (s(1-s)/(1-2d) k1 + s(s-2d)/(1-2d) k2)``.  Controller exponent 1/3.
* ``rodas4``: RODAS of E. Hairer and G. Wanner, *Solving ODEs II* (2nd ed., 1996),
  Sec. IV.7 (Table 7.1 ff. and the code RODAS, coefficient set METH=1): six stages, order
  4(3), stiffly accurate, L-stable, in the transformed form (eq. (7.4'))::

      (I/(h g) - J) u_i = f(t + alpha_i h, y + sum_j a_ij u_j) + sum_j (c_ij / h) u_j
                          + gamma_i h df/dt,
      y1 = y + sum_i m_i u_i,   error estimate u_6,

  with its own third-order dense output
  ``y(s) = (1-s) y + s (y1 + (1-s)(K2 + s K3))``, ``K2 = sum d2j u_j``, ``K3 = sum d3j u_j``.
  Controller exponent 1/4; step factor limits 0.2 and 6 (RODAS's defaults).

``J`` comes from autograd (one evaluation of ``f`` that also gives ``f(t, y)``; with
``create_graph`` when autograd is on, so that direct backprop sees ``dJ/dy`` and ``dJ/dp``),
from finite differences (``options["jacobian"] = "fd"``: ``n`` extra evaluations) or from the
user (``options["jac"](t, y) -> (n, n)``, or a callable ``options["jacobian"]``).  ``df/dt``
comes from the same autograd call (``None`` gradient: autonomous) or from one forward
difference; ``options["autonomous"] = True`` skips it.

The test-only option ``fixed_step=h`` takes steps of exactly ``h`` (the last one shortened to
land on the final time) and accepts all of them; it exists to measure convergence orders.

Gradients: the whole solve is differentiable by direct backprop (``lu_factor_ex``/``lu_solve``
are); the step-size decisions are Python floats and carry none.  Gradients w.r.t. the output
times ``t`` are not propagated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError, UnknownMethodError, UnknownOptionError
from ..solution import Solution, Stats, Status
from .controller import Controller, error_ratio, initial_step

__all__ = ["STIFF_METHODS", "STIFF_OPTIONS", "RODAS4", "solve_stiff"]

STIFF_METHODS: tuple[str, ...] = ("rosenbrock23", "rodas4")
STIFF_OPTIONS: frozenset[str] = frozenset({
    "first_step", "max_num_steps", "min_step", "max_step", "jac", "jacobian", "autonomous",
    "safety", "ifactor", "dfactor", "dtype", "fixed_step"})

_D23 = 1.0 / (2.0 + math.sqrt(2.0))  # ode23s's d (Shampine & Reichelt 1997)
_E32 = 6.0 + math.sqrt(2.0)

#: RODAS (METH=1) in the transformed form: Hairer & Wanner, Solving ODEs II, Sec. IV.7.
RODAS4 = {
    "gamma": 0.25,
    "alpha": (0.0, 0.386, 0.21, 0.63, 1.0, 1.0),
    "gammas": (0.25, -0.1043, 0.1035, -0.3620000000000023e-01, 0.0, 0.0),
    "a": ((), (1.544,), (0.9466785280815826, 0.2557011698983284),
          (3.314825187068521, 2.896124015972201, 0.9986419139977817),
          (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950),
          (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950, 1.0)),
    "c": ((), (-5.6688,), (-2.430093356833875, -0.2063599157091915),
          (-0.1073529058151375, -9.594562251023355, -20.47028614809616),
          (7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160),
          (8.083246795921522, -7.981132988064893, -31.52159432874371, 16.31930543123136,
           -6.058818238834054)),
    # y1 = (stage 6 argument) + u6; the embedded (order 3) solution is the stage 6 argument
    "m": (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950,
          1.0, 1.0),
    "d2": (10.12623508344586, -7.487995877610167, -34.80091861555747, -7.992771707568823,
           1.025137723295662),
    "d3": (-0.6762803392801253, 6.087714651680015, 16.43084320892478, 24.76722511418386,
           -6.594389125716872),
}

_ORDER = {"rosenbrock23": 3, "rodas4": 4}  # exponent 1/order of the step-size controller
_GAMMA = {"rosenbrock23": _D23, "rodas4": RODAS4["gamma"]}


def _lin(coeffs, vecs):
    """``sum_i coeffs[i] * vecs[i]`` (skipping zeros)."""
    out = None
    for c, v in zip(coeffs, vecs):
        if c != 0.0:
            out = v * c if out is None else out + v * c
    return out if out is not None else torch.zeros_like(vecs[0])


class _Derivs:
    """``f(t, y)``, ``J = df/dy`` and ``df/dt`` at a step's start, by the chosen means."""

    def __init__(self, fct: Callable, opts: dict, tdtype: torch.dtype, device):
        kind = opts.get("jacobian", "autograd")
        self.user = opts.get("jac") or (kind if callable(kind) else None)
        if self.user is None and kind not in ("autograd", "fd"):
            raise InputError(f"options['jacobian'] must be 'autograd', 'fd' or a callable "
                             f"(t, y) -> (n, n), got {kind!r}")
        self.kind = "user" if self.user is not None else kind
        self.fct, self.tdtype, self.device = fct, tdtype, device
        self.autonomous = bool(opts.get("autonomous", False))

    def _tt(self, t: float) -> torch.Tensor:
        return torch.scalar_tensor(t, dtype=self.tdtype, device=self.device)

    def __call__(self, t: float, y: torch.Tensor):
        if self.kind == "autograd":
            return self._autograd(t, y)
        f0 = self.fct(self._tt(t), y)
        n = y.numel()
        if self.kind == "user":
            J = self.user(self._tt(t), y)
            if not isinstance(J, torch.Tensor) or tuple(J.shape) != (n, n):
                shape = tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__
                raise InputError(f"options['jac'] must return a ({n}, {n}) tensor (df/dy of "
                                 f"the flat state); got {shape} at t={t:.6g}")
            J = J.to(y.dtype)
        else:
            sq = math.sqrt(torch.finfo(y.dtype).eps)
            dy = sq * torch.clamp(y.detach().abs(), min=1e-3)
            eye = torch.eye(n, dtype=y.dtype, device=y.device)
            cols = [(self.fct(self._tt(t), y + dy[j] * eye[j]) - f0) / dy[j] for j in range(n)]
            J = torch.stack(cols, 1)
        ft = None
        if not self.autonomous:
            dt = math.sqrt(torch.finfo(y.dtype).eps) * max(abs(t), 1.0)
            ft = (self.fct(self._tt(t + dt), y) - f0) / dt
        return f0, J, ft

    def _autograd(self, t: float, y: torch.Tensor):
        graph = torch.is_grad_enabled()
        n = y.numel()
        with torch.enable_grad():
            yy = y if (graph and y.requires_grad) else y.detach().requires_grad_(True)
            tt = self._tt(t)
            if not self.autonomous:
                tt.requires_grad_(True)
            fy = self.fct(tt, yy)
            inputs = (yy,) if self.autonomous else (yy, tt)
            if not fy.requires_grad:  # f ignores y and t
                gs = (None, None)
            else:
                eye = torch.eye(n, dtype=fy.dtype, device=fy.device)
                try:
                    gs = torch.autograd.grad(fy, inputs, eye, retain_graph=True,
                                             create_graph=graph, allow_unused=True,
                                             is_grads_batched=True)
                except RuntimeError:  # f not vmap-able: one vector-Jacobian product a row
                    rows = [torch.autograd.grad(fy, inputs, eye[i], retain_graph=True,
                                                create_graph=graph, allow_unused=True)
                            for i in range(n)]
                    gs = tuple(None if rows[0][k] is None else torch.stack([r[k] for r in rows])
                               for k in range(len(inputs)))
        J = gs[0] if gs[0] is not None else torch.zeros(n, n, dtype=y.dtype, device=y.device)
        ft = None if self.autonomous or gs[1] is None else gs[1].reshape(n).to(y.dtype)
        if not graph:
            fy, J = fy.detach(), J.detach()
            ft = None if ft is None else ft.detach()
        return fy, J, ft


def _factor(J: torch.Tensor, hg: float):
    """LU of ``I/(h gamma) - J``; a singular matrix gives non-finite stages (then rejection)."""
    M = torch.diag_embed(torch.full((J.shape[0],), 1.0 / hg, dtype=J.dtype, device=J.device)) - J
    lu, piv, _ = torch.linalg.lu_factor_ex(M)
    return lu, piv


def _solve(lu, r: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lu_solve(lu[0], lu[1], r[:, None])[:, 0]


def _step_ros23(fc, t: float, y, h: float, f0, ft, lu):
    """One ode23s step (Shampine & Reichelt 1997, Sec. 2); ``lu`` factors I/(h d) - J, so
    ``W^{-1} r = lu^{-1} r / (h d)`` with ``W = I - h d J``."""
    hd = h * _D23
    T = ft * hd if ft is not None else None
    r1 = f0 if T is None else f0 + T
    k1 = _solve(lu, r1) / hd
    F1 = fc(t + 0.5 * h, y + (0.5 * h) * k1)
    k2 = _solve(lu, F1 - k1) / hd + k1
    y1 = y + h * k2
    F2 = fc(t + h, y1)
    r3 = F2 - _E32 * (k2 - F1) - 2.0 * (k1 - f0)
    if T is not None:
        r3 = r3 + T
    k3 = _solve(lu, r3) / hd
    err = (h / 6.0) * (k1 - 2.0 * k2 + k3)
    return y1, err, (k1, k2)


def _step_rodas4(fc, t: float, y, h: float, f0, ft, lu):
    """One RODAS step in the transformed form (Hairer & Wanner II, eq. (7.4'))."""
    tab = RODAS4
    U: list[torch.Tensor] = []
    for i, alpha in enumerate(tab["alpha"]):
        fi = f0 if i == 0 else fc(t + alpha * h, y + _lin(tab["a"][i], U))
        r = fi
        if i:
            r = r + _lin([c / h for c in tab["c"][i]], U)
        g = tab["gammas"][i]
        if ft is not None and g != 0.0:
            r = r + ft * (g * h)
        U.append(_solve(lu, r))
    return y + _lin(tab["m"], U), U[5], tuple(U)


_STEPS = {"rosenbrock23": _step_ros23, "rodas4": _step_rodas4}


def _interp(method: str, s: torch.Tensor, y, y1, h: float, st) -> torch.Tensor:
    """Dense output at fractions ``s`` (shape (k,)) of the step: rows (k, n)."""
    s = s[:, None]
    if method == "rosenbrock23":
        k1, k2 = st
        den = 1.0 - 2.0 * _D23
        return y + h * ((s * (1 - s) / den) * k1 + (s * (s - 2 * _D23) / den) * k2)
    K2, K3 = _lin(RODAS4["d2"], st[:5]), _lin(RODAS4["d3"], st[:5])
    return (1 - s) * y + s * (y1 + (1 - s) * (K2 + s * K3))


def solve_stiff(f: Callable, y0: torch.Tensor, t: torch.Tensor, method: str, rtol: Any,
                atol: Any, norm: Callable | None, opts: dict) -> Solution:
    """Integrate the stiff ``dy/dt = f(t, y)`` on the flat state ``y0`` (shape ``(n,)``) with
    an adaptive Rosenbrock method and report at times ``t``; the same contract as
    :func:`pydiffbridge.solvers.rk.solve_adaptive`: a :class:`Solution` whose ``status`` says
    why it stopped (rows never reached are NaN), never an exception on numerical trouble.

    ``method``: one of :data:`STIFF_METHODS`; ``opts``: names in :data:`STIFF_OPTIONS`.
    """
    if method not in STIFF_METHODS:
        raise UnknownMethodError(f"unknown stiff method {method!r}; choose one of "
                                 f"{', '.join(STIFF_METHODS)}")
    bad = sorted(set(opts) - STIFF_OPTIONS)
    if bad:
        raise UnknownOptionError(f"option(s) {bad} not understood by method {method!r}; it "
                                 f"accepts: {', '.join(sorted(STIFF_OPTIONS))}")
    if y0.is_complex() or not y0.is_floating_point():
        raise InputError(f"method {method!r} needs a real floating-point state, got {y0.dtype}")
    norm = norm or (lambda x: torch.linalg.vector_norm(x) / (x.numel() ** 0.5))
    ts = [float(v) for v in t.tolist()]
    m, t0, t_end = len(ts), ts[0], ts[-1]
    direction = 1.0 if t_end >= t0 else -1.0
    tdtype = opts.get("dtype") or t.dtype
    nfe = [0]

    def fct(tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        nfe[0] += 1
        return f(tt, yy)

    def fc(tt: float, yy: torch.Tensor) -> torch.Tensor:
        return fct(torch.scalar_tensor(tt, dtype=tdtype, device=y0.device), yy)

    if torch.is_grad_enabled() and not y0.requires_grad and t_end != t0:
        # build autograd graphs only when something upstream needs them: y0 or a parameter
        # of f (seen by one evaluation, counted in nfe)
        if not fc(t0, y0.detach()).requires_grad:
            with torch.no_grad():
                sol = solve_stiff(f, y0, t, method, rtol, atol, norm, opts)
            sol.stats.nfe += 1
            return sol
    derivs = _Derivs(fct, opts, tdtype, y0.device)
    step, gamma, order = _STEPS[method], _GAMMA[method], _ORDER[method]
    stats = Stats()
    max_steps = int(opts.get("max_num_steps", 100_000))
    min_step = float(opts.get("min_step", 0.0))
    max_step = float(opts.get("max_step", math.inf))
    fixed = opts.get("fixed_step")
    ctrl = Controller(order=order, safety=float(opts.get("safety", 0.9)),
                      ifactor=float(opts.get("ifactor", 6.0)),
                      dfactor=float(opts.get("dfactor", 0.2)))
    outputs: list[torch.Tensor | None] = [None] * m
    outputs[0] = y0
    out_idx, tc, y = 1, t0, y0
    status, message = Status.SUCCESS, ""
    span = abs(t_end - t0)
    h = 0.0
    J = None
    last_nonfinite = False
    while t_end != t0 and (t_end - tc) * direction > 0:
        if stats.steps >= max_steps:
            status = Status.MAX_STEPS
            message = (f"reached max_num_steps={max_steps} at t={tc:.6g} (dt={h:.3g}) before "
                       f"t={t_end:.6g}")
            break
        if J is None:  # a new step start: f0, J and df/dt there
            f0, J, ft = derivs(tc, y)
            parts = [f0, J] + ([ft] if ft is not None else [])
            if not all(bool(torch.isfinite(p.detach()).all()) for p in parts):
                status = Status.NONFINITE
                message = (f"func or its Jacobian returned NaN/Inf at t={tc:.6g} "
                           f"(step {stats.steps})")
                break
            if h == 0.0:
                if fixed is not None:
                    h = abs(float(fixed))
                elif opts.get("first_step") is not None:
                    h = abs(float(opts["first_step"]))
                else:
                    with torch.no_grad():
                        h = initial_step(fc, t0, y.detach(), f0.detach(), direction, order,
                                         rtol, atol, norm)
                    h = min(h, span)
                h = min(max(h, min_step), max_step)
        hit = abs(t_end - tc) <= h * (1 + 1e-12)
        hs = (t_end - tc) if hit else direction * h
        t1 = t_end if hit else tc + hs
        lu = _factor(J, hs * gamma)
        y1, err, st = step(fc, tc, y, hs, f0, ft, lu)
        stats.steps += 1
        with torch.no_grad():
            finite = bool(torch.isfinite(y1).all())
            ratio = error_ratio(err, y, y1, rtol, atol, norm) if finite else math.inf
            finite = finite and math.isfinite(ratio)
        if fixed is not None and not finite:
            status, message = Status.NONFINITE, f"the solution became NaN/Inf at t={t1:.6g}"
            break
        accept = finite and (fixed is not None or ratio <= 1.0
                             or abs(hs) <= min_step * (1 + 1e-12))
        if accept:
            stats.accepted += 1
            j0 = out_idx
            while out_idx < m and (ts[out_idx] - t1) * direction <= 0:
                out_idx += 1
            if out_idx > j0:
                s = (t[j0:out_idx].detach().to(y.dtype) - tc) / hs
                rows = _interp(method, s, y, y1, hs, st).unbind(0)
                for i, j in enumerate(range(j0, out_idx)):
                    outputs[j] = y1 if ts[j] == t1 else rows[i]
            tc, y, J = t1, y1, None
            last_nonfinite = False
        else:
            stats.rejected += 1
            last_nonfinite = not finite
        if fixed is not None:
            continue
        h = min(max(ctrl.next_step(abs(hs), ratio, accept), min_step), max_step)
        if h < 10 * math.ulp(max(abs(tc), span)):
            if last_nonfinite:
                status = Status.NONFINITE
                message = (f"the step produced NaN/Inf near t={tc:.6g}; the step size shrank "
                           f"to dt={h:.3g} without avoiding it")
            else:
                status = Status.STEP_UNDERFLOW
                message = (f"step size underflow at t={tc:.6g}: dt={h:.3g} (method {method!r}). "
                           "The problem may be singular here; try a larger rtol/atol or "
                           "options={'min_step': ...}")
            break
    stats.nfe = nfe[0]
    nan = torch.full_like(y0, float("nan"))
    ys = torch.stack([o if o is not None else nan for o in outputs])
    return Solution(ys=ys, ts=t, stats=stats, status=status, message=message,
                    method=method)
