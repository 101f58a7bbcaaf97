"""The adaptive explicit Runge-Kutta loop of the native torch backend.

The loop works on a flat state ``y`` of shape ``(n,)`` (the API flattens and restores shapes)
and never raises on numerical trouble: it returns a :class:`~pydiffbridge.solution.Solution`
whose ``status`` says why it stopped, and the API turns a failure into an exception where the
caller asked for one.  Time is tracked in Python floats (float64); output times keep their
tensor so that outputs stay differentiable in ``t`` under direct backprop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..solution import Solution, Stats, Status
from .controller import Controller, error_ratio, error_scale, initial_step
from .events import EventTracker
from .interp import interp_weights
from .tableaus import Tableau

__all__ = ["solve_adaptive", "StageEngine"]


class StageEngine:
    """Evaluates the stages of one explicit RK step for a given tableau.

    Stage combinations are one ``addmv`` each over the matrix of previous stages.  Without
    autograd the stage matrix is a buffer reused from step to step; with autograd it is
    rebuilt each step so that no tensor saved for backward is overwritten.
    """

    def __init__(self, tab: Tableau, y0: torch.Tensor):
        self.tab = tab
        self.s = tab.stages
        kw = dict(dtype=y0.dtype, device=y0.device)
        self.a = [torch.tensor(r, **kw) if r else None for r in tab.a]
        self.b = torch.tensor(tab.b, **kw)
        self.e = torch.tensor(tab.e, **kw) if tab.e is not None else None
        self.e3 = torch.tensor(tab.e3, **kw) if tab.e3 is not None else None
        self.c = tab.c
        self.n = y0.numel()
        self.inv_sqrt_n = 1.0 / math.sqrt(max(self.n, 1))
        self._buf = None
        # does the error estimate need f(t1, y1) before the accept decision?
        self.err_needs_end = tab.e is not None and len(tab.e) > self.s

    def new_matrix(self, like: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return like.new_empty((self.s + 1, self.n))
        if self._buf is None or self._buf.dtype != like.dtype or self._buf.device != like.device:
            self._buf = like.new_empty((self.s + 1, self.n))
            # views made once (slicing costs as much as a small addmv): the leading columns
            # of the transposed stage matrix, and its rows
            self._bufT = [self._buf.t()[:, :i] for i in range(self.s + 2)]
            self._rows = self._buf.unbind(0)
        return self._buf

    def step(self, f, t: float, y: torch.Tensor, f0: torch.Tensor, h: float,
             t1_eval: float | None = None):
        """Return ``(y1, K)`` where ``K`` holds the stages (row ``s`` is left for
        ``f(t1, y1)``; for FSAL tableaux it is filled here).  ``t1_eval`` replaces the time of
        the stages at ``c = 1`` (just before a discontinuity at the step's end)."""
        grad = torch.is_grad_enabled()
        K = self.new_matrix(y)
        ks = [f0]
        if not grad:
            KT, rows = self._bufT, self._rows
            rows[0].copy_(f0)
        for i in range(1, self.s):
            yi = torch.addmv(y, torch.stack(ks).T if grad else KT[i], self.a[i], alpha=h)
            ti = t1_eval if (t1_eval is not None and self.c[i] == 1.0) else t + self.c[i] * h
            ki = f(ti, yi)
            ks.append(ki)
            if not grad:
                rows[i].copy_(ki)
        if grad:
            K = torch.stack(ks + [torch.zeros_like(f0)], 0)
        if self.tab.fsal:
            y1 = yi  # the last stage is evaluated at y1 itself
            if grad:
                K = torch.cat([K[: self.s], K[self.s - 1 : self.s]], 0)
            else:
                rows[self.s].copy_(rows[self.s - 1])
        else:
            y1 = torch.addmv(y, K[: self.s].T, self.b, alpha=h)
        return y1, K

    def error(self, K: torch.Tensor, h: float) -> torch.Tensor:
        return self.error_dir(K) * h

    def error_dir(self, K: torch.Tensor) -> torch.Tensor:
        """The error estimate per unit step, ``sum_i e_i k_i``."""
        m = len(self.tab.e)
        return torch.mv(self._bufT[m] if K is self._buf else K[:m].T, self.e)

    def rms_ratio(self, K, h: float, y, y1, rtol, atol) -> float:
        """:func:`error_ratio` for the built-in RMS norm with ``h`` taken out of the norm
        (``rms(h e / s) = |h| rms(e / s)``): fewer tensor ops per step."""
        scale = error_scale(y, y1, rtol, atol)
        return abs(h) * float(torch.linalg.vector_norm(self.error_dir(K).div_(scale))) \
            * self.inv_sqrt_n


def _stops(t0: float, t1: float, direction: float, *lists) -> list[float]:
    pts = set()
    for lst in lists:
        for v in lst:
            if (v - t0) * direction > 0 and (t1 - v) * direction > 0:
                pts.add(float(v))
    pts.add(float(t1))
    return sorted(pts, key=lambda v: v * direction)


def solve_adaptive(f: Callable, y0: torch.Tensor, t: torch.Tensor, tab: Tableau, rtol: Any,
                   atol: Any, norm: Callable, opts: dict, event_fn: Callable | None = None
                   ) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` on the flat state ``y0`` and report at times ``t``."""
    ts = [float(v) for v in t.tolist()]
    m = len(ts)
    t0 = ts[0]
    t_end = ts[-1] if m > 1 else (t0 + opts.get("t_max", math.inf) if event_fn else t0)
    direction = 1.0 if t_end >= t0 else -1.0
    tdtype = opts.get("dtype") or t.dtype
    tdev = y0.device
    nfe = [0]

    # Differentiable output times under direct backprop: time runs as tau = t - t[0] in
    # floats, and the tensor t[0] re-enters through func's time argument and the output
    # fractions, so that d/dt_j and d/dt_0 flow as they should.
    tgrad = t.requires_grad and torch.is_grad_enabled()
    t_first = t[0].to(tdtype) if tgrad else None

    def fc(tt: float, yy: torch.Tensor) -> torch.Tensor:
        nfe[0] += 1
        if tgrad:
            return f(t_first + torch.scalar_tensor(tt - t0, dtype=tdtype, device=tdev), yy)
        return f(torch.scalar_tensor(tt, dtype=tdtype, device=tdev), yy)

    stats = Stats()
    jump_t = [float(v) for v in opts.get("jump_t", ())]
    step_t = [float(v) for v in opts.get("step_t", ())]
    land_on_outputs = tab.interp == "hermite" and tab.order >= 5
    stops = _stops(t0, t_end, direction, jump_t, step_t, ts if land_on_outputs else ())
    jump_set = set(jump_t)
    max_steps = int(opts.get("max_num_steps", 100_000))
    min_step = float(opts.get("min_step", 0.0))
    max_step = float(opts.get("max_step", math.inf))
    ctrl = Controller(
        order=tab.order,
        safety=float(opts.get("safety", 0.9)),
        ifactor=float(opts.get("ifactor", 10.0)),
        dfactor=float(opts.get("dfactor", 0.2)),
        pcoeff=float(opts.get("pcoeff", 0.0)),
        icoeff=float(opts.get("icoeff", 1.0)),
        dcoeff=float(opts.get("dcoeff", 0.0)),
    )
    eng = StageEngine(tab, y0)
    plain_rms = getattr(norm, "rms_parts", False) is None and not y0.is_complex()

    outputs: list[torch.Tensor | None] = [None] * m
    outputs[0] = y0
    out_idx = 1
    y = y0
    tc = t0
    f0 = fc(tc, y) if t_end != t0 else None
    status, message = Status.SUCCESS, ""
    events = EventTracker(event_fn, tdtype, tdev, t0, y0) if event_fn is not None else None
    event_t = None

    if t_end != t0:
        if not bool(torch.isfinite(f0).all()):
            return _finish(outputs, y0, ts, t, stats, nfe, Status.NONFINITE,
                           f"func returned NaN/Inf at t={t0:.6g} (the initial state)", None)
        first = opts.get("first_step")
        with torch.no_grad():
            h = float(first) if first is not None else initial_step(
                fc, t0, y.detach(), f0.detach(), direction, tab.order, rtol, atol, norm)
        h = min(max(abs(h), min_step), max_step)
    span = abs(t_end - t0) if math.isfinite(t_end) else max(abs(t0), 1.0)
    stop_i = 0
    last_nonfinite = False
    while t_end != t0 and (t_end - tc) * direction > 0:
        if stats.steps >= max_steps:
            status = Status.MAX_STEPS
            message = (f"reached max_num_steps={max_steps} at t={tc:.6g} (dt={h:.3g}) before "
                       f"t={t_end:.6g}")
            break
        while (stops[stop_i] - tc) * direction <= 0:
            stop_i += 1
        stop = stops[stop_i]
        hit_stop = abs(stop - tc) <= h * (1 + 1e-12)
        hs = (stop - tc) if hit_stop else direction * h
        t1 = stop if hit_stop else tc + hs
        at_jump = hit_stop and t1 in jump_set
        t1_eval = math.nextafter(t1, tc) if at_jump else None
        y1, K = eng.step(fc, tc, y, f0, hs, t1_eval)
        if eng.err_needs_end:
            kend = fc(t1_eval if at_jump else t1, y1)
            K[eng.s] = kend
        with torch.no_grad():
            if tab.error_kind == "dop853":
                e3 = torch.mv(K[: len(tab.e3)].T, eng.e3) * hs
                ratio = _dop853_ratio(eng.error(K, hs), e3, y, y1, rtol, atol, norm)
            elif plain_rms:
                ratio = eng.rms_ratio(K, hs, y, y1, rtol, atol)
            else:
                ratio = error_ratio(eng.error(K, hs), y, y1, rtol, atol, norm)
        stats.steps += 1
        finite = math.isfinite(ratio)
        accept = finite and (ratio <= 1.0 or abs(hs) <= min_step * (1 + 1e-12))
        if accept:
            stats.accepted += 1
            if not tab.fsal and not eng.err_needs_end:
                kend = fc(t1_eval if at_jump else t1, y1)
                K = _set_end(K, eng.s, kend)
            elif tab.fsal:
                # K is a reused buffer without autograd: copy, or a rejected next step would
                # overwrite f0 (K[s]) with the rejected step's last stage
                kend = K[eng.s] if torch.is_grad_enabled() else eng._rows[eng.s].clone()
            # dense output for requested times in (tc, t1]
            j0 = out_idx
            while out_idx < m and (ts[out_idx] - t1) * direction <= 0:
                out_idx += 1
            if out_idx > j0:
                _fill(outputs, j0, out_idx, ts, t, tc, t1, hs, y, y1, K, tab, tgrad)
            if events is not None:
                ev = events.check(tc, t1, hs, y, y1, K, tab)
                if ev is not None:
                    event_t, y_ev = ev
                    outputs = [y0, y_ev]
                    status = Status.EVENT
                    stats.nfe = nfe[0]
                    return Solution(ys=torch.stack(outputs), ts=torch.stack(
                        [t[0], event_t.to(t.dtype)]), stats=stats, status=status,
                        event_t=event_t)
            tc, y = t1, y1
            f0 = kend
            if at_jump:
                f0 = fc(math.nextafter(t1, direction * math.inf), y1)
            if not bool(torch.isfinite(y1).all()):
                status, message = Status.NONFINITE, f"the solution became NaN/Inf at t={t1:.6g}"
                break
            last_nonfinite = False
        else:
            stats.rejected += 1
            last_nonfinite = not finite
        h = ctrl.next_step(abs(hs), ratio, accept)
        h = min(max(h, min_step), max_step)
        if h < 10 * math.ulp(max(abs(tc), span)):
            if last_nonfinite:
                status = Status.NONFINITE
                message = (f"func produced NaN/Inf near t={tc:.6g}; the step size shrank to "
                           f"dt={h:.3g} without avoiding it")
            else:
                status = Status.STEP_UNDERFLOW
                message = (f"step size underflow at t={tc:.6g}: dt={h:.3g}. The problem may be "
                           "stiff or singular here: try a larger rtol/atol, a stiff method "
                           "(backend='scipy', method='Radau' or 'BDF'), or options={'min_step': "
                           "...}")
            break
    if events is not None and status == Status.SUCCESS:
        # no event before the end: report the final state as torchdiffeq does not; say so
        status, message = Status.FAILED, f"the event function never crossed zero up to t={tc:.6g}"
    return _finish(outputs, y, ts, t, stats, nfe, status, message, event_t)


def _dop853_ratio(err5, err3, y0, y1, rtol, atol, norm) -> float:
    """Hairer's DOP853 combination of the 5th and 3rd order estimates."""
    scale = error_scale(y0, y1, rtol, atol)
    e5 = float(norm(err5 / scale))
    e3 = float(norm(err3 / scale))
    if e5 == 0.0 and e3 == 0.0:
        return 0.0
    return e5 * e5 / math.sqrt(e5 * e5 + 0.01 * e3 * e3)


def _set_end(K: torch.Tensor, s: int, kend: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():
        return torch.cat([K[:s], kend[None]], 0)
    K[s].copy_(kend)
    return K


def _fill(outputs, j0, j1, ts, t, tc, t1, hs, y, y1, K, tab, tgrad=False):
    rdt = y.real.dtype
    if tgrad:  # keep d/dt_j and d/dt_0 (see solve_adaptive)
        theta = ((t[j0:j1] - t[0]).to(rdt) - (tc - ts[0])) / hs
    else:
        theta = (t[j0:j1].to(rdt) - tc) / hs
    exact = [ts[j] == t1 and not tgrad for j in range(j0, j1)]
    W = interp_weights(tab, theta.to(K.real.dtype if K.is_complex() else K.dtype))
    if K.is_complex():
        W = W.to(K.dtype)
    # unbind: indexing rows one by one makes backward quadratic in the number of outputs
    rows = (y[None, :] + hs * (W @ K)).unbind(0)
    for i, j in enumerate(range(j0, j1)):
        outputs[j] = y1 if exact[i] else rows[i]


def _finish(outputs, y_last, ts, t, stats, nfe, status, message, event_t) -> Solution:
    stats.nfe = nfe[0]
    nan = torch.full_like(y_last, float("nan"))
    ys = torch.stack([o if o is not None else nan for o in outputs])
    return Solution(ys=ys, ts=t, stats=stats, status=status, message=message, event_t=event_t)
