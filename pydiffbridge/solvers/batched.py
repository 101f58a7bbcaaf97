"""Per-sample adaptive stepping: every sample of a batch gets its own step size.

The state has a leading batch dimension ``B`` (flattened here to ``y`` of shape ``(B, n)``).
Each sample keeps its own time, step size, accept/reject decision, error norm (RMS over the
sample's components), status and stats; a sample that has finished (or failed) is masked
out: its step size is zero, so its state and time no longer change and its stats stop.

The loop is branch-free: every decision is a ``where`` on per-sample arrays, so on CUDA
nothing is copied to the host inside a step; the only host synchronisation is the "anyone
still running?" check every ``sync_every`` steps (default 1 on CPU, where it is free, and 8
on CUDA).  The per-sample bookkeeping (times, step sizes, decisions, stats) is written once
against an array namespace: torch tensors on the device, NumPy arrays on the CPU, where an
op on a ``(B,)`` vector costs a fraction of a torch op and reading a value is free (so steps
that pass no output time skip the dense-output work; a step in which no sample finished or
failed skips the status update).  The step itself is in
:mod:`~pydiffbridge.solvers.batched_step`; without autograd everything it touches, stage times
and step sizes included, lives in buffers made once per solve.

Dense output reuses :func:`~pydiffbridge.solvers.interp.interp_weights`.  To stay branch-free
a step never covers more than ``max_outputs_per_step`` pending output times (default 8): a
step that would pass more lands on the last of them.  The final time is always landed on.

``func(t, y)`` receives ``t`` as a tensor of shape ``batch_shape`` (each sample's own time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..solution import Solution, Stats, Status
from .batched_step import _Batched, _namespace
from .tableaus import Tableau

__all__ = ["solve_batched", "BATCHED_OPTIONS"]

RUNNING = -1
BATCHED_OPTIONS = {"dtype", "max_num_steps", "first_step", "min_step", "max_step", "safety",
                   "ifactor", "dfactor", "pcoeff", "icoeff", "dcoeff", "sync_every",
                   "max_outputs_per_step", "compile"}


#: the step fractions at which :func:`record_step` samples a step's dense output: enough for
#: the polynomial of degree <= 5 of every dense output here
RECORD_NODES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def record_step(record: list, tc, hs, accept, dense: Callable) -> None:
    """Append one step to ``record``: ``(t_start, h, accepted, values)`` with ``values`` of
    shape ``(B, len(RECORD_NODES), n)`` = ``dense(theta)`` at the fractions
    :data:`RECORD_NODES` (``theta`` of shape ``(B, k)``); only accepted samples' rows are
    used.  Times and decisions may be NumPy arrays (the host path): they are copied."""
    acc = torch.as_tensor(np.array(accept) if isinstance(accept, np.ndarray) else accept)
    if not bool(acc.any()):
        return
    tct = torch.as_tensor(np.array(tc) if isinstance(tc, np.ndarray) else tc.clone())
    hst = torch.as_tensor(np.array(hs) if isinstance(hs, np.ndarray) else hs.clone())
    theta = torch.tensor(RECORD_NODES, dtype=torch.float64).expand(tct.shape[0], -1)
    vals = dense(theta.to(tct.device))
    record.append((tct.to(vals.device), hst.to(vals.device), acc.to(vals.device),
                   vals.detach().clone()))


def solve_batched(f: Callable, y0: torch.Tensor, t_out: torch.Tensor, tab: Tableau, rtol: Any,
                  atol: Any, opts: dict, parts: list[int] | None = None,
                  tdtype: torch.dtype = torch.float64, record: list | None = None) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` for ``y0`` of shape ``(B, n)``, each sample on its own.

    Args:
        f: ``f(t, y)`` with ``t`` of shape ``(B,)`` and ``y`` of shape ``(B, n)``.
        t_out: output times of shape ``(B, m)``, each row strictly monotonic.
        rtol, atol: floats or tensors broadcastable to ``(B, n)``.
        parts: component sizes of a tuple state (the error norm is the max of their RMS).
        record: a list that receives every step's dense output (:func:`record_step`).

    Returns:
        A :class:`Solution` with ``ys`` of shape ``(m, B, n)``, ``ts = t_out``, per-sample
        ``stats`` (integer tensors of shape ``(B,)``) and ``status`` (a tensor of codes).
    """
    B, n = y0.shape
    m = t_out.shape[1]
    dev = y0.device
    eng = _Batched(f, tab, y0, rtol, atol, opts, parts, tdtype)
    max_steps = int(opts.get("max_num_steps", 100_000))
    sync_every = int(opts.get("sync_every", 8 if dev.type == "cuda" else 1))
    tgrad = t_out.requires_grad and torch.is_grad_enabled()
    # on the CPU with a check every step, host access is free: the bookkeeping runs in NumPy
    # and steps that reach no output time skip the dense-output work
    host_free = dev.type == "cpu" and sync_every == 1 and not opts.get("compile") and not tgrad
    ns = _namespace(host_free, dev)
    xp, to_t, to_x = ns.xp, ns.to_t, ns.to_x
    kmax = max(1, min(m - 1, int(opts.get("max_outputs_per_step", 8))))
    if tab.interp == "hermite" and tab.order >= 5:
        kmax = 1  # third-order Hermite would spoil a high-order method: land on outputs
    step = eng.step
    if opts.get("compile"):
        step = torch.compile(eng.step, dynamic=False)
    ydt = y0.real.dtype if y0.is_complex() else y0.dtype

    T = t_out.to(torch.float64)
    Tx = to_x(T if tgrad else T.detach().contiguous())
    t0, t_end = Tx[:, 0], Tx[:, -1]
    direction = xp.where(t_end >= t0, 1.0, -1.0)
    # the step-size floor: ~10 ulp of the largest time a sample passes
    h_floor = 10 * torch.finfo(torch.float64).eps * xp.maximum(
        abs(t_end - t0), xp.maximum(abs(t0), abs(t_end)))
    c_col = to_x(torch.tensor(tab.c[: eng.s], dtype=torch.float64, device=dev)[:, None])

    nsteps = ns.full((B,), 0, torch.long)
    nacc = ns.full((B,), 0, torch.long)
    status = xp.where(t_end != t0, RUNNING, int(Status.SUCCESS))
    ar = xp.arange(B) if host_free else torch.arange(B, device=dev)
    dense = m > 2  # with only [t0, t_end] the end state is written once, after the loop
    if dense:
        # rows [0, m*B) hold the outputs (time-major); kmax*B spare rows absorb masked writes
        ys = torch.full((m * B + kmax * B, n), float("nan"), dtype=y0.dtype, device=dev)
        ys[:B] = y0
        idx = ns.full((B,), 1, torch.long)
        jk = (xp.arange(kmax) if host_free else torch.arange(kmax, device=dev))[None, :]
        spare = m * B + jk * B + ar[:, None]
    f0 = eng.f(to_t(t0).to(tdtype), y0)
    status = xp.where((status == RUNNING) & ~to_x(torch.isfinite(f0).all(1)),
                      int(Status.NONFINITE), status)
    running = status == RUNNING
    n_init = 1 + (running & (opts.get("first_step") is None))
    with torch.no_grad():
        if opts.get("first_step") is not None:
            h = ns.full((B,), abs(float(opts["first_step"])), torch.float64)
        else:
            h = to_x(eng.initial_step(to_t(t0), y0.detach(), f0.detach(),
                                      to_t(direction)).abs())
        h = xp.where(running, ns.clip(h, eng.min_step, eng.max_step), 0.0)
    prev = ns.full((B,), 1.0, torch.float64)
    prev2 = prev
    last_nonfinite = ns.full((B,), False, torch.bool)
    tc, y = t0, y0
    stop = t_end
    it = 0
    moved = True  # some output index moved: recompute the stop times
    cast_t = tdtype != torch.float64
    cast_y = ydt != torch.float64
    # host-side bookkeeping without autograd: stage times and step sizes are written into
    # tensors made once, through NumPy views (with autograd func could save them for backward)
    bufs = host_free and not torch.is_grad_enabled()
    if bufs:
        tst_t = torch.empty((eng.s, B), dtype=tdtype)
        tst_x, tst_rows = tst_t.numpy(), tst_t.unbind(0)
        hy_t = torch.empty((B, 1), dtype=ydt)
        hy_x = hy_t.numpy()[:, 0]
        acc_t = torch.empty((B, 1), dtype=torch.bool)
        acc_x = acc_t.numpy()[:, 0]
    fwd = bool((direction > 0).all()) if host_free else None
    lnf_any = False  # some sample's last attempt was non-finite (host path)
    quiet = False
    no_grad = torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        while True:
            if quiet:  # (host path) statuses did not change in the last step
                quiet = False
            elif it % sync_every == 0 and not bool(running.any()):
                break
            it += 1
            if dense and (moved or not host_free):
                # stop at the final time or at the kmax-th pending output time
                stop = ns.take(Tx, ns.clip(idx + (kmax - 1), None, m - 1)[:, None])[:, 0]
                if host_free:  # the next pending output: a cheap test for steps that pass none
                    t_next = ns.take(Tx, ns.clip(idx, None, m - 1)[:, None])[:, 0]
                moved = False
            # a sample that no longer runs has h = 0 and sits at its stop: hs = 0
            rem = stop - tc
            hit = abs(rem) <= h * (1 + 1e-12)
            hs = xp.where(hit, rem, direction * h)
            t1 = xp.where(hit, stop, tc + hs)
            t1_t = None if tab.fsal else to_t(t1)
            if bufs:
                np.add(tc, c_col * hs, out=tst_x, casting="same_kind")
                np.copyto(hy_x, hs, casting="same_kind")
                tst, hy = tst_rows, hy_t
                if cast_t and t1_t is not None:
                    t1_t = t1_t.to(tdtype)
            else:
                tst, hy = to_t(tc + c_col * hs), to_t(hs)[:, None]
                if cast_t:
                    tst, t1_t = tst.to(tdtype), None if tab.fsal else t1_t.to(tdtype)
                if cast_y:
                    hy = hy.to(ydt)
            y1, K, kend, ratio = step(tst, y, f0, hy, t1_t)
            ratio = to_x(ratio.to(torch.float64) if cast_y else ratio)
            accept = running & (ratio <= 1.0)
            if eng.min_step > 0:
                accept = accept | (running & xp.isfinite(ratio)
                                   & (abs(hs) <= eng.min_step * (1 + 1e-12)))
            nsteps += running
            nacc += accept
            # accepted samples whose new state is not finite: they fail here, no output
            # written.  A sum of finite values is finite unless it overflows: then look per
            # sample
            y1_ok = bufs and eng.scale.y1_sum_finite()
            bad = None if y1_ok else accept & ~to_x(torch.isfinite(y1).all(1))
            good = accept if y1_ok else accept & ~bad
            if dense and (not host_free or bool((good & (
                    (t_next <= t1) if fwd else ((t_next - t1) * direction <= 0))).any())):
                # the pending output times inside (tc, t1]
                oi = idx[:, None] + jk
                tj = ns.take(Tx, ns.clip(oi, None, m - 1))
                within = good[:, None] & (oi < m) & ((tj - t1[:, None])
                                                       * direction[:, None] <= 0)
                if kmax == 1:
                    vals = y1[:, None, :]
                else:
                    hsafe = xp.where(hs == 0, 1.0, hs)
                    theta = to_t((tj - tc[:, None]) / hsafe[:, None]).to(eng.P.dtype)
                    vals = torch.baddbmm(y[:, None, :], eng.weights(theta).to(K.dtype),
                                         K.transpose(0, 1))
                    vals = torch.where(to_t(tj == t1[:, None])[..., None],
                                       y1[:, None, :], vals)
                rows = xp.where(within, oi * B + ar[:, None], spare)
                ys.index_copy_(0, to_t(rows).reshape(-1), vals.reshape(-1, n))
                idx = idx + within.sum(1)
                moved = True
            if record is not None:
                record_step(record, tc, hs, good, lambda th, y=y, K=K: torch.baddbmm(
                    y[:, None, :], eng.weights(th.to(eng.P.dtype)).to(K.dtype),
                    K.transpose(0, 1)))
            # advance the accepted samples.  On the CPU, when every running sample is accepted
            # and every ratio is finite, y1 is y itself for the stopped samples (their h k rows
            # are exact zeros): no masking needed
            tc = xp.where(accept, t1, tc)
            ratio_ok = host_free and bool(np.isfinite(ratio).all())
            if ratio_ok and bool((accept | ~running).all()):
                y, f0 = y1, kend
                if bufs:
                    eng.accepted_all(y1)
            elif bufs:  # y1's buffer row becomes the new state, rejected samples put back
                np.copyto(acc_x, accept)
                y = eng.keep_rejected(acc_t, y1, y)
                f0 = torch.where(acc_t, kend, f0)
            else:
                a2 = to_t(accept)[:, None]
                y = torch.where(a2, y1, y)
                f0 = torch.where(a2, kend, f0)
            with no_grad:
                h_new = eng.next_h(ns, abs(hs), ratio, prev, prev2, ratio_ok)
                if eng.p or eng.d:
                    prev2 = xp.where(accept, prev, prev2)
                    prev = xp.where(accept, ns.clip(ratio, 1e-10, None), prev)
                if (y1_ok and ratio_ok and not lnf_any and it < max_steps
                        and not bool((accept & (t1 == t_end)).any())
                        and not bool((running & (h_new < h_floor)).any())):
                    # nothing finished or failed: statuses stand (the quiet, common step)
                    h = xp.where(running, h_new, 0.0)
                    quiet = True
                    continue
                # status codes, in order of precedence: done, non-finite, underflow, max steps
                if bad is None:
                    bad = xp.zeros_like(accept)
                last_nonfinite = xp.where(accept, bad, last_nonfinite | ~xp.isfinite(ratio))
                new = xp.where(accept & (t1 == t_end), int(Status.SUCCESS), RUNNING)
                code = xp.where(last_nonfinite, int(Status.NONFINITE),
                                int(Status.STEP_UNDERFLOW))
                new = xp.where(bad | (h_new < h_floor), code, new)
                new = xp.where((new == RUNNING) & (nsteps >= max_steps), int(Status.MAX_STEPS),
                               new)
                status = xp.where(running, new, status)
                running = status == RUNNING
                h = xp.where(running, h_new, 0.0)
                if host_free:
                    lnf_any = bool(last_nonfinite.any())
    status, nsteps, nacc = to_t(status), to_t(nsteps), to_t(nacc)
    if dense:
        out = ys[: m * B].reshape(m, B, n)
    else:
        done = (status == int(Status.SUCCESS))[:, None]
        out = torch.stack([y0, torch.where(done, y, torch.full_like(y, float("nan")))])
    # evaluations: f0 (+ the initial-step probe), s-1 per step, and for non-FSAL tableaux
    # f(t1, y1) once per accepted step (per attempted step when the error needs it)
    nfe = to_t(n_init) + (eng.s - 1) * nsteps
    if not tab.fsal:
        nfe = nfe + (nsteps if eng.err_needs_end else nacc)
    stats = Stats(nfe=nfe, steps=nsteps, accepted=nacc, rejected=nsteps - nacc)
    sol = Solution(ys=out, ts=t_out, stats=stats, status=status, backend="torch",
                   method=tab.name)
    sol.message = _message(status, to_t(tc))
    return sol


_WHY = {Status.MAX_STEPS: "reached max_num_steps (raise options['max_num_steps'] or loosen "
                          "rtol/atol)",
        Status.STEP_UNDERFLOW: "step size underflow (stiff or singular: loosen rtol/atol or use "
                               "a stiff method on backend='scipy')",
        Status.NONFINITE: "func produced NaN/Inf and the step size shrank without avoiding it"}


def _message(status: torch.Tensor, tc: torch.Tensor) -> str:
    bad = torch.nonzero(status != int(Status.SUCCESS)).reshape(-1).tolist()
    if not bad:
        return ""
    parts = [f"sample {b}: {_WHY.get(Status(int(status[b])), 'failed')} at t={float(tc[b]):.6g}"
             for b in bad[:5]]
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    return f"{len(bad)} of {status.numel()} samples failed: " + "; ".join(parts) + more
