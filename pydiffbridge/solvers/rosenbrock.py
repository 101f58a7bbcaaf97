"""Adaptive Rosenbrock (linearly implicit) methods for stiff problems, in native torch.

Three methods, each one LU factorisation of ``M = I / (h gamma) - J`` per step attempt,
reused by all its stages (``J = df/dy`` at the step's start; kept across rejected retries):

* ``rosenbrock23``: the L-stable (2,3) pair of ``ode23s``, L. F. Shampine and M. W. Reichelt,
  "The MATLAB ODE Suite", SIAM J. Sci. Comput. 18(1), 1997, Sec. 2 (the formulas after
  eq. (2.4)): ``d = 1/(2 + sqrt 2)``, ``e32 = 6 + sqrt 2``, a W-method (second order with any
  ``J``), error estimate ``h/6 (k1 - 2 k2 + k3)`` and the paper's interpolant
  ``y(t + s h) = y + h (s(1-s)/(1-2d) k1 + s(s-2d)/(1-2d) k2)``.  Controller exponent 1/3.
* ``rodas4``: RODAS of E. Hairer and G. Wanner, *Solving ODEs II* (2nd ed., 1996),
  Sec. IV.7 (Table 7.1 ff. and the code RODAS, coefficient set METH=1): six stages, order
  4(3), stiffly accurate, L-stable.  Controller exponent 1/4.
* ``rodas5``: RODAS5(4) of G. A. Di Marzo, "RODAS5(4) - Méthodes de Rosenbrock d'ordre 5(4)
  adaptées aux problèmes différentiels-algébriques", MSc thesis, Univ. Geneva, 1993, with
  the values as published in OrdinaryDiffEq.jl's ``Rodas5Tableau`` (also diffrax's
  ``Rodas5``): eight stages, order 5(4), stiffly accurate, ``gamma = 0.19``.  Controller
  exponent 1/5.

Both RODAS methods run in the transformed form (Hairer & Wanner II, eq. (7.4'))::

    (I/(h g) - J) u_i = f(t + alpha_i h, y + sum_j a_ij u_j) + sum_j (c_ij / h) u_j
                        + gamma_i h df/dt,
    y1 = y + sum_i m_i u_i,   error estimate u_s (the last stage),

with the dense output ``y(s) = (1-s) y + s (y1 + (1-s)(D_1 + s (D_2 + s D_3)))``,
``D_k = sum_j d_kj u_j`` (RODAS4: Hairer & Wanner's ``d2``/``d3``, third order; RODAS5: the
``h2j``/``h3j``/``h4j`` rows of OrdinaryDiffEq.jl's ``Rodas5Tableau``, fourth order).
Step factor limits 0.2 and 6 (RODAS's defaults).

``J`` comes from :class:`~pydiffbridge.solvers.jacobian.Derivatives` (autograd, finite
differences or the user's ``jac``); the step loop is :mod:`~pydiffbridge.solvers.stiff_loop`.

Gradients: the whole solve is differentiable by direct backprop (``lu_factor_ex``/``lu_solve``
are; the autograd Jacobian keeps its graph); the step-size decisions are Python floats and
carry none.  Gradients w.r.t. the output times ``t`` flow as in the explicit loop (see
:mod:`~pydiffbridge.solvers.stiff_loop`), and terminal events (``event_fn``) are located on
the dense output below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError, UnknownMethodError, UnknownOptionError
from ..solution import Solution
from .jacobian import Derivatives, lu_apply, lu_of
from .stiff_loop import run_stiff

__all__ = ["ROSENBROCK_METHODS", "STIFF_METHODS", "STIFF_OPTIONS", "RODAS4", "RODAS5",
           "RosenbrockScheme", "solve_stiff", "check_stiff_input"]

ROSENBROCK_METHODS: tuple[str, ...] = ("rosenbrock23", "rodas4", "rodas5")
STIFF_METHODS: tuple[str, ...] = ROSENBROCK_METHODS
STIFF_OPTIONS: frozenset[str] = frozenset({
    "first_step", "max_num_steps", "min_step", "max_step", "jac", "jacobian", "autonomous",
    "safety", "ifactor", "dfactor", "dtype", "fixed_step", "jac_blocks"})

_D23 = 1.0 / (2.0 + math.sqrt(2.0))  # ode23s's d (Shampine & Reichelt 1997)
_E32 = 6.0 + math.sqrt(2.0)

#: RODAS (METH=1) in the transformed form: Hairer & Wanner, Solving ODEs II, Sec. IV.7.
RODAS4 = {
    "gamma": 0.25,
    "alpha": (0.0, 0.386, 0.21, 0.63, 1.0, 1.0),
    "gammas": (0.25, -0.1043, 0.1035, -0.3620000000000023e-01, 0.0, 0.0),
    "a": ((), (1.544,), (0.9466785280815826, 0.2557011698983284),
          (3.314825187068521, 2.896124015972201, 0.9986419139977817),
          (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950),
          (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950, 1.0)),
    "c": ((), (-5.6688,), (-2.430093356833875, -0.2063599157091915),
          (-0.1073529058151375, -9.594562251023355, -20.47028614809616),
          (7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160),
          (8.083246795921522, -7.981132988064893, -31.52159432874371, 16.31930543123136,
           -6.058818238834054)),
    # y1 = (stage 6 argument) + u6; the embedded (order 3) solution is the stage 6 argument
    "m": (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950,
          1.0, 1.0),
    "dense": ((10.12623508344586, -7.487995877610167, -34.80091861555747, -7.992771707568823,
           1.025137723295662),
              (-0.6762803392801253, 6.087714651680015, 16.43084320892478, 24.76722511418386,
           -6.594389125716872)),
}


_R5A6 = (-14.09640773051259, 6.925207756232704, -41.47510893210728, 2.343771018586405,
         24.13215229196062)
#: RODAS5(4) (Di Marzo 1993) in the transformed form; the values of OrdinaryDiffEq.jl's
#: ``Rodas5Tableau`` (a_ij, C_ij, c_i, d_i = gamma_i, dense-output rows h2j, h3j, h4j).
RODAS5 = {
    "gamma": 0.19,
    "alpha": (0.0, 0.38, 0.3878509998321533, 0.4839718937873840, 0.4570477008819580, 1.0, 1.0,
              1.0),
    "gammas": (0.19, -0.1823079225333714636, -0.319231832186874912, 0.3449828624725343,
               -0.377417564392089818, 0.0, 0.0, 0.0),
    "a": ((), (2.0,), (3.040894194418781, 1.041747909077569),
          (2.576417536461461, 1.622083060776640, -0.9089668560264532),
          (2.760842080225597, 1.446624659844071, -0.3036980084553738, 0.2877498600325443),
          _R5A6, _R5A6 + (1.0,), _R5A6 + (1.0, 1.0)),
    "c": ((), (-10.31323885133993,), (-21.04823117650003, -7.234992135176716),
          (32.22751541853323, -4.943732386540191, 19.44922031041879),
          (-20.69865579590063, -8.816374604402768, 1.260436877740897, -0.7495647613787146),
          (-46.22004352711257, -17.49534862857472, -289.6389582892057, 93.60855400400906,
           318.3822534212147),
          (34.20013733472935, -14.15535402717690, 57.82335640988400, 25.83362985412365,
           1.408950972071624, -6.551835421242162),
          (42.57076742291101, -13.80770672017997, 93.98938432427124, 18.77919633714503,
           -31.58359187223370, -6.685968952921985, -5.810979938412932)),
    # y1 = (stage 8 argument) + u8; the embedded (order 4) solution is the stage 8 argument
    "m": _R5A6 + (1.0, 1.0, 1.0),
    "dense": ((27.354592673333357, -6.925207756232857, 26.40037733258859, 0.5635230501052979,
               -4.699151156849391, -1.6008677469422725, -1.5306074446748028,
               -1.3929872940716344),
              (44.19024239501722, 1.3677947663381929e-13, 202.93261852171622,
               -35.5669339789154, -181.91095152160645, 3.4116351403665033,
               2.5793540257308067, 2.2435122582734066),
              (-44.0988150021747, -5.755396159656812e-13, -181.26175034586677,
               56.99302194811676, 183.21182741427398, -7.480257918273637,
               -5.792426076169686, -5.32503859794143)),
}

_TABLES = {"rodas4": RODAS4, "rodas5": RODAS5}
_ORDER = {"rosenbrock23": 3, "rodas4": 4, "rodas5": 5}  # exponent 1/order of the controller
_GAMMA = {"rosenbrock23": _D23, "rodas4": RODAS4["gamma"], "rodas5": RODAS5["gamma"]}


def _lin(coeffs, vecs):
    """``sum_i coeffs[i] * vecs[i]`` (skipping zeros)."""
    out = None
    for c, v in zip(coeffs, vecs, strict=False):  # (a row may stop before the last stage)
        if c != 0.0:
            out = v * c if out is None else out + v * c
    return out if out is not None else torch.zeros_like(vecs[0])


def factor(J: torch.Tensor, hg: float):
    """LU of ``I/(h gamma) - J`` (``J``: ``(n, n)`` or blocks ``(B, m, m)``)."""
    return lu_of(J, 1.0 / hg, 1.0)


_solve = lu_apply


def _step_ros23(fc, t, y, h, f0, ft, lu, solve=_solve, ht=None, keep=None):
    """One ode23s step (Shampine & Reichelt 1997, Sec. 2); ``lu`` factors I/(h d) - J, so
    ``W^{-1} r = lu^{-1} r / (h d)`` with ``W = I - h d J``.

    Per-sample stepping (:mod:`~pydiffbridge.solvers.batched_stiff`) passes ``t``/``ht`` of
    shape ``(B,)`` (stage times ``t + c ht``), ``h`` of shape ``(B, 1)`` for the algebra, its
    block ``solve`` and ``keep``, which zeroes the increments of the samples that do not step
    (``ht = 0`` for them, ``h`` a safe stand-in); a single solve passes floats."""
    ht = h if ht is None else ht
    keep = keep or (lambda v: v)
    hd = h * _D23
    T = ft * hd if ft is not None else None
    r1 = f0 if T is None else f0 + T
    k1 = keep(solve(lu, r1) / hd)
    F1 = fc(t + 0.5 * ht, y + (0.5 * h) * k1)
    k2 = keep(solve(lu, F1 - k1) / hd + k1)
    y1 = y + h * k2
    F2 = fc(t + ht, y1)
    r3 = F2 - _E32 * (k2 - F1) - 2.0 * (k1 - f0)
    if T is not None:
        r3 = r3 + T
    k3 = keep(solve(lu, r3) / hd)
    err = (h / 6.0) * (k1 - 2.0 * k2 + k3)
    return y1, err, (k1, k2)


def _step_rodas(tab: dict, fc, t, y, h, f0, ft, lu, solve=_solve, ht=None, keep=None):
    """One RODAS step in the transformed form (Hairer & Wanner II, eq. (7.4')); the arguments
    as for :func:`_step_ros23`."""
    ht = h if ht is None else ht
    U: list[torch.Tensor] = []
    for i, alpha in enumerate(tab["alpha"]):
        fi = f0 if i == 0 else fc(t + alpha * ht, y + _lin(tab["a"][i], U))
        r = fi
        if i:
            r = r + _lin(tab["c"][i], U) / h
        g = tab["gammas"][i]
        if ft is not None and g != 0.0:
            r = r + ft * (g * h)
        u = solve(lu, r)
        U.append(keep(u) if keep is not None else u)
    return y + _lin(tab["m"], U), U[-1], tuple(U)


def _interp(method: str, s: torch.Tensor, y, y1, h, st) -> torch.Tensor:
    """Dense output at fractions ``s`` of the step, broadcast against ``y``, ``y1``, ``h`` and
    the stages ``st``: ``s`` of shape ``(k, 1)`` with ``(n,)`` vectors gives rows ``(k, n)``;
    per-sample stepping passes ``(B, k, 1)`` fractions with ``(B, 1, n)`` vectors."""
    if method == "rosenbrock23":
        k1, k2 = st
        den = 1.0 - 2.0 * _D23
        return y + h * ((s * (1 - s) / den) * k1 + (s * (s - 2 * _D23) / den) * k2)
    D = [_lin(row, st) for row in _TABLES[method]["dense"]]
    acc = D[-1]
    for Dk in reversed(D[:-1]):
        acc = Dk + s * acc
    return (1 - s) * y + s * (y1 + (1 - s) * acc)


class RosenbrockScheme:
    """One of :data:`ROSENBROCK_METHODS` for :func:`~pydiffbridge.solvers.stiff_loop.run_stiff`:
    ``J`` and ``df/dt`` at each step start, one LU per attempt."""

    ifactor, dfactor, fail_factor = 6.0, 0.2, 0.25

    def __init__(self, method: str, fct: Callable, fc: Callable, tdtype, device, opts: dict):
        self.method, self.fc = method, fc
        self.derivs = Derivatives(fct, opts, tdtype, device, method)
        self.order, self.gamma = _ORDER[method], _GAMMA[method]
        self.J = self.ft = None

    def start(self, t: float, y: torch.Tensor):
        f0, J, ft = self.derivs(t, y)
        parts = [f0, J] + ([ft] if ft is not None else [])
        if not all(bool(torch.isfinite(p.detach()).all()) for p in parts):
            return None
        self.J, self.ft = J, ft
        return f0

    def attempt(self, t: float, y, h: float, f0):
        lu = factor(self.J, h * self.gamma)
        if self.method == "rosenbrock23":
            return _step_ros23(self.fc, t, y, h, f0, self.ft, lu)
        return _step_rodas(_TABLES[self.method], self.fc, t, y, h, f0, self.ft, lu)

    def dense(self, s, t: float, y, y1, h: float, st):
        return _interp(self.method, s[:, None], y, y1, h, st)

    def next_h(self, h_used: float, h_new: float, accepted: bool) -> float:
        return h_new

    def stats_extra(self) -> dict:
        return {}


def check_stiff_input(method: str, y0: torch.Tensor, opts: dict, allowed) -> None:
    """The checks every stiff solver makes before it starts (names, state dtype)."""
    bad = sorted(set(opts) - set(allowed))
    if bad:
        raise UnknownOptionError(f"option(s) {bad} not understood by method {method!r}; it "
                                 f"accepts: {', '.join(sorted(allowed))}")
    if y0.is_complex() or not y0.is_floating_point():
        raise InputError(f"method {method!r} needs a real floating-point state, got {y0.dtype}; "
                         "solve a complex system as its real and imaginary parts")


def solve_stiff(f: Callable, y0: torch.Tensor, t: torch.Tensor, method: str, rtol: Any,
                atol: Any, norm: Callable | None, opts: dict, event_fn: Callable | None = None,
                t_max: float = math.inf) -> Solution:
    """Integrate the stiff ``dy/dt = f(t, y)`` on the flat state ``y0`` (shape ``(n,)``) with
    an adaptive Rosenbrock method and report at times ``t``; the same contract as
    :func:`pydiffbridge.solvers.rk.solve_adaptive`: a :class:`Solution` whose ``status`` says
    why it stopped (rows never reached are NaN), never an exception on numerical trouble.

    ``method``: one of :data:`ROSENBROCK_METHODS`; ``opts``: names in :data:`STIFF_OPTIONS`;
    ``event_fn``/``t_max``: a terminal event, as for
    :func:`~pydiffbridge.solvers.stiff_loop.run_stiff`.
    """
    if method not in ROSENBROCK_METHODS:
        raise UnknownMethodError(f"unknown Rosenbrock method {method!r}; choose one of "
                                 f"{', '.join(ROSENBROCK_METHODS)}")
    check_stiff_input(method, y0, opts, STIFF_OPTIONS)

    def make(fct, fc, tdtype):
        return RosenbrockScheme(method, fct, fc, tdtype, y0.device, opts)

    return run_stiff(f, y0, t, make, rtol, atol, norm, opts, method, event_fn, t_max)
