"""Step-size selection: Hairer's initial step and an I/PI/PID controller."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Controller", "initial_step", "error_ratio", "error_scale", "BufferedScale"]

Norm = Callable[[torch.Tensor], torch.Tensor]


def error_scale(y0: torch.Tensor, y1: torch.Tensor, rtol, atol) -> torch.Tensor:
    """``atol + rtol * max(|y0|, |y1|)``: the scale of an error estimate (Hairer I, II.4.11)."""
    return torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)


class BufferedScale:
    """:func:`error_scale` for the no-autograd loops, on buffers made once and with the same
    arithmetic (the loops agree with the autograd path to the last bit).

    ``|y1|`` goes into row ``row`` of a buffer of ``rows`` copies of the state's shape (one per
    row where the loop may keep a ``y1``); when the loop makes that ``y1`` its new state
    (:meth:`became_state`), the next step reuses it as ``|y|``.  A state from elsewhere gets its
    ``|.|`` in row 0."""

    def __init__(self, like: torch.Tensor, rows: int):
        self._abs = like.new_empty((rows, *like.shape)).unbind(0)
        self._out = torch.empty_like(like)
        self._of: torch.Tensor | None = None  # the state whose |.| is in row self._row
        self._row = 0
        self.abs1: torch.Tensor | None = None

    def __call__(self, y: torch.Tensor, y1: torch.Tensor, row: int, rtol, atol) -> torch.Tensor:
        if self._of is not y:
            self._of, self._row = y, 0
            torch.abs(y, out=self._abs[0])
        self.abs1 = torch.abs(y1, out=self._abs[row])
        scale = torch.maximum(self._abs[self._row], self.abs1, out=self._out)
        return scale.mul_(rtol).add_(atol)

    def became_state(self, y1: torch.Tensor, row: int) -> None:
        """``y1`` (whose ``|.|`` is in ``row``) is the loop's new state."""
        self._of, self._row = y1, row

    def forget(self) -> None:
        """The state was changed in place: recompute ``|y|`` next time."""
        self._of = None

    def y1_sum_finite(self) -> bool:
        """Whether ``sum |y1|`` is finite: then every element is (a sum of finite values is
        finite unless it overflows; callers look element by element when it is not)."""
        return math.isfinite(self.abs1.sum().item())


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
