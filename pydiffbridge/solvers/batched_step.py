"""The step of the per-sample loop (:mod:`~pydiffbridge.solvers.batched`) and its array
namespace.

:class:`_Batched` holds one solve's constants and computes one step for the whole batch:
stages, solution, per-sample error ratio and ``f(t1, y1)``.  The stage matrix holds
``h_b k_i`` so that every stage combination is one ``addmv``.  Without autograd every tensor
of a step lives in buffers made once per solve (stage inputs, ``|y|``, error); with autograd
the stages are stacked afresh so that nothing saved for backward is overwritten.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import RHSError
from .controller import BufferedScale, error_scale
from .interp import interp_weights
from .tableaus import Tableau, coefficients

__all__ = ["_Batched", "_namespace", "per_sample_rms", "per_sample_initial_step"]


def _bad_output(k, y) -> None:
    raise RHSError(f"func returned dy/dt of shape {tuple(getattr(k, 'shape', ()))} for a state of "
                   f"shape {tuple(y.shape)} during the solve (it had the right shape at first); "
                   "dy/dt must always have the state's shape")


@functools.lru_cache(maxsize=32)
def _interp_poly(tab: Tableau, dtype: torch.dtype, device: torch.device):
    """Every dense-output weight is a polynomial of degree <= 5 in theta: its coefficients
    ``P``, fitted once from interp_weights, so that a step's weights are one matmul
    (``theta ** pows @ P``).  Made once per dtype/device outside inference mode; shared."""
    with torch.inference_mode(False), torch.no_grad():
        nodes = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
        V = nodes[:, None] ** torch.arange(6, dtype=torch.float64)
        P = torch.linalg.solve(V, interp_weights(tab, nodes)).to(dtype=dtype, device=device)
        return P, torch.arange(6, device=device, dtype=dtype)


def per_sample_rms(x: torch.Tensor, parts: list[int] | None) -> torch.Tensor:
    """Per-sample RMS of ``x`` (``(B, n) -> (B,)``), the max over ``parts`` of their RMS for a
    tuple state: the error norm of the per-sample loops (batched.py, batched_stiff.py)."""
    x = x.abs() if x.is_complex() else x
    if parts is None:
        return torch.linalg.vector_norm(x, dim=1).mul_(1 / math.sqrt(x.shape[1]))
    return torch.stack([torch.linalg.vector_norm(p, dim=1) / math.sqrt(p.shape[1])
                        for p in torch.split(x, parts, dim=1)]).amax(0)


def per_sample_initial_step(fc: Callable, norm: Callable, order: int, rtol, atol, t0, y0, f0,
                            direction) -> torch.Tensor:
    """Hairer I, Sec. II.4 (a)-(f), per sample (``t0``, ``direction``: ``(B,)``; ``y0``,
    ``f0``: ``(B, n)``; ``norm``: ``(B, n) -> (B,)``); one evaluation of ``fc``."""
    sc = y0.abs() * rtol + atol
    d0, d1 = norm(y0 / sc), norm(f0 / sc)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = h0.to(t0.dtype)
    f1 = fc(t0 + direction * h0, y0 + (direction * h0).to(y0.dtype)[:, None] * f0)
    d2 = norm((f1 - f0) / sc).to(t0.dtype) / h0
    big = torch.maximum(d1.to(t0.dtype), d2)
    h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / big) ** (1.0 / order))
    h = torch.minimum(100 * h0, h1)
    return torch.where(torch.isfinite(big), h, h0)


class _Batched:
    """One solve's constants and its (pure) step function."""

    def __init__(self, f: Callable, tab: Tableau, y0: torch.Tensor, rtol, atol, opts: dict,
                 parts: list[int] | None, tdtype: torch.dtype):
        self.f, self.tab, self.s = f, tab, tab.stages
        kw = dict(dtype=y0.real.dtype if y0.is_complex() else y0.dtype, device=y0.device)
        self.a, self.b, self.e, self.e3 = coefficients(tab, kw["dtype"], y0.device)
        self.e_rms = self.e / math.sqrt(y0.shape[1])  # the error weights of the plain RMS norm
        self.c, self.rtol, self.atol, self.parts, self.tdtype = tab.c, rtol, atol, parts, tdtype
        self.err_needs_end = len(tab.e) > self.s
        g = lambda k, d: float(opts.get(k, d))  # noqa: E731
        self.safety, self.ifactor, self.dfactor = g("safety", 0.9), g("ifactor", 10.0), \
            g("dfactor", 0.2)
        self.p, self.i, self.d = g("pcoeff", 0.0), g("icoeff", 1.0), g("dcoeff", 0.0)
        self.min_step, self.max_step = g("min_step", 0.0), g("max_step", math.inf)
        self.P, self.pows = _interp_poly(tab, kw["dtype"], y0.device)
        self.functional = bool(opts.get("compile"))
        self._K: torch.Tensor | None = None

    def weights(self, theta: torch.Tensor) -> torch.Tensor:
        """``interp_weights(tab, theta)`` from the fitted coefficients."""
        return (theta[..., None] ** self.pows) @ self.P

    def fc(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f(t.to(self.tdtype), y)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample RMS (max over the parts of a tuple state): ``(B, n) -> (B,)``."""
        return per_sample_rms(x, self.parts)

    def initial_step(self, t0, y0, f0, direction):
        """Hairer I, Sec. II.4 (a)-(f), per sample; one evaluation of ``f``."""
        return per_sample_initial_step(self.fc, self.norm, self.tab.order, self.rtol, self.atol,
                                       t0, y0, f0, direction)

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
            self.scale = BufferedScale(y, s + 2)  # |y1| in y1's row of Y
            err = y.new_empty((B, n))
            self._err, self._errf = err, err.view(-1)
            self.alt = s
        return self._K, self._Kt, self._rows

    def step(self, tst, y, f0, hy, t1):
        """Stages, solution, error ratio and ``f(t1, y1)`` for per-sample steps.

        ``tst`` holds the stage times ``(s, B)``, ``hy`` the step sizes ``(B, 1)``.  The
        stage matrix holds ``h_b * k_i`` so that every stage combination is one ``addmv``.
        Without autograd it is one reused buffer; with autograd the stages are stacked afresh
        so that nothing saved for backward is overwritten."""
        # compiled (options["compile"]): the functional form, which traces into one graph
        # (the buffered form's bookkeeping in Python objects would break it)
        grad = torch.is_grad_enabled() or self.functional
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
            if ki.shape != yi.shape:  # (the bare func is unchecked; mul would broadcast)
                _bad_output(ki, yi)
            if grad:
                hks.append(hy * ki)
            else:
                torch.mul(ki, hy, out=rows[i])
        if self.tab.fsal:
            y1, kend = yi, ki
        else:
            y1 = comb(self.b, s, None if grad else alt)
            kend = f(t1, y1)
            if kend.shape != y1.shape:
                _bad_output(kend, y1)
        if grad:
            K = torch.stack(hks + [hy * kend])
        elif self.tab.fsal:
            rows[s].copy_(rows[s - 1])
        else:
            torch.mul(kend, hy, out=rows[s])
        with torch.no_grad() if grad else contextlib.nullcontext():
            if grad:
                sc = error_scale(y, y1, self.rtol, self.atol)
            else:  # |y| kept from the step that made y
                sc = self.scale(y, y1, alt, self.rtol, self.atol)

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
        self.scale.forget()
        return out

    def accepted_all(self, y1: torch.Tensor) -> None:
        """``y1`` of the last (buffered) step is the new state of every sample: its ``|.|``
        is already in the buffer."""
        self.scale.became_state(y1, self.alt)


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
