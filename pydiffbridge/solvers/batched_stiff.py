"""Per-sample adaptive stepping with the stiff methods (``batch_dims`` with
``rosenbrock23``, ``rodas4``, ``rodas5`` and ``kvaerno5``, whose step is in
:mod:`~pydiffbridge.solvers.batched_esdirk`): every sample of a ``(B, n)`` batch gets its own
time, step size, accept/reject decision, error norm, status and stats, as in the explicit
per-sample loop (:mod:`~pydiffbridge.solvers.batched`).

Each iteration computes, for the whole batch at once, ``f``, the per-sample Jacobians
``J_b = df_b/dy_b`` (shape ``(B, n, n)``; ``n`` batched vector-Jacobian products, see
:class:`BatchedDerivatives`) and ``df/dt``, then one batched LU of ``I/(h_b gamma) - J_b``
with each sample's own step, and the stages of :mod:`~pydiffbridge.solvers.rosenbrock` (the
same step functions, with per-sample ``h``).  ``func`` is always called on the whole batch (it
may hold per-sample data): a sample that no longer steps (finished or failed) sits at its
state with stage time increments 0 and stage increments zeroed (its LU uses its last step
length, so that nothing in it is singular).  A rejected sample retries from the same point
with a smaller step while the others go on.

Output times: a step never passes more than ``max_outputs_per_step`` pending output times
(default 8; it lands on the last of them); their rows come from the method's dense output.
The step-size control is :class:`~pydiffbridge.solvers.controller.Controller`'s I controller
per sample, with RODAS's limits (growth ≤ 6, shrinkage ≥ 0.2, no growth right after a
rejection).  The test-only option ``fixed_step=h`` (as in
:mod:`~pydiffbridge.solvers.stiff_loop`) takes steps of exactly ``h`` and accepts them all.

Gradients: direct backprop through the whole loop (the Jacobians keep their graph: by
``torch.func`` where ``func`` allows it, else on the tape).  Gradients w.r.t. the output
times ``t`` flow as in the single-solve loop (:mod:`~pydiffbridge.solvers.stiff_loop`): time
runs detached, and each sample's ``t[b, 0]`` re-enters every time ``func`` sees (as
``t[b, 0] + (tau - tau_0)``, the Jacobian helper's included) and the output fractions, which
also carry ``t[b, j]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError, UnknownOptionError
from ..solution import Solution, Stats, Status
from .batched import _message, record_step
from .batched_auto import AutoStep
from .batched_implicit import BatchedDerivatives, ImplicitStep
from .batched_step import per_sample_initial_step, per_sample_rms

__all__ = ["solve_batched_stiff", "BATCHED_STIFF_OPTIONS", "BATCHED_STIFF_METHODS",
           "BatchedDerivatives"]

RUNNING = -1
BATCHED_STIFF_METHODS = ("rosenbrock23", "rodas4", "rodas5", "kvaerno5", "auto")
BATCHED_STIFF_OPTIONS = frozenset({
    "dtype", "max_num_steps", "first_step", "min_step", "max_step", "safety", "ifactor",
    "dfactor", "max_outputs_per_step", "jac", "jacobian", "autonomous", "fixed_step",
    "newton_tol", "max_iters", "stiff_method", "stiff_detect", "nonstiff_detect"})
#: the options only kvaerno5 takes (its Newton iterations)
ESDIRK_ONLY = frozenset({"newton_tol", "max_iters"})
#: the options only method="auto" takes (its stiffness switching)
AUTO_ONLY = frozenset({"stiff_method", "stiff_detect", "nonstiff_detect"})


def solve_batched_stiff(f: Callable, y0: torch.Tensor, t_out: torch.Tensor, method: str,
                        rtol: Any, atol: Any, opts: dict, parts: list[int] | None = None,
                        tdtype: torch.dtype = torch.float64,
                        record: list | None = None) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` for ``y0`` of shape ``(B, n)``, each sample with its own
    steps, with a Rosenbrock method, ``kvaerno5`` or ``auto``; the contract of
    :func:`~pydiffbridge.solvers.batched.solve_batched` (``ys`` of shape ``(m, B, n)``,
    per-sample stats and status tensors, never an exception on numerical trouble).
    ``record``: a list that receives every step's dense output
    (:func:`~pydiffbridge.solvers.batched.record_step`)."""
    bad = sorted(set(opts) & ESDIRK_ONLY) if method != "kvaerno5" else []
    if bad:
        raise UnknownOptionError(f"option(s) {bad} are kvaerno5's (Newton iterations); "
                                 f"method {method!r} does not take them")
    bad = sorted(set(opts) & AUTO_ONLY) if method != "auto" else []
    if bad:
        raise UnknownOptionError(f"option(s) {bad} are method='auto''s (stiffness switching); "
                                 f"method {method!r} does not take them")
    if method not in BATCHED_STIFF_METHODS:
        raise InputError(f"per-sample stiff stepping (batch_dims) runs "
                         f"{', '.join(BATCHED_STIFF_METHODS)}; got method {method!r}")
    if y0.is_complex():
        raise InputError(f"method {method!r} needs a real state, got {y0.dtype}")
    B, n = y0.shape
    m = t_out.shape[1]
    dev = y0.device
    T = t_out.detach().to(torch.float64)
    tgrad = t_out.requires_grad and torch.is_grad_enabled()
    T0g = t_out[:, 0].to(torch.float64) if tgrad else None

    def when(tt: torch.Tensor) -> torch.Tensor:  # the times func sees
        return (T0g + (tt - T[:, 0]) if tgrad else tt).to(tdtype)
    t0, t_end = T[:, 0], T[:, -1]
    direction = torch.where(t_end >= t0, 1.0, -1.0).to(torch.float64)
    calls = [0]

    def fc(tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return f(when(tt), yy)

    inner = opts.get("stiff_method", "rodas5") if method == "auto" else method
    derivs = BatchedDerivatives(lambda tt, yy: f(when(tt), yy),
                                {**opts, "autonomous": True} if inner == "kvaerno5" else opts,
                                inner)
    eye = torch.eye(n, dtype=y0.dtype, device=dev)
    if method == "auto":
        scheme: Any = AutoStep(fc, derivs, opts, rtol, atol, parts, eye, y0, tdtype)
    else:
        scheme = ImplicitStep(method, fc, derivs, opts, rtol, atol, parts, eye)
    g = lambda k, d: float(opts.get(k, d))  # noqa: E731
    safety, dfactor = g("safety", 0.9), g("dfactor", 0.2)
    ifactor = g("ifactor", 5.0 if method == "kvaerno5" else 6.0)  # (the single solves')
    min_step, max_step = g("min_step", 0.0), g("max_step", math.inf)
    max_steps = int(opts.get("max_num_steps", 100_000))
    fixed = opts.get("fixed_step")
    kmax = max(1, min(m - 1, int(opts.get("max_outputs_per_step", 8))))
    h_floor = 10 * torch.finfo(torch.float64).eps * torch.maximum(
        (t_end - t0).abs(), torch.maximum(t0.abs(), t_end.abs()))

    status = torch.where(t_end != t0, RUNNING, int(Status.SUCCESS))
    nsteps = torch.zeros(B, dtype=torch.long, device=dev)
    nacc, nfe = nsteps.clone(), nsteps.clone()
    if torch.is_grad_enabled() and not y0.requires_grad and not tgrad:
        # build graphs only when something upstream needs them (y0 or a parameter of f, seen
        # by one evaluation, counted)
        probe = f(t0.to(tdtype), y0)
        if not probe.requires_grad:
            with torch.no_grad():
                sol = solve_batched_stiff(f, y0, t_out, method, rtol, atol, opts, parts, tdtype)
            sol.stats.nfe += 1
            return sol
    ys = torch.full((m * B + kmax * B, n), float("nan"), dtype=y0.dtype, device=dev)
    ys[:B] = y0
    ar = torch.arange(B, device=dev)
    jk = torch.arange(kmax, device=dev)[None, :]
    spare = m * B + jk * B + ar[:, None]
    idx = torch.ones(B, dtype=torch.long, device=dev)
    tc, y = t0.clone(), y0
    h = h_safe = None
    last_rejected = torch.zeros(B, dtype=torch.bool, device=dev)
    last_nonfinite = last_rejected.clone()
    while True:
        running = status == RUNNING
        if not bool(running.any()):
            break
        c0 = calls[0] + derivs.calls
        f0, ok = scheme.start(tc, y, running)
        status = torch.where(running & ~ok, int(Status.NONFINITE), status)
        running = status == RUNNING
        if h is None:
            if fixed is not None or opts.get("first_step") is not None:
                first = fixed if fixed is not None else opts["first_step"]
                h = torch.full((B,), abs(float(first)), dtype=torch.float64, device=dev)
            else:
                with torch.no_grad():
                    h = per_sample_initial_step(fc, lambda x: per_sample_rms(x, parts),
                                                float(torch.as_tensor(scheme.order).max()),
                                                rtol, atol, t0, y.detach(), f0.detach(),
                                                direction)
                h = torch.minimum(h, (t_end - t0).abs())
            h = torch.clamp(h, min=min_step, max=max_step)
            h = torch.where(h > 0, h, 1.0)
            h_safe = h.clone()
        stop = T.gather(1, torch.clamp(idx + (kmax - 1), max=m - 1)[:, None])[:, 0]
        rem = stop - tc
        hit = rem.abs() <= h * (1 + 1e-12)
        hs = torch.where(running, torch.where(hit, rem, direction * h), 0.0)
        t1 = torch.where(hit, stop, tc + hs)
        hl = torch.where(running & (hs != 0), hs, direction * h_safe)  # the algebra's step
        hcol = hl.to(y0.dtype)[:, None]
        order = scheme.order  # (of the method that takes this step: per sample for auto)
        y1, ratio, st, converged = scheme.attempt(tc, y, f0, hs, hl, running)
        with torch.no_grad():
            finite = torch.isfinite(y1).all(1) & torch.isfinite(ratio)
            if converged is not None:
                finite_conv = finite & converged
            else:
                finite_conv = finite
            small = hs.abs() <= min_step * (1 + 1e-12)
            accept = running & finite_conv & ((ratio <= 1.0) | small | (fixed is not None))
        nsteps += running
        nacc += accept
        nfe += running * (calls[0] + derivs.calls - c0)
        # dense output at the pending output times inside (tc, t1]
        oi = idx[:, None] + jk
        tj = T.gather(1, torch.clamp(oi, max=m - 1))
        within = accept[:, None] & (oi < m) & ((tj - t1[:, None]) * direction[:, None] <= 0)
        if bool(within.any()):
            hsafe = torch.where(hs == 0, 1.0, hs)
            if tgrad:  # d/dt[b, j] and d/dt[b, 0] through the fraction
                tjg = t_out.to(torch.float64).gather(1, torch.clamp(oi, max=m - 1))
                theta = ((tjg - T0g[:, None]) - (tc - t0)[:, None]) / hsafe[:, None]
            else:
                theta = (tj - tc[:, None]) / hsafe[:, None]
            vals = scheme.dense(theta.to(y0.dtype)[:, :, None], y, y1, hcol, st)
            if not tgrad:
                vals = torch.where((tj == t1[:, None])[..., None], y1[:, None, :], vals)
            rows = torch.where(within, oi * B + ar[:, None], spare)
            ys.index_copy_(0, rows.reshape(-1), vals.reshape(-1, n))
            idx = idx + within.sum(1)
        if record is not None:
            with torch.no_grad():
                record_step(record, tc, hs, accept, lambda th, y=y, y1=y1, hc=hcol, st=st:
                            scheme.dense(th.to(y.dtype)[:, :, None], y, y1, hc, st))
        tc = torch.where(accept, t1, tc)
        y = torch.where(accept[:, None], y1, y)
        with torch.no_grad():
            r = torch.where(finite, ratio, math.inf)
            fac = torch.where(r == 0, ifactor, safety * r ** (-1.0 / order))
            fac = torch.where(r < 1, torch.clamp(fac, 1.0, ifactor),
                              torch.clamp(fac, dfactor, 1.0))
            fac = torch.where(accept & last_rejected, torch.clamp(fac, max=1.0), fac)
            if converged is not None:  # a Newton failure: retry with half the step
                fac = torch.where(finite & ~converged, 0.5, fac)
            h_new = torch.clamp(hs.abs() * fac, min=min_step, max=max_step)
            if fixed is not None:  # a non-finite (or unconverged) step fails the sample
                h_new = torch.where(finite_conv, abs(float(fixed)), 0.0)
            last_rejected = torch.where(running, ~accept, last_rejected)
            last_nonfinite = torch.where(accept, False, last_nonfinite | (running & ~finite))
            new = torch.where(accept & (t1 == t_end), int(Status.SUCCESS), RUNNING)
            code = torch.where(last_nonfinite, int(Status.NONFINITE), int(Status.STEP_UNDERFLOW))
            new = torch.where((new == RUNNING) & (h_new < h_floor), code, new)
            new = torch.where((new == RUNNING) & (nsteps >= max_steps), int(Status.MAX_STEPS),
                              new)
            status = torch.where(running, new, status)
            h = torch.where(running & (hs != 0), h_new, h)
            h_safe = torch.where(running & (hs != 0), hs.abs(), h_safe)
        scheme.after(accept, running, h_new)  # (outside no_grad: it may keep f(t1, y1))
    out = ys[: m * B].reshape(m, B, n)
    stats = Stats(nfe=nfe, steps=nsteps, accepted=nacc, rejected=nsteps - nacc,
                  **scheme.stats())
    sol = Solution(ys=out, ts=t_out, stats=stats, status=status, backend="torch",
                   method=method)
    sol.message = _message(status, tc)
    return sol
