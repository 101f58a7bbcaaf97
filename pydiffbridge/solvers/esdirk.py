"""Adaptive ESDIRK (explicit first stage, singly diagonally implicit Runge-Kutta) in native torch.

``kvaerno5``: A. Kværnø, "Singly diagonally implicit Runge-Kutta methods with an explicit first
stage", BIT Numer. Math. 44(3), 2004, the 7-stage order 5(4) pair: ``gamma = 0.26``, both
solutions stiffly accurate (the order 5 one is the last stage, the embedded order 4 one the
sixth; error estimate their difference), A- and L-stable.  The coefficients below are those of
the paper as reproduced in diffrax's ``Kvaerno5`` (``c`` and the lower triangle ``a_ij``).

One step solves, stage by stage, ``z_i = s_i + h gamma f(t + c_i h, y + z_i)`` with
``s_i = h sum_{j<i} a_ij k_j`` by simplified Newton (Hairer & Wanner, *Solving ODEs II*,
Sec. IV.8)::

    (I - h gamma J) dz = -(z - s_i - h gamma f(t + c_i h, y + z)),

``J`` an earlier ``df/dy``.  The LU of ``I - h gamma J`` serves all stages and, while neither
``h`` nor ``J`` changes, later steps too: an accepted step keeps its ``h`` when the controller
would change it by a factor in ``[1, 1.2]`` (RADAU5's ``quot1``/``quot2``, ibid. Sec. IV.8), and
``J`` is recomputed only after a Newton iteration contracted slowly (rate ``theta > 0.1``) or
failed.  Convergence: ``theta/(1-theta) |dz| <= newton_tol`` in the norm scaled by
``atol + rtol |y|``, or the increment is at roundoff (``100 eps (|y| + |s_i| + |h gamma
k_guess|)``); default ``newton_tol = max(10 eps / rtol, min(1e-3, 0.01 rtol^(1/2)))``.  (RADAU5's
``fnewt`` is ``min(0.03, rtol^(1/2))``; on HIRES and Van der Pol that looser value let Newton
errors reach the solution: global errors 10-20x larger for 10-30 % fewer evaluations.  RADAU5's
"predicted not to converge in time" test is not used: on Robertson it rejected every other
step.)  Divergence (``theta >= 1``), a NaN, or no convergence within ``max_iters`` (default
10) iterations rejects the step; the retry takes half the step with a
fresh ``J``.  The stage derivative comes from the converged increment,
``k_i = (z_i - s_i) / (h gamma)`` (no extra evaluation); the first guess is
``z_i = s_i + h gamma sum_j pred_ij k_j`` (the stage predictors of OrdinaryDiffEq.jl, see
:data:`KVAERNO5`).

Dense output: the cubic Hermite interpolant through ``(y, f(t, y))`` and ``(y1, k_7)``
(third order; ``k_7 = f(t1, y1)`` up to the Newton tolerance, the method being stiffly
accurate).

Gradients (direct backprop): Newton runs detached; with autograd on, each stage then takes one
more Newton step from the converged ``z_i`` with the exact Jacobian at the stage and the
residual carrying the graph, so that ``dz_i/dp = (I - h gamma J(Y_i))^{-1} d(s_i + h gamma
f)/dp``: the implicit-function-theorem derivative of the converged stages (one extra Jacobian
and evaluation per stage, only when gradients are needed).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError
from ..solution import Solution
from .jacobian import Derivatives, lu_apply, lu_of
from .rosenbrock import STIFF_OPTIONS, check_stiff_input
from .stiff_loop import run_stiff

__all__ = ["ESDIRK_METHODS", "ESDIRK_OPTIONS", "KVAERNO5", "EsdirkScheme", "solve_esdirk"]

ESDIRK_METHODS: tuple[str, ...] = ("kvaerno5",)
ESDIRK_OPTIONS: frozenset[str] = STIFF_OPTIONS | {"newton_tol", "max_iters"}

_G = 0.26
_A6 = (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141,
       0.61943039072480676)
_A7 = (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046,
       0.62993304899016403, 0.06962479448202728)
#: Kværnø (2004), the 5(4) ESDIRK: strictly lower ``a`` (stage 1 explicit), diagonal gamma.
KVAERNO5 = {
    "gamma": _G,
    "c": (0.0, 0.52, 1.230333209967908, 0.8957659843500759, 0.43639360985864756, 1.0, 1.0),
    "a": ((), (_G,), (0.13, 0.84033320996790809),
          (0.22371961478320505, 0.47675532319799699, -0.06470895363112615),
          (0.16648564323248321, 0.10450018841591720, 0.03631482272098715,
           -0.13090704451073998),
          _A6, _A7),
    # y1 - y_embedded = h sum_j e_j k_j: row 7 minus row 6 (diagonal included)
    "e": tuple(a7 - a6 for a7, a6 in zip(_A7, _A6 + (_G,), strict=True)) + (_G,),
    # first guesses k_i ~ sum_j pred_ij k_j of the Newton iterations: the stage predictors of
    # OrdinaryDiffEq.jl's Kvaerno5 (sdirk_tableaus.jl, alpha_ij; as in diffrax's Kvaerno5,
    # with alpha_21 = 1)
    "pred": ((), (1.0,), (-1.366025403784441, 2.3660254037844357),
             (-0.19650552613122207, 0.8113579546496623, 0.38514757148155954),
             (0.10375304369958693, 0.937994698066431, -0.04174774176601781),
             (-0.17281112873898072, 0.6235784481025847, 0.5492326806363959),
             _A6 + (_G,)),
    "order": 5,
}


def _hermite(s: torch.Tensor, y, y1, h, f0, f1) -> torch.Tensor:
    """Cubic Hermite through ``(y, f0)`` and ``(y1, f1)`` at fractions ``s``, broadcast against
    the vectors: ``s`` of shape ``(k, 1)`` gives rows ``(k, n)`` (per-sample stepping passes
    ``(B, k, 1)`` with ``(B, 1, n)`` vectors)."""
    s2, s3 = s * s, s * s * s
    return (y + (3 * s2 - 2 * s3) * (y1 - y) + (h * (s3 - 2 * s2 + s)) * f0
            + (h * (s3 - s2)) * f1)


class EsdirkScheme:
    """:data:`KVAERNO5` for :func:`~pydiffbridge.solvers.stiff_loop.run_stiff`."""

    ifactor, dfactor, fail_factor = 5.0, 0.2, 0.5

    def __init__(self, method: str, fct: Callable, fc: Callable, tdtype, device, opts: dict,
                 rtol: Any, atol: Any, norm: Callable):
        self.tab = KVAERNO5
        self.order = self.tab["order"]
        self.fc, self.rtol, self.atol, self.norm = fc, rtol, atol, norm
        self.derivs = Derivatives(fct, opts, tdtype, device, method, need_ft=False,
                                  jac_graph=False)
        r = float(torch.as_tensor(rtol).max()) if not isinstance(rtol, float) else rtol
        eps = torch.finfo(torch.float64).eps
        self.tol = float(opts.get("newton_tol") or max(10 * eps / max(r, 1e-300),
                                                        min(1e-3, 0.01 * math.sqrt(r))))
        self.max_iters = int(opts.get("max_iters") or 10)
        self.J = None
        self.stale = True
        self._lu_key = None
        self.newton_failures = 0

    def start(self, t: float, y: torch.Tensor):
        if self.J is None or self.stale:
            f0, J, _ = self.derivs(t, y)
            with torch.no_grad():
                if not bool(torch.isfinite(J).all()):
                    return None
            self.J, self.stale, self._lu_key = J.detach(), False, None
        else:
            f0 = self.fc(t, y)
        if not bool(torch.isfinite(f0.detach()).all()):
            return None
        return f0

    def _lu(self, hg: float):
        if self._lu_key != hg:
            self._lu_val, self._lu_key = lu_of(self.J, 1.0, hg), hg
        return self._lu_val

    def attempt(self, t: float, y, h: float, f0):
        if self.stale:  # a retry after a Newton failure: J at the step's start
            self.J, self.stale, self._lu_key = self.derivs(t, y, f0)[1].detach(), False, None
        tab, hg = self.tab, h * self.tab["gamma"]
        lu = self._lu(hg)
        grad = torch.is_grad_enabled()
        yd = y.detach()
        with torch.no_grad():
            sc = yd.abs() * self.rtol + self.atol
        ks = [f0]
        worst = 0.0
        for i in range(1, len(tab["c"])):
            ti = t + tab["c"][i] * h
            s_i = sum((ks[j] * (h * a) for j, a in enumerate(tab["a"][i]) if a != 0.0),
                      torch.zeros_like(y))
            with torch.no_grad():
                k0 = sum((ks[j].detach() * p for j, p in enumerate(tab["pred"][i])),
                         torch.zeros_like(yd))
                z, theta = self._newton(ti, yd, s_i.detach(), k0, hg, lu, sc)
            if z is None:
                self.newton_failures += 1
                self.stale = True
                return None
            worst = max(worst, theta)
            if grad:  # (run_stiff runs without autograd when nothing upstream needs it)
                z = self._exact_step(ti, y, z, s_i, hg)
            ks.append((z - s_i) / hg)
        if worst > 0.1:
            self.stale = True  # slow contraction: a fresh J at the next step start
        e = tab["e"]
        err = h * sum(ks[j] * c for j, c in enumerate(e) if c != 0.0)
        y1 = y + z
        return y1, err, (f0, ks[-1])

    def _newton(self, ti: float, y, s_i, k0, hg: float, lu, sc):
        """Simplified Newton for one stage (detached); ``(z, max rate)`` or ``(None, _)``."""
        z = s_i + hg * k0
        prev, theta = None, 0.0
        # roundoff of the residual: eps times the magnitudes that cancel in it
        floor = 100 * torch.finfo(y.dtype).eps * (float(y.abs().max()) + float(
            s_i.abs().max()) + float((hg * k0).abs().max()))
        for _ in range(self.max_iters):
            G = z - s_i - hg * self.fc(ti, y + z)
            dz = -lu_apply(lu, G)
            nd = float(self.norm(dz / sc))
            if not math.isfinite(nd):
                return None, theta
            z = z + dz
            if nd == 0.0 or float(dz.abs().max()) <= floor:
                return z, theta  # at roundoff: nothing left to gain
            if prev is not None:
                theta = nd / prev
                if theta >= 1.0:
                    return None, theta
                eta = theta / (1.0 - theta)
                if eta * nd <= self.tol:
                    return z, theta
            elif nd <= 1e-2 * self.tol:
                return z, theta
            prev = nd
        return None, theta

    def _exact_step(self, ti: float, y, z, s_i, hg: float):
        """One Newton step with the graph from the converged ``z`` (see module doc)."""
        with torch.no_grad():
            Jz = self.derivs(ti, y.detach() + z)[1]
            luz = lu_of(Jz, 1.0, hg)
        G = z - s_i - hg * self.fc(ti, y + z)
        return z - lu_apply(luz, G)

    def dense(self, s, t: float, y, y1, h: float, st):
        return _hermite(s[:, None], y, y1, h, st[0], st[1])

    def next_h(self, h_used: float, h_new: float, accepted: bool) -> float:
        if accepted and 1.0 <= h_new / h_used <= 1.2:
            return h_used  # keep the LU of I - h gamma J
        return h_new

    def stats_extra(self) -> dict:
        return {}


def check_esdirk_options(method: str, opts: dict) -> None:
    tol = opts.get("newton_tol")
    if tol is not None and (not isinstance(tol, numbers.Real) or isinstance(tol, bool)
                            or not math.isfinite(tol) or tol <= 0):
        raise InputError(f"options['newton_tol'] must be a finite number > 0 (a fraction of the "
                         f"atol + rtol|y| scale), got {tol!r} (method {method!r}); try 0.03")


def solve_esdirk(f: Callable, y0: torch.Tensor, t: torch.Tensor, method: str, rtol: Any,
                 atol: Any, norm: Callable | None, opts: dict, event_fn: Callable | None = None,
                 t_max: float = math.inf) -> Solution:
    """Integrate the stiff ``dy/dt = f(t, y)`` with an adaptive ESDIRK method (same contract
    as :func:`~pydiffbridge.solvers.rosenbrock.solve_stiff`, events included); ``opts``:
    names in :data:`ESDIRK_OPTIONS`."""
    if method not in ESDIRK_METHODS:
        raise InputError(f"unknown ESDIRK method {method!r}; choose one of "
                         f"{', '.join(ESDIRK_METHODS)}")
    check_stiff_input(method, y0, opts, ESDIRK_OPTIONS)
    check_esdirk_options(method, opts)
    nrm = norm or (lambda x: torch.linalg.vector_norm(x) / (x.numel() ** 0.5))

    def make(fct, fc, tdtype):
        return EsdirkScheme(method, fct, fc, tdtype, y0.device, opts, rtol, atol, nrm)

    return run_stiff(f, y0, t, make, rtol, atol, norm, opts, method, event_fn, t_max)
