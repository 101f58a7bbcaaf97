"""Terminal events with fixed-grid methods (torchdiffeq's ``FixedGridODESolver
.integrate_until_event``, with every fixed method of the torch backend).

Steps of ``options["step_size"]`` go from ``t[0]`` in the direction of the search (the sign of
``options["t_max"]``, or of ``t[-1] - t[0]`` when ``t`` has an end) until the event function
changes sign between two grid points; the root is then located on the step's interpolant
(linear, or cubic Hermite with ``interp="cubic"``) and made differentiable as for adaptive
steps (:class:`~pydiffbridge.solvers.events.EventTracker`).  The search ends, unsuccessfully,
at the end of ``t`` or of ``t_max``, or after ``max_num_steps`` steps (default 20000, the
limit torchdiffeq hard-codes).  A ``grid_constructor`` instead of ``step_size`` gives the grid
of a finite search interval ``[t[0], t[-1]]`` (or ``[t[0], t[0] + t_max]``).

Unlike torchdiffeq, which calls no callback while it looks for an event on a fixed grid,
``callback_step`` runs before every step here as it does without an event.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from ..errors import InputError
from ..solution import Solution, Stats, Status
from .events import EventTracker
from .fixed import FixedStepper, GridTime, grid_times, hermite, make_grid
from .tableaus import Tableau

__all__ = ["solve_fixed_until_event", "solve_fixed_event", "DEFAULT_EVENT_STEPS"]

#: torchdiffeq's ``max_itrs`` of its fixed-grid event search
DEFAULT_EVENT_STEPS = 20_000


def _search_grid(st: FixedStepper, y0, t: torch.Tensor, tgrad: bool, t_first) -> Iterator:
    """The grid times of the search, lazily (the grid of ``step_size`` is unbounded)."""
    opts = st.opts
    ts = [float(v) for v in t.tolist()]
    t0 = ts[0]
    t_end = ts[-1] if len(ts) > 1 else t0 + float(opts.get("t_max", math.inf))
    direction = 1.0 if t_end >= t0 else -1.0
    step = opts.get("step_size")
    if step is None:
        if opts.get("grid_constructor") is None:
            raise InputError(
                f"event handling with the fixed-grid method {st.method!r} needs options"
                "['step_size'] (as torchdiffeq's odeint_event: 'Event handling for fixed step "
                "solvers currently requires `step_size` to be provided in options'), or a "
                "grid_constructor with a finite search interval; or use an adaptive method "
                "such as 'dopri5'")
        if not math.isfinite(t_end):
            raise InputError(
                "event handling with options['grid_constructor'] needs a finite search "
                "interval: pass t=[t0, t_end] or options['t_max'], or use options['step_size']")
        tt = t if len(ts) > 1 else torch.stack([t[0], t[0] + (t_end - t0)])
        grid_t = make_grid(st.f, y0, tt, opts)
        grid_t = grid_t.to(st.tdtype) if tgrad else grid_t.detach()
        yield from grid_times(grid_t, tgrad)
        return
    h = direction * abs(float(step))
    k = 0
    while True:
        v = t0 + k * h
        last = (v - t_end) * direction >= 0
        if last:
            v = t_end
        if tgrad:
            x = t[-1].to(st.tdtype) if (last and len(ts) > 1) else t_first + (v - t0)
        else:
            x = v
        yield GridTime(v, x)
        if last:
            return
        k += 1


def solve_fixed_until_event(f: Callable, y0: torch.Tensor, t: torch.Tensor, method: str,
                            tab: Tableau | None, opts: dict, norm: Callable, rtol, atol,
                            event_fn: Callable) -> Solution:
    """:func:`~pydiffbridge.solvers.fixed.solve_fixed`'s arguments: step on the fixed grid from
    ``t[0]`` until ``event_fn`` crosses zero."""
    tdtype = opts.get("dtype") or t.dtype
    tgrad = t.requires_grad and torch.is_grad_enabled()
    st = FixedStepper(f, y0, method, tab, opts, norm, rtol, atol, tdtype)
    return solve_fixed_event(st, y0, t, event_fn, tgrad)


def solve_fixed_event(st: FixedStepper, y0: torch.Tensor, t: torch.Tensor, event_fn: Callable,
                      tgrad: bool) -> Solution:
    """Step on the fixed grid until ``event_fn`` crosses zero; ``ys = [y0, y(event_t)]``."""
    t0 = float(t.detach()[0])
    t_first = t[0].to(st.tdtype) if tgrad else None
    max_steps = int(st.opts.get("max_num_steps", DEFAULT_EVENT_STEPS))
    tracker = EventTracker(event_fn, st.tdtype, y0.device, t0, y0, t_first=t_first)
    stats = Stats()
    grid = _search_grid(st, y0, t, tgrad, t_first)
    ta = next(grid)
    y, f0 = y0, None
    status, message = Status.FAILED, ""
    for tb in grid:
        if stats.steps >= max_steps:
            status = Status.MAX_STEPS
            message = (f"reached max_num_steps={max_steps} at t={ta.f:.6g} before the event "
                       "function crossed zero")
            break
        y1, f0 = st.advance(ta, tb, y, f0, stats)
        if not bool(torch.isfinite(y1).all()):
            status, message = Status.NONFINITE, f"the solution became NaN/Inf at t={tb.f:.6g}"
            break
        f1 = st.end_slope(ta, tb, y1)
        ev = tracker.check_step(ta.f, tb.f, tb.f - ta.f, y1, _dense(st.cubic, ta, tb, y, f0, y1,
                                                                   f1))
        if ev is not None:
            event_t, y_ev = ev
            stats.nfe = st.nfe
            return Solution(ys=torch.stack([y0, y_ev]),
                            ts=torch.stack([t[0], event_t.to(t.dtype)]), stats=stats,
                            status=Status.EVENT, event_t=event_t)
        ta, y = tb, y1
        f0 = st.carried(f1)
    else:
        message = f"the event function never crossed zero up to t={ta.f:.6g}"
    stats.nfe = st.nfe
    nan = torch.full_like(y0, float("nan"))
    return Solution(ys=torch.stack([y0] + [nan] * (len(t) - 1)), ts=t, stats=stats,
                    status=status, message=message)


def _dense(cubic: bool, ta: GridTime, tb: GridTime, y, f0, y1, f1):
    """The step's interpolant ``dense(theta, detach=False)`` for the event tracker."""
    h = tb.x - ta.x

    def dense(theta, detach=False):
        if detach:
            yy, yy1 = y.detach(), y1.detach()
            hh = h.detach() if isinstance(h, torch.Tensor) else h
        else:
            yy, yy1, hh = y, y1, h
        if cubic:
            if detach:
                return hermite(theta, hh, yy, f0.detach(), yy1, f1.detach())
            return hermite(theta, hh, yy, f0, yy1, f1)
        return yy + theta * (yy1 - yy)

    return dense
