"""Per-sample stiffness switching: ``method="auto"`` with ``batch_dims``.

Every sample of the batch runs :mod:`~pydiffbridge.solvers.autoswitch`'s scheme on its own:
tsit5 while its dynamics are not stiff, the Rosenbrock method ``options["stiff_method"]``
(default ``"rodas5"``) while they are, with its own switch decisions, counters and
``stats.switches``.  The tests and thresholds are those of the single solve (see there):

* explicit phase: Hairer's estimate ``h rho = ||k7 - k6|| / ||y1 - g6||`` of ``|h lambda|``
  per sample (``h`` cancels: the stage matrix holds ``h k``); above 2.0 on ``stiff_detect``
  steps (default 15; rejected steps count) without 6 accepted steps below it in a row, the
  sample switches to the stiff method;
* stiff phase: ``rho = ||J_b||_inf`` at each step start; ``h_next rho < 1`` on
  ``nonstiff_detect`` (default 5) accepted steps in a row switches the sample back, and each
  return doubles that sample's count for the next one.

One iteration of the loop of :func:`~pydiffbridge.solvers.batched_stiff.solve_batched_stiff`
computes the explicit step for the samples in the explicit phase and the Rosenbrock step for
those in the stiff phase; ``func`` always sees the whole batch, so while the batch is mixed
both steps are evaluated (the other phase's samples take a zero step), and while it is not,
only one.  ``J`` is computed only when some running sample is stiff.  The explicit phase
reuses ``f(t1, y1)`` of its last step (FSAL) unless a sample has just left the stiff phase.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .autoswitch import _HLAMBDA_STIFF, _HRHO_NONSTIFF, check_auto_options
from .batched_implicit import BatchedDerivatives, ImplicitStep
from .batched_step import _Batched, _interp_poly
from .rosenbrock import ROSENBROCK_METHODS
from .tableaus import TABLEAUS

__all__ = ["AutoStep"]


class AutoStep:
    """The per-sample tsit5 / Rosenbrock step of ``method="auto"`` (the interface of
    :class:`~pydiffbridge.solvers.batched_stiff.ImplicitStep`)."""

    def __init__(self, fc: Callable, derivs: BatchedDerivatives, opts: dict, rtol, atol, parts,
                 eye: torch.Tensor, y0: torch.Tensor, tdtype: torch.dtype):
        check_auto_options(opts)
        method = opts.get("stiff_method", "rodas5")
        assert method in ROSENBROCK_METHODS  # (checked above)
        self.implicit = ImplicitStep(method, fc, derivs, opts, rtol, atol, parts, eye)
        self.tab = TABLEAUS["tsit5"]
        self.explicit = _Batched(fc, self.tab, y0, rtol, atol, {}, parts, tdtype)
        self.explicit.functional = True  # (its buffered form assumes it takes every step)
        self.P, self.pows = _interp_poly(self.tab, y0.dtype, y0.device)
        self.c = torch.tensor(self.tab.c, dtype=torch.float64, device=y0.device)
        self.fc, self.rtol, self.atol, self.parts = fc, rtol, atol, parts
        B, dev = y0.shape[0], y0.device
        self.stiff = torch.zeros(B, dtype=torch.bool, device=dev)
        z = torch.zeros(B, dtype=torch.long, device=dev)
        self.iasti, self.nonsti, self.back, self.switches = z, z.clone(), z.clone(), z.clone()
        self.detect = int(opts.get("stiff_detect", 15))
        self.detect_back = torch.full((B,), int(opts.get("nonstiff_detect", 5)),
                                      dtype=torch.long, device=dev)
        self._order = torch.tensor([5.0, float(self.implicit.order)], dtype=torch.float64,
                                   device=dev)
        self.rho = torch.zeros(B, dtype=torch.float64, device=dev)
        self.hl = self.rho.clone()
        self.f_next = None  # f(tc, y) where known (FSAL), for the explicit phase
        self.f_known = torch.zeros(B, dtype=torch.bool, device=dev)

    @property
    def order(self) -> torch.Tensor:
        """The controller's order per sample (tsit5: 5; the stiff method's own)."""
        return self._order[self.stiff.long()]

    def start(self, tc, y, running):
        stiff = running & self.stiff
        if bool(stiff.any()):
            f0, ok = self.implicit.start(tc, y, stiff)
            with torch.no_grad():
                self.rho = self.implicit.J.detach().abs().sum(-1).amax(-1).to(torch.float64)
            return f0, ok
        if self.f_next is not None and bool((self.f_known | ~running).all()):
            f0 = self.f_next
        else:
            f0 = self.fc(tc, y)
        with torch.no_grad():
            ok = torch.isfinite(f0).all(1)
        return (f0 if bool(ok.all()) else torch.where(ok[:, None], f0, 0.0)), ok

    def attempt(self, tc, y, f0, hs, hl, mask):
        stiff, expl = mask & self.stiff, mask & ~self.stiff
        self.was_stiff = self.stiff.clone()
        self.kend, self.f0 = None, f0
        y1 = y
        ratio = torch.zeros_like(hs)
        st_e = st_i = None
        if bool(expl.any()):
            he = torch.where(expl, hs, 0.0)
            tst = tc[None, :] + self.c[:, None] * he[None, :]
            y1, K, self.kend, ratio = self.explicit.step(tst, y, f0, he.to(y.dtype)[:, None],
                                                         tc + he)
            with torch.no_grad():
                s = self.tab.stages
                Kd = K.detach()
                g6 = y.detach() + torch.einsum("j,jbn->bn", self.explicit.a[s - 2], Kd[: s - 2])
                num = torch.linalg.vector_norm(Kd[s - 1] - Kd[s - 2], dim=1)
                den = torch.linalg.vector_norm(y1.detach() - g6, dim=1)
                self.hl = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0
                                      ).to(torch.float64)
            ratio = torch.nan_to_num(ratio.detach().to(torch.float64), nan=math.inf)
            st_e = K
        if bool(stiff.any()):
            hi = torch.where(stiff, hs, 0.0)
            y1i, ratio_i, st_i, _ = self.implicit.attempt(tc, y, f0, hi, hl, stiff)
            y1 = torch.where(self.stiff[:, None], y1i, y1)
            ratio = torch.where(self.stiff, ratio_i, ratio)
        return y1, ratio, (st_e, st_i), None

    def dense(self, theta, y, y1, hcol, st):
        st_e, st_i = st
        out = None
        if st_e is not None:  # tsit5's interpolant: y + sum_j w_j(theta) h k_j
            W = (theta[..., 0, None] ** self.pows) @ self.P
            out = y[:, None] + torch.einsum("bkj,jbn->bkn", W, st_e)
        if st_i is not None:
            vi = self.implicit.dense(theta, y, y1, hcol, st_i)
            out = vi if out is None else torch.where(self.was_stiff[:, None, None], vi, out)
        return out

    def after(self, accept, running, h_new) -> None:
        """The FSAL value and the per-sample switch decisions after a step (``h_new``: the
        next step of each sample)."""
        stiff = self.was_stiff
        # f(tc, y) for the next explicit step: f(t1, y1) after an accepted explicit step,
        # the same f0 after a rejected one; unknown after an accepted stiff step
        self.f_next = self.f0 if self.kend is None else torch.where(
            (accept & ~stiff)[:, None], self.kend, self.f0)
        self.f_known = ~(accept & stiff)
        exp_acc, exp_rej = accept & ~stiff, running & ~accept & ~stiff
        big = self.hl > _HLAMBDA_STIFF
        self.iasti = self.iasti + ((exp_rej | exp_acc) & big).long()
        self.nonsti = torch.where(exp_acc & big, 0, self.nonsti + (exp_acc & ~big).long())
        self.iasti = torch.where(exp_acc & ~big & (self.nonsti >= 6), 0, self.iasti)
        to_stiff = exp_acc & big & (self.iasti >= self.detect)
        st_acc = accept & stiff
        small = h_new * self.rho < _HRHO_NONSTIFF
        self.back = torch.where(st_acc, torch.where(small, self.back + 1, 0), self.back)
        to_expl = st_acc & (self.back >= self.detect_back)
        self.detect_back = torch.where(to_expl, 2 * self.detect_back, self.detect_back)
        reset = to_stiff | to_expl
        self.iasti = torch.where(reset, 0, self.iasti)
        self.back = torch.where(reset, 0, self.back)
        self.nonsti = torch.where(to_expl, 0, self.nonsti)
        self.switches = self.switches + reset.long()
        self.stiff = (self.stiff | to_stiff) & ~to_expl
        self.f_known &= ~to_stiff  # (the stiff phase takes f with J)

    def stats(self) -> dict:
        return {"switches": self.switches}
