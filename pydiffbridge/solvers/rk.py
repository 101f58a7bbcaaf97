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
from .hooks import Perturb, beside, hooks_of
from .interp import interp_weights
from .stages import LeanStages, StageEngine, lean_func
from .tableaus import Tableau

__all__ = ["solve_adaptive", "max_steps_status", "step_size_status"]

_EXPLICIT_HINT = ("The problem may be stiff or singular here: try a larger rtol/atol, a stiff "
                  "method (method='rodas5', 'kvaerno5' or 'auto'; or backend='scipy', "
                  "method='Radau' or 'BDF'), or options={'min_step': ...}")


def max_steps_status(steps: int, max_steps: int, tc: float, h: float, t_end: float
                     ) -> tuple[Status, str] | None:
    """``(MAX_STEPS, message)`` once ``steps`` reached ``max_steps``, else None (the check at
    the top of every adaptive host loop: this one, solvers/stiff_loop.py)."""
    if steps < max_steps:
        return None
    return Status.MAX_STEPS, (f"reached max_num_steps={max_steps} at t={tc:.6g} (dt={h:.3g}) "
                              f"before t={t_end:.6g}")


def step_size_status(h: float, tc: float, span: float, last_nonfinite: bool, hint: str,
                     what: str = "func produced") -> tuple[Status, str] | None:
    """The end-of-step check of the adaptive host loops: None while the next step ``h`` is
    usable, else ``(NONFINITE, ...)`` when the last rejection was for NaN/Inf (the step shrank
    without avoiding it) or ``(STEP_UNDERFLOW, ...)``; ``hint`` says what to try."""
    if h >= 10 * math.ulp(max(abs(tc), span)):
        return None
    if last_nonfinite:
        return Status.NONFINITE, (f"{what} NaN/Inf near t={tc:.6g}; the step size shrank to "
                                  f"dt={h:.3g} without avoiding it")
    return Status.STEP_UNDERFLOW, f"step size underflow at t={tc:.6g}: dt={h:.3g}. {hint}"


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

    hooks = hooks_of(f)
    if hooks.perturb:
        # at a jump_t the stages at its end see Perturb.PREV and the restart Perturb.NEXT
        # (torchdiffeq's protocol; the wrapper forwards the flag to a func that names it)
        fc_plain = fc

        def fc_flag(tt: float, yy: torch.Tensor, flag: Perturb) -> torch.Tensor:
            nfe[0] += 1
            tt_ = (t_first + torch.scalar_tensor(tt - t0, dtype=tdtype, device=tdev) if tgrad
                   else torch.scalar_tensor(tt, dtype=tdtype, device=tdev))
            return f(tt_, yy, perturb=flag)
    callbacks = hooks.any_callback

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
    plain_rms = getattr(norm, "rms_parts", False) is None and not y0.is_complex()
    # no autograd, one tensor, no events: stages on reused buffers (see solvers/stages.py)
    shaped = lean_func(f)
    record = opts.get("record")  # odeint_dense: every accepted step's (t0, t1, h, y, K)
    lean = (shaped is not None and not torch.is_grad_enabled() and not y0.is_complex()
            and event_fn is None and record is None)
    eng = LeanStages(tab, y0, shaped, tdtype) if lean else StageEngine(tab, y0)
    lean_ratio = lean and plain_rms and tab.error_kind != "dop853"

    outputs: list[torch.Tensor | None] = [None] * m
    outputs[0] = y0
    out_idx = 1
    y = y0
    tc = t0
    f0 = fc(tc, y) if t_end != t0 else None
    status, message = Status.SUCCESS, ""
    events = (EventTracker(event_fn, tdtype, tdev, t0, y0, t_first=t_first)
              if event_fn is not None else None)
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
        trouble = max_steps_status(stats.steps, max_steps, tc, h, t_end)
        if trouble is not None:
            status, message = trouble
            break
        while (stops[stop_i] - tc) * direction <= 0:
            stop_i += 1
        stop = stops[stop_i]
        hit_stop = abs(stop - tc) <= h * (1 + 1e-12)
        hs = (stop - tc) if hit_stop else direction * h
        t1 = stop if hit_stop else tc + hs
        at_jump = hit_stop and t1 in jump_set
        t1_eval = beside(t1, tc, tdtype, y0.dtype) if at_jump else None
        if callbacks and hooks.step is not None:
            hooks.step(tc, y, abs(hs))
        if at_jump and hooks.perturb:
            def fc(tt, yy, _e=t1_eval):  # noqa: F811 - this step's end stages: just before t1
                return fc_flag(tt, yy, Perturb.PREV) if tt == _e else fc_plain(tt, yy)
        if lean:
            y1, K = eng.step_lean(tc, y, f0, hs, t1_eval), eng._buf
            nfe[0] += eng.s - 1
        else:
            y1, K = eng.step(fc, tc, y, f0, hs, t1_eval)
        if eng.err_needs_end:
            kend = fc(t1_eval if at_jump else t1, y1)
            K[eng.s] = kend
        if lean_ratio:  # (already without autograd)
            ratio = eng.ratio_lean(hs, y, y1, rtol, atol)
        else:
            ratio = _ratio(eng, K, tab, hs, y, y1, rtol, atol, norm, plain_rms)
        stats.steps += 1
        finite = math.isfinite(ratio)
        accept = finite and (ratio <= 1.0 or abs(hs) <= min_step * (1 + 1e-12))
        if accept:
            stats.accepted += 1
            if callbacks and hooks.accept is not None:
                hooks.accept(tc, y, abs(hs))
            if not (eng.y1_finite if lean_ratio else bool(torch.isfinite(y1).all())):
                # before the dense output: the rows from here on stay NaN
                status, message = Status.NONFINITE, f"the solution became NaN/Inf at t={t1:.6g}"
                break
            if not tab.fsal and not eng.err_needs_end:
                kend = fc(t1_eval if at_jump else t1, y1)
                K = _set_end(K, eng.s, kend)
            elif tab.fsal:
                # K is a reused buffer without autograd: copy, or a rejected next step would
                # overwrite f0 (K[s]) with the rejected step's last stage (lean: into K[0])
                kend = (K[eng.s] if torch.is_grad_enabled() else eng._rows[eng.s - 1] if lean
                        else eng._rows[eng.s].clone())
            # dense output for requested times in (tc, t1]
            j0 = out_idx
            while out_idx < m and (ts[out_idx] - t1) * direction <= 0:
                out_idx += 1
            if record is not None:  # (no-autograd K is a reused buffer)
                record.append((tc, t1, hs, y, K if torch.is_grad_enabled() else K.clone()))
            if out_idx > j0:
                if lean and tab.fsal:
                    eng.fill_end()
                _fill(outputs, j0, out_idx, ts, t, tc, t1, hs, y, y1, K, tab, tgrad, lean)
            if events is not None:
                ev = events.check(tc, t1, hs, y, y1, K, tab, fc)
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
            if lean:  # the next step's first stage: K[0] (which no retry overwrites)
                eng.accepted(y1)
                f0 = eng._rows[0].copy_(kend)
            if at_jump:
                t_after = beside(t1, direction * math.inf, tdtype, y0.dtype)
                f0 = (fc_flag(t_after, y1, Perturb.NEXT) if hooks.perturb
                      else fc(t_after, y1))
            last_nonfinite = False
        else:
            stats.rejected += 1
            if callbacks and hooks.reject is not None:
                hooks.reject(tc, y, abs(hs))
            last_nonfinite = not finite
        if at_jump and hooks.perturb:
            fc = fc_plain  # noqa: F811
        h = ctrl.next_step(abs(hs), ratio, accept)
        h = min(max(h, min_step), max_step)
        trouble = step_size_status(h, tc, span, last_nonfinite, _EXPLICIT_HINT)
        if trouble is not None:
            status, message = trouble
            break
    if events is not None and status == Status.SUCCESS:
        # no event before the end: report the final state as torchdiffeq does not; say so
        status, message = Status.FAILED, f"the event function never crossed zero up to t={tc:.6g}"
    return _finish(outputs, y, ts, t, stats, nfe, status, message, event_t)


def _ratio(eng, K, tab, hs, y, y1, rtol, atol, norm, plain_rms) -> float:
    """The step's error ratio (general path)."""
    with torch.no_grad():
        if tab.error_kind == "dop853":
            e3 = torch.mv(K[: len(tab.e3)].T, eng.e3) * hs
            return _dop853_ratio(eng.error(K, hs), e3, y, y1, rtol, atol, norm)
        if plain_rms:
            return eng.rms_ratio(K, hs, y, y1, rtol, atol)
        return error_ratio(eng.error(K, hs), y, y1, rtol, atol, norm)


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


def _fill(outputs, j0, j1, ts, t, tc, t1, hs, y, y1, K, tab, tgrad=False, copy_end=False):
    """Dense output at ``ts[j0:j1]`` inside the step; ``copy_end``: ``y1`` is a buffer."""
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
        outputs[j] = (y1.clone() if copy_end else y1) if exact[i] else rows[i]


def _finish(outputs, y_last, ts, t, stats, nfe, status, message, event_t) -> Solution:
    stats.nfe = nfe[0]
    nan = torch.full_like(y_last, float("nan"))
    ys = torch.stack([o if o is not None else nan for o in outputs])
    return Solution(ys=ys, ts=t, stats=stats, status=status, message=message, event_t=event_t)
