"""Step-size selection: Hairer's initial step and an I/PI/PID controller."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Controller", "initial_step", "error_ratio", "error_scale"]

Norm = Callable[[torch.Tensor], torch.Tensor]


def error_scale(y0: torch.Tensor, y1: torch.Tensor, rtol, atol) -> torch.Tensor:
    """``atol + rtol * max(|y0|, |y1|)``: the scale of an error estimate (Hairer I, II.4.11)."""
    return torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)


def error_ratio(err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol, atol,
                norm: Norm) -> float:
    """``norm(err / error_scale(y0, y1))`` as a Python float."""
    return float(norm(err / error_scale(y0, y1, rtol, atol)))


def initial_step(f, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float, order: int,
                 rtol, atol, norm: Norm) -> float:
    """Hairer, Norsett & Wanner, *Solving ODEs I*, Sec. II.4, "Starting step size" (a)-(f).

    Costs one evaluation of ``f``.  Returns a positive step length.
    """
    scale = y0.abs() * rtol + atol
    d0 = float(norm(y0 / scale))
    d1 = float(norm(f0 / scale))
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    y1 = y0 + (direction * h0) * f0
    f1 = f(t0 + direction * h0, y1)
    d2 = float(norm((f1 - f0) / scale)) / h0
    big = max(d1, d2)
    if not math.isfinite(big):
        return h0
    if big <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / big) ** (1.0 / order)
    return min(100 * h0, h1)


@dataclass
class Controller:
    """PID step-size controller in Söderlind's form (G. Söderlind, "Digital filters in adaptive
    time-stepping", ACM TOMS 29(1), 2003), with the classic safety factor and clipping.

    With ``pcoeff = dcoeff = 0`` and ``icoeff = 1`` (the defaults) this is the elementary
    I controller ``h_new = h * clip(safety * ratio^(-1/k), dfactor, ifactor)``, ``k`` the
    method's order (Hairer I, eq. II.4.13).  A rejected step never grows the step; an accepted
    one never shrinks it below ``h`` unless ``ratio > 1`` (as in torchdiffeq).
    """

    order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    prev: float = 1.0
    prev2: float = 1.0

    def next_step(self, h: float, ratio: float, accepted: bool) -> float:
        if ratio == 0.0:
            return h * self.ifactor
        if not math.isfinite(ratio):
            return h * self.dfactor
        k = float(self.order)
        p, i, d = self.pcoeff, self.icoeff, self.dcoeff
        factor = ratio ** (-(i + p + d) / k)
        if p or d:
            factor *= self.prev ** ((p + 2 * d) / k) * self.prev2 ** (-d / k)
        factor *= self.safety
        lo = 1.0 if ratio < 1 else self.dfactor
        factor = min(self.ifactor, max(factor, lo))
        if not accepted:
            factor = min(factor, 1.0)
        if accepted:
            self.prev2, self.prev = self.prev, max(ratio, 1e-10)
        return h * factor
