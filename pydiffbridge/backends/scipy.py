"""The SciPy backend: the step-by-step solvers behind ``scipy.integrate.solve_ivp`` (RK23, RK45,
DOP853, Radau, BDF, LSODA) driven by our own loop.

Driving the ``OdeSolver`` objects directly (as ``solve_ivp`` does internally) lets the backend
count attempted and accepted steps, stop at ``max_num_steps`` with ``Status.MAX_STEPS``
(SciPy itself has no step limit), restart at ``jump_t`` discontinuities, fill the output
times from each step's dense output, and locate terminal events with the same semantics as
the torch backend.  Failures never raise: they come back as a :class:`Status` with a message
and NaN rows for the times not reached; the API decides whether to raise.

Gradients do not flow through SciPy: the API routes them through the adjoint bridge, which
calls :meth:`ScipyBackend.solve` again on the augmented system in reverse time.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import torch

from ..errors import InputError, UnknownOptionError
from ..solution import Solution, Stats, Status
from ._marshal import NumpyRHS, engine_dtype, to_numpy, to_torch, tol_to_numpy
from .base import SolveSpec
from .methods import native_methods, resolve

__all__ = ["ScipyBackend", "OUR_OPTIONS"]

#: options handled by this backend itself; everything else goes to the SciPy solver class.
OUR_OPTIONS = {"max_num_steps", "jump_t", "step_t", "t_max", "dtype", "norm"}
_NOT_PASSED = {"self", "fun", "t0", "y0", "t_bound", "rtol", "atol", "extraneous"}
_DEFAULT_MAX_STEPS = 100_000
#: torchdiffeq's ``method="scipy_solver", options={"solver": "LSODA"}``
SCIPY_SOLVER = "scipy_solver"


def _solver_class(method: str):
    import scipy.integrate as si

    return getattr(si, method)


def _solver_kwargs(method: str) -> set[str]:
    sig = inspect.signature(_solver_class(method).__init__)
    return {p for p in sig.parameters if p not in _NOT_PASSED}


class ScipyBackend:
    """``backend="scipy"``: SciPy's ODE solvers with torch tensors on both sides."""

    name = "scipy"
    supports_direct_grad = False

    def methods(self) -> list[str]:
        return native_methods("scipy")

    def availability(self) -> str:
        try:
            import scipy.integrate  # noqa: F401
        except ImportError as exc:
            return f"scipy is not installed ({exc}); pip install 'pydiffbridge[scipy]'"
        return ""

    def resolve_method(self, method: str | None) -> str:
        if method == SCIPY_SOLVER:
            return SCIPY_SOLVER
        return "RK45" if method is None else resolve("scipy", method)

    def check_options(self, method: str, options: dict) -> None:
        extra = set()
        if method == SCIPY_SOLVER:  # torchdiffeq's spelling: the solver is an option
            method, extra = resolve("scipy", options.get("solver", "RK45")), {"solver"}
        allowed = OUR_OPTIONS | extra | _solver_kwargs(method)
        bad = sorted(set(options) - allowed)
        if bad:
            hint = ""
            if "min_step" in bad:
                hint = " (SciPy supports min_step only for LSODA)"
            raise UnknownOptionError(
                f"option(s) {bad} not understood by backend 'scipy', method {method!r}{hint}; "
                f"it accepts: {', '.join(sorted(allowed))}")

    def solve(self, func: Callable, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec,
              event_fn: Callable | None = None) -> Solution:
        method = self.resolve_method(spec.method)
        opts = dict(spec.options)
        self.check_options(method, opts)
        if method == SCIPY_SOLVER:
            method = resolve("scipy", opts.pop("solver", "RK45"))
        return _Run(method, func, y0, t, spec, opts, event_fn).run()


def _as_list(v):
    return v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else v


class _LeftLimit:
    """``fun`` evaluated at ``nextafter(stop)`` (towards the segment) instead of at ``stop``:
    a right-hand side that jumps at ``stop`` is seen from the segment's side."""

    def __init__(self, fun, stop: float, toward: float):
        self.fun, self.stop = fun, stop
        self.inner = math.nextafter(stop, toward * math.inf)

    def __call__(self, t, y):
        return self.fun(self.inner if t == self.stop else t, y)


class _Run:
    """One integration: state of the loop over segments (split at ``jump_t``) and steps."""

    def __init__(self, method, func, y0, t, spec, opts, event_fn):
        self.method = method
        self.cls = _solver_class(method)
        self.y0 = y0
        self.t = t
        self.ts = [float(v) for v in t.tolist()]
        m = len(self.ts)
        self.t0 = self.ts[0]
        t_max = float(opts.pop("t_max", math.inf))
        self.t_end = self.ts[-1] if m > 1 else (self.t0 + t_max if event_fn else self.t0)
        self.direction = 1.0 if self.t_end >= self.t0 else -1.0
        self.max_steps = int(opts.pop("max_num_steps", _DEFAULT_MAX_STEPS))
        jumps = [float(v) for key in ("jump_t", "step_t")
                 for v in np.asarray(_as_list(opts.pop(key, ())), dtype=np.float64).reshape(-1)]
        for key in ("dtype", "norm"):
            opts.pop(key, None)
        self.first_step = opts.pop("first_step", None)
        self.kwargs = opts
        self.stops = sorted({v for v in jumps if (v - self.t0) * self.direction > 0
                             and (self.t_end - v) * self.direction > 0} | {self.t_end},
                            key=lambda v: v * self.direction)
        self.rtol = tol_to_numpy(spec.rtol)
        self.atol = tol_to_numpy(spec.atol)
        self.ndtype = engine_dtype(y0.dtype)
        self.rhs = NumpyRHS(func, y0.dtype, y0.device, t.dtype)
        self.event_fn = event_fn
        self.stats = Stats()
        self.out = np.full((m, y0.numel()), np.nan, dtype=self.ndtype)
        self.out[0] = to_numpy(y0, self.ndtype)
        self.out_idx = 1

    # -- events -------------------------------------------------------------------------
    def _g(self, tt: float, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            g = self.event_fn(torch.tensor(tt, dtype=self.t.dtype, device=self.y0.device),
                              self.rhs.tensor(y))
        return to_numpy(torch.as_tensor(g).reshape(-1), np.dtype(np.float64))

    def _locate_event(self, solver, g0: np.ndarray, g1: np.ndarray):
        from scipy.optimize import brentq

        crossed = np.nonzero((g0 * g1 < 0) | ((g1 == 0) & (g0 != 0)))[0]
        if crossed.size == 0:
            return None
        dense = solver.dense_output()
        ta, tb = solver.t_old, solver.t
        best = None
        for c in crossed:
            if g1[c] == 0:
                root = tb
            else:
                root = brentq(lambda s, c=c: self._g(s, dense(s))[c], ta, tb,
                              xtol=4 * np.finfo(float).eps * max(abs(ta), abs(tb), 1.0),
                              rtol=4 * np.finfo(float).eps)
            if best is None or (root - best) * self.direction < 0:
                best = root
        return best, (solver.y if best == tb else dense(best))

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> Solution:
        status, message = Status.SUCCESS, ""
        y = self.out[0].copy()
        tc = self.t0
        g0 = self._g(tc, y) if self.event_fn is not None else None
        n_stages = getattr(self.cls, "n_stages", None)
        first = self.first_step
        for stop in self.stops if self.t_end != self.t0 else ():
            kw = dict(self.kwargs)
            if first is not None:
                kw["first_step"] = abs(float(first))
                first = None
            fun = self.rhs
            if stop != self.t_end:  # a jump: the segment sees the left limit at its end
                fun = _LeftLimit(self.rhs, stop, -self.direction)
            try:
                solver = self.cls(fun, tc, y, stop, rtol=self.rtol, atol=self.atol, **kw)
            except ValueError as exc:
                hint = ""
                if self.y0.is_complex():
                    hint = "; for complex states use RK45, RK23, DOP853 or BDF"
                raise InputError(f"scipy {self.method}: {exc}{hint}") from exc
            if not np.isfinite(solver.f if hasattr(solver, "f") else y).all():
                status = Status.NONFINITE
                message = f"func returned NaN/Inf at t={tc:.6g}"
                break
            while solver.status == "running":
                if self.stats.steps >= self.max_steps:
                    status = Status.MAX_STEPS
                    message = (f"reached max_num_steps={self.max_steps} at t={solver.t:.6g} "
                               f"(dt={solver.step_size or 0:.3g}) before t={self.t_end:.6g}")
                    break
                calls = self.rhs.calls
                try:
                    msg = solver.step()
                except ValueError as exc:  # SciPy's own check on NaN/Inf in its linear algebra
                    if "inf" not in str(exc).lower() and "nan" not in str(exc).lower():
                        raise
                    self.stats.steps += 1
                    status = Status.NONFINITE
                    message = (f"the solution became NaN/Inf near t={solver.t:.6g} ({exc}); the "
                               "problem may be unstable in this direction: for gradients of stiff "
                               "problems use gradient='interpolated'")
                    break
                attempts = 1
                if n_stages:
                    attempts = max(1, (self.rhs.calls - calls) // n_stages)
                self.stats.steps += attempts
                if solver.status == "failed":
                    self.stats.rejected += attempts
                    status, message = self._failure(msg, solver)
                    break
                self.stats.accepted += 1
                self.stats.rejected += attempts - 1
                self._fill(solver)
                if not np.isfinite(solver.y).all():
                    status = Status.NONFINITE
                    message = f"the solution became NaN/Inf at t={solver.t:.6g}"
                    break
                if g0 is not None:
                    g1 = self._g(solver.t, solver.y)
                    ev = self._locate_event(solver, g0, g1)
                    if ev is not None:
                        return self._event_solution(*ev)
                    g0 = g1
            if status != Status.SUCCESS:
                break
            tc, y = solver.t, solver.y.copy()
        if self.event_fn is not None and status == Status.SUCCESS:
            status = Status.FAILED
            message = f"the event function never crossed zero up to t={tc:.6g}"
        return self._solution(self.out, self.t, status, message)

    def _fill(self, solver) -> None:
        ts, d = self.ts, self.direction
        j0 = self.out_idx
        while self.out_idx < len(ts) and (ts[self.out_idx] - solver.t) * d <= 0:
            self.out_idx += 1
        if self.out_idx == j0:
            return
        dense = None
        for j in range(j0, self.out_idx):
            if ts[j] == solver.t:
                self.out[j] = solver.y
            else:
                if dense is None:
                    dense = solver.dense_output()
                self.out[j] = dense(ts[j])

    def _failure(self, msg, solver) -> tuple[Status, str]:
        text = str(msg or "the solver failed")
        low = text.lower()
        where = f" at t={solver.t:.6g}"
        if self.rhs.nonfinite and ("step size" in low or "nan" in low or "inf" in low):
            return Status.NONFINITE, (f"func produced NaN/Inf near t={solver.t:.6g}; the step "
                                      f"size shrank without avoiding it (SciPy: {text})")
        if "step size" in low:
            return Status.STEP_UNDERFLOW, (
                f"step size underflow{where} (SciPy: {text}). The problem may be stiff or "
                "singular here: try method='Radau', 'BDF' or 'LSODA', or a larger rtol/atol")
        if "excess work" in low:
            return Status.MAX_STEPS, f"LSODA did too much work{where} (SciPy: {text})"
        return Status.FAILED, f"{self.method} failed{where}: {text}"

    def _event_solution(self, t_ev: float, y_ev: np.ndarray) -> Solution:
        ys = np.stack([self.out[0], np.asarray(y_ev, dtype=self.ndtype)])
        event_t = torch.tensor(t_ev, dtype=self.t.dtype, device=self.t.device)
        ts = torch.stack([self.t[0], event_t])
        sol = self._solution(ys, ts, Status.EVENT, "")
        sol.event_t = event_t
        return sol

    def _solution(self, out: np.ndarray, ts: torch.Tensor, status: Status, message: str
                  ) -> Solution:
        self.stats.nfe = self.rhs.calls
        ys = to_torch(out, self.y0.dtype, self.y0.device)
        return Solution(ys=ys, ts=ts, stats=self.stats, status=status, message=message,
                        backend="scipy", method=self.method)
