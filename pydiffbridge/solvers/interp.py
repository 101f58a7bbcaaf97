"""Dense output: weights over a step's stages that give the state anywhere inside the step.

Every interpolant here is written as ``y(t0 + θh) = y0 + h * Σ_j w_j(θ) K_j`` where ``K`` holds
the step's stages and, in its last row, ``f(t0 + h, y1)``.  That form lets one matrix product
evaluate several output times at once and keeps the result differentiable in the stages.
"""

from __future__ import annotations

import functools
from fractions import Fraction as F

import torch

from . import _dop853
from .tableaus import DOPRI5_MID, Tableau

__all__ = ["dop853_extra_stages", "dop853_weights", "interp_weights"]


def _hermite(theta: torch.Tensor, tab: Tableau, s: int) -> torch.Tensor:
    """Cubic Hermite through (y0, f0) and (y1, f1); third-order accurate."""
    th2 = theta * theta
    th3 = th2 * theta
    h01 = 3 * th2 - 2 * th3  # weight of (y1 - y0)
    h10 = th3 - 2 * th2 + theta  # weight of h * f0
    h11 = th3 - th2  # weight of h * f1
    b = torch.tensor(tab.b + (0.0,) * (s + 1 - len(tab.b)), dtype=theta.dtype, device=theta.device)
    w = h01[:, None] * b[None, :]
    w[:, 0] += h10
    w[:, s] += h11
    return w


# Quartic through y0, y_mid = y(1/2), y1 with end slopes: p(θ) = y0 + θ h f0 + c2 θ² + c3 θ³
# + c4 θ⁴, where [c2, c3, c4] = _Q @ [y1 - y0 - h f0, h (f1 - f0), y_mid - y0 - h f0 / 2].
# _Q is the inverse of [[1, 1, 1], [2, 3, 4], [1/4, 1/8, 1/16]] (solved exactly below).
def _inverse3(m):
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    adj = [
        [e * i - f * h, c * h - b * i, b * f - c * e],
        [f * g - d * i, a * i - c * g, c * d - a * f],
        [d * h - e * g, b * g - a * h, a * e - b * d],
    ]
    return [[x / det for x in row] for row in adj]


_Q = _inverse3([[F(1), F(1), F(1)], [F(2), F(3), F(4)], [F(1, 4), F(1, 8), F(1, 16)]])


@functools.lru_cache(maxsize=32)
def _dopri5_coeffs(tab: Tableau, s: int, dtype: torch.dtype, device: torch.device):
    """``(e0, C)``: the weights are ``θ e0 + [θ², θ³, θ⁴] @ C`` (made once per dtype/device,
    outside inference mode; never modified)."""
    with torch.inference_mode(False), torch.no_grad():
        kw = dict(dtype=dtype, device=device)
        e0 = torch.zeros(s + 1, **kw)
        e0[0] = 1
        e_end = torch.zeros(s + 1, **kw)
        e_end[s] = 1
        b = torch.zeros(s + 1, **kw)
        b[: len(tab.b)] = torch.tensor(tab.b, **kw)
        mid = torch.zeros(s + 1, **kw)
        mid[: len(DOPRI5_MID)] = torch.tensor(DOPRI5_MID, **kw)
        rhs = torch.stack([b - e0, e_end - e0, mid - e0 / 2])  # (3, s+1)
        q = torch.tensor([[float(x) for x in row] for row in _Q], **kw)
        return e0, q @ rhs  # (3, s+1): weights of c2, c3, c4


def _dopri5(theta: torch.Tensor, tab: Tableau, s: int) -> torch.Tensor:
    """Fourth-order dense output of Dormand-Prince 5(4) via Shampine's midpoint value."""
    e0, c = _dopri5_coeffs(tab, s, theta.dtype, theta.device)
    powers = torch.stack([theta**2, theta**3, theta**4], dim=1)  # (m, 3)
    return theta[:, None] * e0[None, :] + powers @ c


# Tsitouras (2011), Sec. 3: the continuous extension b_i(θ) of Tsit5 (free of extra stages).
def _tsit5(theta: torch.Tensor, tab: Tableau, s: int) -> torch.Tensor:
    t = theta
    t2 = t * t
    cols = [
        -1.0530884977290216 * t * (t - 1.3299890189751412) * (t2 - 1.4364028541716351 * t
                                                               + 0.7139816917074209),
        0.1017 * t2 * (t2 - 2.1966568338249754 * t + 1.2949852507374631),
        2.490627285651252793 * t2 * (t2 - 2.38535645472061657 * t + 1.57803468208092486),
        -16.54810288924490272 * (t - 1.21712927295533244) * (t - 0.61620406037800089) * t2,
        47.37952196281928122 * (t - 1.203071208372362603) * (t - 0.658047292653547382) * t2,
        -34.87065786149660974 * (t - 1.2) * (t - 0.666666666666666667) * t2,
        2.5 * (t - 1) * (t - 0.6) * t2,
    ]
    w = torch.stack(cols, dim=1)
    pad = torch.zeros(w.shape[0], s + 1 - w.shape[1], dtype=w.dtype, device=w.device)
    return torch.cat([w, pad], dim=1)


_KINDS = {"hermite": _hermite, "dopri5": _dopri5, "tsit5": _tsit5}


def interp_weights(tab: Tableau, theta: torch.Tensor) -> torch.Tensor:
    """Weights ``(len(theta), stages + 1)`` for ``y0 + h * W @ K`` at step fractions ``theta``."""
    return _KINDS[tab.interp](theta, tab, tab.stages)


def dop853_extra_stages(fc, tc: float, y: torch.Tensor, K: torch.Tensor, hs: float) -> torch.Tensor:
    """The three extra stages of DOP853's dense output (rows 13-15 after ``K``'s 12 stages and
    ``f(t1, y1)``); ``fc(t, y)`` evaluates the right-hand side at a float time."""
    rows = list(K[:13])
    for c, a in zip(_dop853.C_EXTRA, _dop853.A_EXTRA, strict=True):
        incr = sum(ai * rows[i] for i, ai in enumerate(a) if ai != 0.0)
        rows.append(fc(tc + c * hs, y + hs * incr))
    return torch.stack(rows[13:])


@functools.lru_cache(maxsize=8)
def _dop853_F(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(7, 16): the interpolant's coefficients F_0..F_6 as weights over the 16 stages, where
    y(t0 + θh) = y0 + θ(F0 + (1-θ)(F1 + θ(F2 + (1-θ)(F3 + θ(F4 + (1-θ)(F5 + θ F6)))))) · hK."""
    with torch.inference_mode(False), torch.no_grad():
        kw = dict(dtype=dtype, device=device)
        b = torch.zeros(16, **kw)
        b[:12] = torch.tensor(_dop853.B, **kw)
        e0 = torch.zeros(16, **kw)
        e0[0] = 1
        e_end = torch.zeros(16, **kw)
        e_end[12] = 1
        d = torch.tensor(_dop853.D, **kw)
        return torch.cat([torch.stack([b, e0 - b, 2 * b - e0 - e_end]), d])


def dop853_weights(theta: torch.Tensor) -> torch.Tensor:
    """Weights ``(len(theta), 16)`` of DOP853's seventh-order dense output over the 12 stages,
    ``f(t1, y1)`` and :func:`dop853_extra_stages` (Hairer, Norsett & Wanner, Sec. II.10)."""
    F = _dop853_F(theta.dtype, theta.device)
    th = theta[:, None]
    w = torch.zeros(theta.shape[0], 16, dtype=theta.dtype, device=theta.device)
    for k in range(6, -1, -1):  # innermost first; the factors alternate θ, 1-θ outwards
        w = (w + F[k]) * (th if k % 2 == 0 else 1 - th)
    return w
