"""Stage engines of the host loop: one explicit Runge-Kutta step for a given tableau.

:class:`StageEngine` serves every solve.  :class:`LeanStages` is the no-autograd fast path:
without autograd nothing a step computes has to outlive the step except the new state, so it
keeps every tensor of a step in buffers made once per solve: stage inputs are written by
``addmv(..., out=)`` (an allocation costs as much as the ``addmv``), ``func`` receives views of
those buffers already in the state's shape and its output is copied straight into the stage
matrix (no reshape in or out), ``|y|`` is carried over from the previous step's ``|y1|`` for
the error scale, and finiteness of ``y1`` comes from one sum rather than
``isfinite().all()``.  The arithmetic is that of :class:`StageEngine`.

In :class:`LeanStages` the new state ``y1`` lives in one of two alternating rows of the
stage-input buffer, so the state a step starts from is never written by that step (or by a
rejected retry).  Callers must copy ``y1`` before keeping it past the next step (the host loop
does for outputs that land exactly on a step end).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .controller import BufferedScale, error_scale
from .tableaus import Tableau, coefficients

__all__ = ["StageEngine", "LeanStages", "lean_func"]


class StageEngine:
    """Evaluates the stages of one explicit RK step for a given tableau.

    Stage combinations are one ``addmv`` each over the matrix of previous stages.  Without
    autograd the stage matrix is a buffer reused from step to step; with autograd it is
    rebuilt each step so that no tensor saved for backward is overwritten.
    """

    def __init__(self, tab: Tableau, y0: torch.Tensor):
        self.tab = tab
        self.s = tab.stages
        self.a, self.b, self.e, self.e3 = coefficients(tab, y0.dtype, y0.device)
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


def lean_func(f: Callable) -> tuple | None:
    """``(func, shape, dtype, check)`` of a flat func made by :meth:`Tree.wrap_func` for a single
    tensor state, or ``None`` (tuple states, or a func from elsewhere)."""
    return getattr(f, "shaped", None)


class LeanStages(StageEngine):
    """:class:`StageEngine` on reused buffers for solves without autograd (see module doc)."""

    def __init__(self, tab: Tableau, y0: torch.Tensor, shaped: tuple, tdtype: torch.dtype):
        super().__init__(tab, y0)
        self.func, self.shape, self.dtype, self.check = shaped
        # func gets t in the state's dtype, as from Tree.wrap_func (torchdiffeq's rule)
        self.tkw = dict(dtype=y0.dtype, device=y0.device)
        s, n = self.s, self.n
        K = self.new_matrix(y0)
        # stage inputs: rows 1..s-1; y1 alternates between rows s and s+1 (for FSAL tableaux
        # the last stage's input is y1 itself)
        self.Y = y0.new_empty((s + 2, n))
        self._Yrows = self.Y.unbind(0)
        self._Yv = [r.view(self.shape) for r in self._Yrows]
        self._Kv = [r.view(self.shape) for r in K.unbind(0)]
        self._scale = BufferedScale(self.Y[0], s + 2)  # |y1| in y1's row of Y
        self._err = y0.new_empty(n)
        self.alt = s
        self.y1_finite = True

    def step_lean(self, t: float, y: torch.Tensor, f0: torch.Tensor, h: float,
                  t1_eval: float | None) -> torch.Tensor:
        """One step from ``(t, y)`` with ``f(t, y) = f0``; returns ``y1`` (a buffer row) and
        leaves the stages in :attr:`_buf` (for FSAL tableaux ``f(t1, y1)`` is row ``s-1``)."""
        s, KT, a, c, rows, Yr, Yv, Kv = (self.s, self._bufT, self.a, self.c, self._rows,
                                         self._Yrows, self._Yv, self._Kv)
        func, shape, dtype, tkw = self.func, self.shape, self.dtype, self.tkw
        if f0 is not rows[0]:
            rows[0].copy_(f0)
        self.alt = alt = self.s + 1 if y is Yr[self.s] else self.s
        last = alt if self.tab.fsal else s - 1
        for i in range(1, s):
            j = last if i == s - 1 else i
            torch.addmv(y, KT[i], a[i], alpha=h, out=Yr[j])
            ti = t1_eval if (t1_eval is not None and c[i] == 1.0) else t + c[i] * h
            k = func(torch.scalar_tensor(ti, **tkw), Yv[j])
            if type(k) is torch.Tensor and k.shape == shape and k.dtype == dtype:
                Kv[i].copy_(k)
            else:  # anything unusual gets the full check (and its error message)
                rows[i].copy_(self.check(k, ti))
        if not self.tab.fsal:  # (FSAL: f(t1, y1) stays in row s-1; see fill_end)
            torch.addmv(y, KT[s], self.b, alpha=h, out=Yr[alt])
        return Yr[alt]

    def fill_end(self) -> None:
        """Complete row ``s`` (``f(t1, y1)``) of an FSAL step for the dense output."""
        self._rows[self.s].copy_(self._rows[self.s - 1])

    def ratio_lean(self, h: float, y: torch.Tensor, y1: torch.Tensor, rtol, atol) -> float:
        """The RMS error ratio (as :meth:`StageEngine.rms_ratio`) on buffers; sets
        :attr:`y1_finite`."""
        # the same arithmetic as rms_ratio: the paths agree to the last bit
        scale = self._scale(y, y1, self.alt, rtol, atol)
        m = len(self.tab.e)
        err = torch.mv(self._bufT[m], self.e, out=self._err).div_(scale)
        ratio = abs(h) * torch.linalg.vector_norm(err).item() * self.inv_sqrt_n
        self.y1_finite = self._scale.y1_sum_finite() or bool(torch.isfinite(y1).all())
        return ratio

    def accepted(self, y1: torch.Tensor) -> None:
        """Record that ``y1`` (from the last :meth:`step_lean`) is the new state."""
        self._scale.became_state(y1, self.alt)
