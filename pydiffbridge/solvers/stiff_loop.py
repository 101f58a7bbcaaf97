"""The adaptive step loop shared by the stiff one-step methods (Rosenbrock, ESDIRK, auto).

A *scheme* does the numerics of one method; this loop does the rest: output times (dense
output of the step that passes them), step-size control, statuses instead of exceptions (the
checks shared with :mod:`~pydiffbridge.solvers.rk` through
:func:`~pydiffbridge.solvers.rk.step_size_status` and
:func:`~pydiffbridge.solvers.rk.max_steps_status`), NFE and step counts.

A scheme has

* ``order`` (the step-size controller's exponent is ``1/order``; may change between steps,
  as in the auto-switching scheme) and ``ifactor``/``dfactor`` defaults;
* ``start(t, y) -> f0``: work at a new step start (``f(t, y)``, a Jacobian where needed);
* ``attempt(t, y, h, f0) -> (y1, err, st)`` for one step of signed length ``h``, or ``None``
  when the step failed before an error estimate (an ESDIRK Newton iteration that diverged):
  then the step is rejected and retried with ``h * fail_factor``;
* ``dense(s, t, y, y1, h, st) -> rows``: states at fractions ``s`` (shape ``(k,)``) of the step;
* ``next_h(h_used, h_new, accepted) -> h``: a last say over the next step (keep ``h`` to reuse
  an LU factorisation, switch methods, ...); ``stats_extra() -> dict``: extra stats fields.

Terminal events (``event_fn``) are located on the dense output of the accepted step in which
the event function changes sign, by :class:`~pydiffbridge.solvers.events.EventTracker` (as the
explicit loop of :mod:`~pydiffbridge.solvers.rk`); with one output time the search runs to
``t[0] + t_max``.

Gradients w.r.t. the output times ``t`` (direct backprop): as in
:func:`~pydiffbridge.solvers.rk.solve_adaptive`, time runs as ``tau = t - t[0]`` in floats and
the tensor ``t[0]`` re-enters through every time argument of ``f`` (``fct`` maps the time
tensors the schemes build, those of the Jacobian helper included, to ``t[0] + (tt - t0)``)
and through the output fractions, so that ``d/dt_j`` and ``d/dt_0`` flow.  A user ``jac`` is
called with the plain float time: its ``J`` carries no ``t`` graph (it enters only the
linear algebra of the step, as ``J`` from finite differences does).

The test-only option ``fixed_step=h`` takes steps of exactly ``h`` (the last one shortened to
land on the final time) and accepts all of them; it exists to measure convergence orders.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from ..solution import Solution, Stats, Status
from .controller import Controller, error_ratio, initial_step
from .events import EventTracker
from .rk import max_steps_status, step_size_status

__all__ = ["run_stiff", "STIFF_HINT"]

STIFF_HINT = ("The problem may be singular here (or the Jacobian wrong: check options['jac']); "
              "try a larger rtol/atol, options={'jacobian': 'fd'}, or options={'min_step': ...}")


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / (x.numel() ** 0.5)


def run_stiff(f: Callable, y0: torch.Tensor, t: torch.Tensor, make_scheme: Callable, rtol: Any,
              atol: Any, norm: Callable | None, opts: dict, method: str,
              event_fn: Callable | None = None, t_max: float = math.inf, *,
              _event_grad: bool = False) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` on the flat ``y0`` and report at ``t``.

    ``make_scheme(fct, fc, tdtype)`` builds the scheme; ``fct(t_tensor, y)`` and
    ``fc(t_float, y)`` are the counting right-hand sides.  Returns a :class:`Solution` whose
    ``status`` says why it stopped (rows never reached are NaN), never raising on numerical
    trouble.  With ``event_fn`` the solve stops at the first zero crossing (status ``EVENT``,
    ``ys = [y0, y(event_t)]``) or ends with status ``FAILED``; it searches up to ``t[-1]``, or
    to ``t[0] + t_max`` when ``t`` has one element.  (``_event_grad``: the loop runs without
    autograd but the event location keeps it, for the parameters of ``event_fn``.)
    """
    norm = norm or _rms
    ts = [float(v) for v in t.tolist()]
    m, t0 = len(ts), ts[0]
    t_end = ts[-1] if m > 1 else (t0 + t_max if event_fn is not None else t0)
    direction = 1.0 if t_end >= t0 else -1.0
    tdtype = opts.get("dtype") or t.dtype
    dev = y0.device
    nfe = [0]
    # gradients w.r.t. t: every time argument of f is t[0] + (tt - t0) (see the module doc)
    tgrad = t.requires_grad and torch.is_grad_enabled()
    t_first = t[0].to(tdtype) if tgrad else None

    def fct(tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        nfe[0] += 1
        return f(t_first + (tt - t0) if tgrad else tt, yy)

    def fc(tt: float, yy: torch.Tensor) -> torch.Tensor:
        if tgrad:
            nfe[0] += 1
            return f(t_first + torch.scalar_tensor(tt - t0, dtype=tdtype, device=dev), yy)
        return fct(torch.scalar_tensor(tt, dtype=tdtype, device=dev), yy)

    if torch.is_grad_enabled() and not y0.requires_grad and not tgrad and t_end != t0:
        # build autograd graphs only when something upstream needs them: y0, t or a
        # parameter of f (seen by one evaluation, counted in nfe); the event location keeps
        # autograd for the parameters of event_fn
        if not fc(t0, y0.detach()).requires_grad:
            with torch.no_grad():
                sol = run_stiff(f, y0, t, make_scheme, rtol, atol, norm, opts, method,
                                event_fn, t_max, _event_grad=event_fn is not None)
            sol.stats.nfe += 1
            return sol
    scheme = make_scheme(fct, fc, tdtype)
    events = (EventTracker(event_fn, tdtype, dev, t0, y0, t_first=t_first)
              if event_fn is not None else None)
    stats = Stats()
    max_steps = int(opts.get("max_num_steps", 100_000))
    min_step = float(opts.get("min_step", 0.0))
    max_step = float(opts.get("max_step", math.inf))
    fixed = opts.get("fixed_step")
    ctrls: dict[int, Controller] = {}

    def controller(order: int) -> Controller:
        if order not in ctrls:
            ctrls[order] = Controller(order=order, safety=float(opts.get("safety", 0.9)),
                                      ifactor=float(opts.get("ifactor", scheme.ifactor)),
                                      dfactor=float(opts.get("dfactor", scheme.dfactor)))
        return ctrls[order]

    outputs: list[torch.Tensor | None] = [None] * m
    outputs[0] = y0
    out_idx, tc, y = 1, t0, y0
    status, message = Status.SUCCESS, ""
    span = abs(t_end - t0) if math.isfinite(t_end) else max(abs(t0), 1.0)
    h, f0 = 0.0, None
    last_nonfinite = last_rejected = False
    while t_end != t0 and (t_end - tc) * direction > 0:
        trouble = max_steps_status(stats.steps, max_steps, tc, h, t_end)
        if trouble is not None:
            status, message = trouble
            break
        if f0 is None:  # a new step start
            f0 = scheme.start(tc, y)
            if f0 is None:
                status = Status.NONFINITE
                message = (f"func or its Jacobian returned NaN/Inf at t={tc:.6g} "
                           f"(step {stats.steps}, method {method!r})")
                break
            if h == 0.0:
                if fixed is not None:
                    h = abs(float(fixed))
                elif opts.get("first_step") is not None:
                    h = abs(float(opts["first_step"]))
                else:
                    with torch.no_grad():
                        h = initial_step(fc, t0, y.detach(), f0.detach(), direction,
                                         scheme.order, rtol, atol, norm)
                    h = min(h, span)
                h = min(max(h, min_step), max_step)
        hit = abs(t_end - tc) <= h * (1 + 1e-12)
        hs = (t_end - tc) if hit else direction * h
        t1 = t_end if hit else tc + hs
        order = scheme.order
        res = scheme.attempt(tc, y, hs, f0)
        stats.steps += 1
        failed = res is None
        if not failed:
            y1, err, st = res
            with torch.no_grad():
                finite = bool(torch.isfinite(y1).all())
                ratio = error_ratio(err, y, y1, rtol, atol, norm) if finite else math.inf
                finite = finite and math.isfinite(ratio)
        else:
            finite, ratio = True, math.inf
        if fixed is not None and not (finite and not failed):
            status = Status.NONFINITE if not failed else Status.FAILED
            message = (f"the solution became NaN/Inf at t={t1:.6g}" if not failed else
                       f"the implicit stages did not converge at t={tc:.6g} (fixed_step)")
            break
        accept = not failed and finite and (fixed is not None or ratio <= 1.0
                                            or abs(hs) <= min_step * (1 + 1e-12))
        if accept:
            stats.accepted += 1
            j0 = out_idx
            while out_idx < m and (ts[out_idx] - t1) * direction <= 0:
                out_idx += 1
            if out_idx > j0:
                if tgrad:  # keep d/dt_j and d/dt_0 (see the module doc)
                    s = ((t[j0:out_idx] - t[0]).to(y.dtype) - (tc - t0)) / hs
                else:
                    s = (t[j0:out_idx].detach().to(y.dtype) - tc) / hs
                rows = scheme.dense(s, tc, y, y1, hs, st).unbind(0)
                for i, j in enumerate(range(j0, out_idx)):
                    outputs[j] = y1 if ts[j] == t1 and not tgrad else rows[i]
            if events is not None:
                with torch.enable_grad() if _event_grad else contextlib.nullcontext():
                    ev = events.check_step(tc, t1, hs, y1, _dense_of(scheme, tc, y, y1, hs, st))
                if ev is not None:
                    event_t, y_ev = ev
                    return Solution(ys=torch.stack([y0, y_ev]),
                                    ts=torch.stack([t[0], event_t.to(t.dtype)]),
                                    stats=_stats(stats, nfe, scheme), status=Status.EVENT,
                                    event_t=event_t, method=method)
            tc, y, f0 = t1, y1, None
            last_nonfinite = False
        else:
            stats.rejected += 1
            last_nonfinite = not finite
        if fixed is not None:
            continue
        if failed:
            h_new = abs(hs) * scheme.fail_factor
        else:
            h_new = controller(order).next_step(abs(hs), ratio, accept)
            if accept and last_rejected:  # no growth right after a rejection (as RODAS, RADAU5)
                h_new = min(h_new, abs(hs))
        last_rejected = not accept
        h = min(max(scheme.next_h(abs(hs), h_new, accept), min_step), max_step)
        trouble = step_size_status(h, tc, span, last_nonfinite, STIFF_HINT,
                                   what="the step produced")
        if trouble is not None:
            status, message = trouble
            message = f"{message} (method {method!r})"
            break
    if events is not None and status == Status.SUCCESS:
        status, message = Status.FAILED, f"the event function never crossed zero up to t={tc:.6g}"
    nan = torch.full_like(y0, float("nan"))
    ys = torch.stack([o if o is not None else nan for o in outputs])
    return Solution(ys=ys, ts=t, stats=_stats(stats, nfe, scheme), status=status,
                    message=message, method=method)


def _stats(stats: Stats, nfe: list, scheme) -> Stats:
    stats.nfe = nfe[0]
    for k, v in scheme.stats_extra().items():
        setattr(stats, k, v)
    return stats


def _detached(x):
    """``x`` (a tensor, or a tuple of tensors and tags such as a scheme's stages) detached."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple | list):
        return type(x)(_detached(v) for v in x)
    return x


def _dense_of(scheme, tc: float, y, y1, hs: float, st) -> Callable:
    """The step's dense output as :meth:`EventTracker.check_step` takes it:
    ``dense(theta, detach=False)``, the state at the fraction ``theta`` (a 0-d tensor)."""
    cache: list = []

    def dense(theta: torch.Tensor, detach: bool = False) -> torch.Tensor:
        s = theta.reshape(1).to(y.dtype)
        if not detach:
            return scheme.dense(s, tc, y, y1, hs, st)[0]
        if not cache:
            cache.append((y.detach(), y1.detach(), _detached(st)))
        yd, y1d, std = cache[0]
        return scheme.dense(s, tc, yd, y1d, hs, std)[0]

    return dense
