"""Butcher tableaux of the explicit Runge-Kutta methods, with their sources.

Conventions: ``c`` nodes, ``a`` the strictly lower-triangular rows (row ``i`` has ``i``
entries), ``b`` the weights of the propagated solution, ``e`` the error weights
``b - b_hat`` (``h * sum(e_i k_i)`` estimates the local error).  ``e`` may have one entry more
than there are stages: that entry weighs ``f(t + h, y1)``, the first stage of the next step.
``order`` is the order of the propagated solution; the step-size controller uses the
exponent ``1 / order`` (= ``1/(q+1)`` with ``q = order - 1`` the embedded order, Hairer,
Norsett & Wanner, *Solving ODEs I*, eq. II.4.13).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction as F

import torch

from . import _dop853

__all__ = ["Tableau", "TABLEAUS", "DOPRI5_MID", "advance", "coefficients"]


@dataclass(frozen=True)
class Tableau:
    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    e: tuple[float, ...] | None
    order: int
    fsal: bool = False
    interp: str = "hermite"  # "hermite" | "dopri5" | "tsit5"
    error_kind: str = "embedded"  # "embedded" | "dop853"
    e3: tuple[float, ...] | None = None  # DOP853's third-order error weights

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.e is not None


@functools.lru_cache(maxsize=128)
def coefficients(tab: Tableau, dtype: torch.dtype, device: torch.device) -> tuple:
    """``(a, b, e, e3)`` of ``tab`` as tensors (``a``: one per row, ``None`` for the empty
    first row; ``e``/``e3`` may be ``None``), made once per dtype and device: building them
    costs more than a short solve's steps.  Shared by every solve: never modify them."""
    # made outside inference mode: inference tensors could not take part in a later
    # differentiable solve
    with torch.inference_mode(False), torch.no_grad():
        kw = dict(dtype=dtype, device=device)
        a = tuple(torch.tensor(r, **kw) if r else None for r in tab.a)
        b = torch.tensor(tab.b, **kw)
        e = torch.tensor(tab.e, **kw) if tab.e is not None else None
        e3 = torch.tensor(tab.e3, **kw) if tab.e3 is not None else None
    return a, b, e, e3


def _f(xs) -> tuple[float, ...]:
    return tuple(float(x) for x in xs)


def _rows(rows) -> tuple[tuple[float, ...], ...]:
    return tuple(_f(r) for r in rows)


def _err(b, bhat) -> tuple[float, ...]:
    n = max(len(b), len(bhat))
    b = list(b) + [0] * (n - len(b))
    bhat = list(bhat) + [0] * (n - len(bhat))
    return _f(F(x) - F(y) for x, y in zip(b, bhat, strict=True))


# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae", J. Comput. Appl.
# Math. 6(1); the 5(4) pair "RK5(4)7M", FSAL.
_DP5_B = [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0]
# The published fourth-order companion (Hairer's DOPRI5 code) ...
DP5_BHAT_DP = [F(5179, 57600), 0, F(7571, 16695), F(393, 640), F(-92097, 339200),
               F(187, 2100), F(1, 40)]
# ... and the alternative fourth-order companion of the Dormand-Prince-Shampine ("DPS")
# formulation that torchdiffeq's dopri5 uses.  Both satisfy the order-4 conditions (checked in
# tests/test_tableaus.py); we use the DPS one so that the step sequence, and so the NFE, of a
# torchdiffeq user's dopri5 solve is unchanged after switching libraries.
_DP5_BHAT = [F(1951, 21600), 0, F(22642, 50085), F(451, 720), F(-12231, 42400), F(649, 6300),
             F(1, 60)]
DOPRI5 = Tableau(
    "dopri5",
    c=_f([0, F(1, 5), F(3, 10), F(4, 5), F(8, 9), 1, 1]),
    a=_rows([
        [],
        [F(1, 5)],
        [F(3, 40), F(9, 40)],
        [F(44, 45), F(-56, 15), F(32, 9)],
        [F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)],
        [F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)],
        _DP5_B[:6],
    ]),
    b=_f(_DP5_B),
    e=_err(_DP5_B, _DP5_BHAT),
    order=5,
    fsal=True,
    interp="dopri5",
)

# Shampine (1986), "Some practical Runge-Kutta formulas", Math. Comp. 46(173): weights of the
# fourth-order accurate value at the midpoint of a Dormand-Prince step, y(t0 + h/2) =
# y0 + h * sum(DOPRI5_MID_i k_i); the dense output is the quartic through y0, y_mid, y1 with
# slopes f0, f1.
DOPRI5_MID = _f([
    F(6025192743, 30085553152) / 2, 0, F(51252292925, 65400821598) / 2,
    F(-2691868925, 45128329728) / 2, F(187940372067, 1594534317056) / 2,
    F(-1776094331, 19743644256) / 2, F(11237099, 235043384) / 2,
])

# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Comput. Math. Appl. 62(2), Table 1 (FSAL; b = last row of a).
_TS_A = [
    [],
    [0.161],
    [-0.008480655492356989, 0.335480655492357],
    [2.897153057105493, -6.359448489975075, 4.3622954328695815],
    [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
    [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
     -0.028269050394068383],
    [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
     2.324710524099774],
]
TSIT5 = Tableau(
    "tsit5",
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=_rows(_TS_A),
    b=_f(_TS_A[6] + [0.0]),
    # b - b_hat, from the same table ("btilde").
    e=(-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995,
       -0.1447110071732629, 0.5823571654525552, -0.45808210592918697,
       0.015151515151515152),
    order=5,
    fsal=True,
    interp="tsit5",
)

# Bogacki & Shampine (1989), "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett. 2(4). FSAL.
_BS3_B = [F(2, 9), F(1, 3), F(4, 9), 0]
BOSH3 = Tableau(
    "bosh3",
    c=_f([0, F(1, 2), F(3, 4), 1]),
    a=_rows([[], [F(1, 2)], [0, F(3, 4)], _BS3_B[:3]]),
    b=_f(_BS3_B),
    e=_err(_BS3_B, [F(7, 24), F(1, 4), F(1, 3), F(1, 8)]),
    order=3,
    fsal=True,
)

# Fehlberg (1969), NASA TR R-315, the low-order pair RKF1(2) used as "fehlberg2":
# second-order solution with a first-order embedded one.
_F2_B = [F(1, 512), F(255, 256), F(1, 512)]
FEHLBERG2 = Tableau(
    "fehlberg2",
    c=_f([0, F(1, 2), 1]),
    a=_rows([[], [F(1, 2)], [F(1, 256), F(255, 256)]]),
    b=_f(_F2_B),
    e=_err(_F2_B, [F(1, 256), F(255, 256), 0]),
    order=2,
)

# Heun's method (explicit trapezoid) with Euler as the embedded first-order solution.
ADAPTIVE_HEUN = Tableau(
    "adaptive_heun",
    c=(0.0, 1.0),
    a=((), (1.0,)),
    b=(0.5, 0.5),
    e=(-0.5, 0.5),
    order=2,
)

# DOP853: Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.10; error from the combined
# 5th/3rd-order estimators of the DOP853 code, error-estimator order 7.
DOPRI8 = Tableau(
    "dopri8",
    c=_f(_dop853.C),
    a=_rows(_dop853.A),
    b=_f(_dop853.B),
    e=_f(_dop853.E5),
    e3=_f(_dop853.E3),
    order=8,
    error_kind="dop853",
)

# Fixed-step classics (Butcher, *Numerical Methods for ODEs*, 3rd ed., Sec. 23x).
EULER = Tableau("euler", c=(0.0,), a=((),), b=(1.0,), e=None, order=1)
MIDPOINT = Tableau("midpoint", c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), e=None, order=2)
HEUN2 = Tableau("heun2", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), e=None, order=2)
# Heun's third-order method.
HEUN3 = Tableau(
    "heun3",
    c=_f([0, F(1, 3), F(2, 3)]),
    a=_rows([[], [F(1, 3)], [0, F(2, 3)]]),
    b=_f([F(1, 4), 0, F(3, 4)]),
    e=None,
    order=3,
)
# Kutta's 3/8 rule (Kutta 1901), the fourth-order method torchdiffeq calls "rk4".
RK4 = Tableau(
    "rk4",
    c=_f([0, F(1, 3), F(2, 3), 1]),
    a=_rows([[], [F(1, 3)], [F(-1, 3), 1], [1, -1, 1]]),
    b=_f([F(1, 8), F(3, 8), F(3, 8), F(1, 8)]),
    e=None,
    order=4,
)

TABLEAUS: dict[str, Tableau] = {
    t.name: t
    for t in (DOPRI5, TSIT5, BOSH3, FEHLBERG2, ADAPTIVE_HEUN, DOPRI8, EULER, MIDPOINT, HEUN2,
              HEUN3, RK4)
}


def advance(y, h: float, coeffs, ks):
    """``y + h Σ c_j k_j``, the increment summed first: adding each term to ``y`` in turn
    rounds at ``y``'s magnitude once per stage (in float32 that biased rk4's event times)."""
    incr = None
    for c, k in zip(coeffs, ks, strict=True):
        if c != 0.0:
            term = (h * c) * k
            incr = term if incr is None else incr + term
    return y if incr is None else y + incr
