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
that pass no output time skip the dense-output work).  The stage matrix holds ``h_b k_i``:
every stage combination is one ``addmv`` on a reused buffer.

Dense output reuses :func:`~pydiffbridge.solvers.interp.interp_weights`.  To stay branch-free
a step never covers more than ``max_outputs_per_step`` pending output times (default 8): a
step that would pass more lands on the last of them.  The final time is always landed on.

``func(t, y)`` receives ``t`` as a tensor of shape ``batch_shape`` (each sample's own time).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..solution import Solution, Stats, Status
from .controller import error_scale
from .interp import interp_weights
from .tableaus import Tableau

__all__ = ["solve_batched", "BATCHED_OPTIONS"]

RUNNING = -1
BATCHED_OPTIONS = {"dtype", "max_num_steps", "first_step", "min_step", "max_step", "safety",
                   "ifactor", "dfactor", "pcoeff", "icoeff", "dcoeff", "sync_every",
                   "max_outputs_per_step", "compile"}


class _Batched:
    """One solve's constants and its (pure) step function."""

    def __init__(self, f: Callable, tab: Tableau, y0: torch.Tensor, rtol, atol, opts: dict,
                 parts: list[int] | None, tdtype: torch.dtype):
        self.f, self.tab, self.s = f, tab, tab.stages
        kw = dict(dtype=y0.real.dtype if y0.is_complex() else y0.dtype, device=y0.device)
        self.a = [torch.tensor(r, **kw) if r else None for r in tab.a]
        self.b = torch.tensor(tab.b, **kw)
        self.e = torch.tensor(tab.e, **kw)
        self.e_rms = self.e / math.sqrt(y0.shape[1])  # the error weights of the plain RMS norm
        self.e3 = torch.tensor(tab.e3, **kw) if tab.e3 is not None else None
        self.c, self.rtol, self.atol, self.parts, self.tdtype = tab.c, rtol, atol, parts, tdtype
        self.err_needs_end = len(tab.e) > self.s
        g = lambda k, d: float(opts.get(k, d))  # noqa: E731
        self.safety, self.ifactor, self.dfactor = g("safety", 0.9), g("ifactor", 10.0), \
            g("dfactor", 0.2)
        self.p, self.i, self.d = g("pcoeff", 0.0), g("icoeff", 1.0), g("dcoeff", 0.0)
        self.min_step, self.max_step = g("min_step", 0.0), g("max_step", math.inf)
        # every dense-output weight is a polynomial of degree <= 5 in theta: fit its
        # coefficients once from interp_weights so a step's weights are one matmul
        nodes = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
        V = nodes[:, None] ** torch.arange(6, dtype=torch.float64)
        self.P = torch.linalg.solve(V, interp_weights(tab, nodes)).to(**kw)
        self.pows = torch.arange(6, device=y0.device, dtype=kw["dtype"])
        self._K: torch.Tensor | None = None

    def weights(self, theta: torch.Tensor) -> torch.Tensor:
        """``interp_weights(tab, theta)`` from the fitted coefficients."""
        return (theta[..., None] ** self.pows) @ self.P

    def fc(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f(t.to(self.tdtype), y)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample RMS (max over the parts of a tuple state): ``(B, n) -> (B,)``."""
        x = x.abs() if x.is_complex() else x
        if self.parts is None:
            return torch.linalg.vector_norm(x, dim=1).mul_(1 / math.sqrt(x.shape[1]))
        return torch.stack([torch.linalg.vector_norm(p, dim=1) / math.sqrt(p.shape[1])
                            for p in torch.split(x, self.parts, dim=1)]).amax(0)

    def initial_step(self, t0, y0, f0, direction):
        """Hairer I, Sec. II.4 (a)-(f), per sample; one evaluation of ``f``."""
        sc = y0.abs() * self.rtol + self.atol
        d0, d1 = self.norm(y0 / sc), self.norm(f0 / sc)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        h0 = h0.to(t0.dtype)
        f1 = self.fc(t0 + direction * h0, y0 + (direction * h0).to(y0.dtype)[:, None] * f0)
        d2 = self.norm((f1 - f0) / sc).to(t0.dtype) / h0
        big = torch.maximum(d1.to(t0.dtype), d2)
        h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                         (0.01 / big) ** (1.0 / self.tab.order))
        h = torch.minimum(100 * h0, h1)
        return torch.where(torch.isfinite(big), h, h0)

    def next_h(self, ns, h, ratio, prev, prev2, finite: bool = False):
        """Vectorised :class:`~pydiffbridge.solvers.controller.Controller` (arrays of
        :func:`_namespace`): growth in ``[1, ifactor]`` after an error ratio below 1, shrinkage
        in ``[dfactor, 1]`` otherwise (a NaN ratio counts as infinite; ``finite``: no NaN)."""
        k = float(self.tab.order)
        xp = ns.xp
        r = ratio if finite else xp.where(ratio == ratio, ratio, math.inf)
        factor = r ** (-(self.i + self.p + self.d) / k) * self.safety
        if self.p or self.d:
            factor = factor * prev ** ((self.p + 2 * self.d) / k) * prev2 ** (-self.d / k)
        factor = xp.where(r < 1, ns.clip(factor, 1.0, self.ifactor),
                          ns.clip(factor, self.dfactor, 1.0))
        h = h * factor
        if self.min_step > 0 or self.max_step < math.inf:
            h = ns.clip(h, self.min_step, self.max_step)
        return h

    # -- one step for the whole batch -----------------------------------------------------
    def _buffers(self, y: torch.Tensor):
        """The reused ``(s+1, B, n)`` stage buffer, the leading columns of its ``(B*n, s+1)``
        transpose and its rows; with it (all made once: an allocation, a view or a slice
        costs about as much as the small op that uses it) the stage inputs ``Y`` (rows
        ``1..s-1``; ``y1`` alternates between rows ``s`` and ``s+1`` so that the state a step
        starts from is never overwritten), ``|Y|`` and the error buffers."""
        if self._K is None or self._K.shape[1:] != y.shape or self._K.dtype != y.dtype:
            s, (B, n) = self.s, y.shape
            self._K = y.new_empty((s + 1, B, n))
            Kt = self._K.view(s + 1, -1).t()
            self._Kt = [Kt[:, :i] for i in range(s + 2)]
            self._rows = self._K.unbind(0)
            Y = y.new_empty((s + 2, B, n))
            self._Yv, self._Yf = Y.unbind(0), Y.view(s + 2, -1).unbind(0)
            self._flat = {id(v): f for v, f in zip(self._Yv, self._Yf, strict=True)}
            self._A = y.new_empty((s + 2, B, n)).unbind(0)  # |Y| (row 0: a state from elsewhere)
            self._sc, err = y.new_empty((B, n)), y.new_empty((B, n))
            self._err, self._errf = err, err.view(-1)
            self._abs_of, self._abs_row, self.alt = None, 0, s
        return self._K, self._Kt, self._rows

    def step(self, tst, y, f0, hy, t1):
        """Stages, solution, error ratio and ``f(t1, y1)`` for per-sample steps.

        ``tst`` holds the stage times ``(s, B)``, ``hy`` the step sizes ``(B, 1)``.  The
        stage matrix holds ``h_b * k_i`` so that every stage combination is one ``addmv``.
        Without autograd it is one reused buffer; with autograd the stages are stacked afresh
        so that nothing saved for backward is overwritten."""
        grad = torch.is_grad_enabled()
        f = getattr(self.f, "checked", None) or self.f  # the bare func once its output checked
        tr = tst if isinstance(tst, (tuple, list)) else tst.unbind(0)
        s = self.s
        B, n = y.shape  # view(ints) is about twice as fast as view(torch.Size)
        if grad:
            hks = [hy * f0]
            yflat = y.reshape(-1)
        else:
            K, Kt, rows = self._buffers(y)
            torch.mul(f0, hy, out=rows[0])
            yflat = self._flat.get(id(y))
            if yflat is None:
                yflat = y.reshape(-1)
            # y1's row: the one of the two that does not hold y
            self.alt = alt = s + 1 if y is self._Yv[s] else s
            last = alt if self.tab.fsal else s - 1

        def comb(w: torch.Tensor, i: int, j: int) -> torch.Tensor:  # y + sum_l w_l h k_l, l < i
            if grad:
                return torch.addmv(yflat, torch.stack(hks).view(i, -1).t(), w).view(B, n)
            torch.addmv(yflat, Kt[i], w, out=self._Yf[j])
            return self._Yv[j]

        yi, ki = y, f0
        for i in range(1, s):
            yi = comb(self.a[i], i, last if not grad and i == s - 1 else i)
            ki = f(tr[i], yi)
            if grad:
                hks.append(hy * ki)
            else:
                torch.mul(ki, hy, out=rows[i])
        if self.tab.fsal:
            y1, kend = yi, ki
        else:
            y1 = comb(self.b, s, None if grad else alt)
            kend = f(t1, y1)
        if grad:
            K = torch.stack(hks + [hy * kend])
        elif self.tab.fsal:
            rows[s].copy_(rows[s - 1])
        else:
            torch.mul(kend, hy, out=rows[s])
        with torch.no_grad() if grad else contextlib.nullcontext():
            if grad:
                sc = error_scale(y, y1, self.rtol, self.atol)
            else:  # error_scale's arithmetic on buffers, |y| kept from the step that made y
                if self._abs_of is not y:
                    self._abs_of, self._abs_row = y, 0
                    torch.abs(y, out=self._A[0])
                self.abs1 = torch.abs(y1, out=self._A[alt])
                sc = torch.maximum(self._A[self._abs_row], self.abs1, out=self._sc)
                sc.mul_(self.rtol).add_(self.atol)

            def scaled(w: torch.Tensor) -> torch.Tensor:  # sum_i w_i h k_i / sc, per sample
                if grad:
                    return torch.mv(K.reshape(s + 1, -1)[: len(w)].t(), w).view(B, n).div_(sc)
                torch.mv(Kt[len(w)], w, out=self._errf)
                return self._err.div_(sc)

            if self.e3 is None and self.parts is None:  # plain RMS: 1/sqrt(n) in the weights
                ratio = torch.linalg.vector_norm(scaled(self.e_rms), dim=1)
            elif self.e3 is None:
                ratio = self.norm(scaled(self.e))
            else:  # DOP853's combined 5th/3rd-order estimate
                e5n, e3n = self.norm(scaled(self.e)), self.norm(scaled(self.e3))
                den = torch.sqrt(e5n * e5n + 0.01 * e3n * e3n)
                ratio = torch.where(den == 0, torch.zeros_like(den), e5n * e5n / den)
        return y1, K, kend, ratio

    def keep_rejected(self, accept: torch.Tensor, y1: torch.Tensor, y: torch.Tensor
                      ) -> torch.Tensor:
        """The new state: ``y1`` where ``accept`` (``(B, 1)``), else ``y``, written into
        ``y1``'s buffer row (the next step then starts from a buffer row)."""
        out = torch.where(accept, y1, y, out=self._Yv[self.alt])
        self._abs_of = None
        return out

    def accepted_all(self, y1: torch.Tensor) -> None:
        """``y1`` of the last (buffered) step is the new state of every sample: its ``|.|``
        is already in the buffer."""
        self._abs_of, self._abs_row = y1, self.alt


def _np_clip(x, lo, hi):
    if lo is not None:
        x = np.maximum(x, lo)
    return x if hi is None else np.minimum(x, hi)


def _namespace(use_numpy: bool, device: torch.device) -> SimpleNamespace:
    """Array functions for the per-sample bookkeeping (times, step sizes, decisions, stats):
    NumPy on the CPU, where an op on a ``(B,)`` vector costs a fraction of a torch op and
    reading a value is free, and torch tensors elsewhere (no host synchronisation)."""
    if use_numpy:
        dts = {torch.long: np.int64, torch.bool: np.bool_, torch.float64: np.float64}
        # (ufuncs rather than np.clip / np.take_along_axis, whose Python wrappers cost more
        # than the work on a small batch)
        return SimpleNamespace(
            xp=np, to_t=torch.from_numpy,
            to_x=lambda v: v.detach().numpy() if v.requires_grad else v.numpy(),
            take=lambda a, i: a[np.arange(a.shape[0])[:, None], i],
            clip=_np_clip,
            full=lambda shape, v, dt: np.full(shape, v, dtype=dts[dt]))
    return SimpleNamespace(
        xp=torch, to_t=lambda v: v, to_x=lambda v: v,
        take=lambda a, i: torch.gather(a, 1, i), clip=torch.clamp,
        full=lambda shape, v, dt: torch.full(shape, v, dtype=dt, device=device))


def solve_batched(f: Callable, y0: torch.Tensor, t_out: torch.Tensor, tab: Tableau, rtol: Any,
                  atol: Any, opts: dict, parts: list[int] | None = None,
                  tdtype: torch.dtype = torch.float64) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` for ``y0`` of shape ``(B, n)``, each sample on its own.

    Args:
        f: ``f(t, y)`` with ``t`` of shape ``(B,)`` and ``y`` of shape ``(B, n)``.
        t_out: output times of shape ``(B, m)``, each row strictly monotonic.
        rtol, atol: floats or tensors broadcastable to ``(B, n)``.
        parts: component sizes of a tuple state (the error norm is the max of their RMS).

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
            y1_ok = bufs and math.isfinite(eng.abs1.sum().item())
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
