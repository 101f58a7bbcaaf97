"""``method="auto"``: tsit5 while the problem is not stiff, a Rosenbrock method while it is.

Stiffness detection in the explicit phase is Hairer's test of DOPRI5 (E. Hairer, S. P. Nørsett
and G. Wanner, *Solving ODEs I*, 2nd ed., Sec. IV.10 / the code DOPRI5, ``iasti``): the
stages 6 and 7 of tsit5 both sit at ``c = 1`` (the seventh at ``y1`` itself), so

    h rho = |h| ||k7 - k6|| / ||y1 - g6||,   g6 = y + h sum_j a_6j k_j,

estimates ``|h lambda|`` for the dominant eigenvalue ``lambda`` of ``df/dy``.  When it
exceeds 2.0 on
``stiff_detect`` steps (default 15, DOPRI5's count; here rejected steps count too, as a
stability-limited explicit method rejects often) without 6 accepted steps below it in a row in
between, the solve switches to the stiff method (``options["stiff_method"]``,
default ``"rodas5"``).  DOPRI5's threshold is 3.25 (near the real stability boundary of the
5th-order pairs); with tsit5 on Robertson the estimate sat at 1-2.5 through thousands of
stability-limited steps (rtol 1e-8: 3650 steps before the switch), so 2.0 is used here.

In the stiff phase each step start has ``J``; ``rho = ||J||_inf`` (Gershgorin: an upper bound of
the spectral radius) and when the next step satisfies ``h rho < 1`` on ``nonstiff_detect``
(default 5) accepted steps in a row, the explicit method could take that step stably, so the
solve switches back.  (``||J||_inf`` over-estimates ``|lambda|``: the switch back is
conservative.)  Each switch back doubles the count needed for the next one, so that a
problem at the edge of stiffness does not thrash between the methods.

``stats.switches`` counts the switches.  The step size carries over a switch (the controller of
either method then adapts it).  Dense output is that of whichever method took the step
(tsit5's free interpolant, the Rosenbrock method's own).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError
from ..solution import Solution
from .interp import interp_weights
from .rosenbrock import ROSENBROCK_METHODS, STIFF_OPTIONS, RosenbrockScheme, check_stiff_input
from .stages import StageEngine
from .stiff_loop import run_stiff
from .tableaus import TABLEAUS

__all__ = ["AUTO_OPTIONS", "AutoScheme", "solve_auto"]

AUTO_OPTIONS: frozenset[str] = STIFF_OPTIONS | {"stiff_method", "stiff_detect",
                                                "nonstiff_detect"}
_HLAMBDA_STIFF = 2.0  # DOPRI5 (Hairer, Norsett & Wanner I, Sec. IV.10): 3.25; see the doc
_HRHO_NONSTIFF = 1.0


class AutoScheme:
    """tsit5 / Rosenbrock switching for :func:`~pydiffbridge.solvers.stiff_loop.run_stiff`."""

    ifactor, dfactor, fail_factor = 6.0, 0.2, 0.5
    order = 5

    def __init__(self, fct: Callable, fc: Callable, tdtype, device, opts: dict, y0):
        self.fc = fc
        self.stiff_method = opts.get("stiff_method", "rodas5")
        self.stiff = RosenbrockScheme(self.stiff_method, fct, fc, tdtype, device, opts)
        self.tab = TABLEAUS["tsit5"]
        self.eng = StageEngine(self.tab, y0)
        self.detect = int(opts.get("stiff_detect", 15))
        self.detect_back = int(opts.get("nonstiff_detect", 5))
        self.mode = "explicit"
        self.switches = 0
        self.iasti = self.nonsti = self.back = 0
        self._hl = 0.0
        self._end = None  # f(t1, y1) of the last explicit step (FSAL)
        self._rho = 0.0

    def start(self, t: float, y):
        if self.mode == "stiff":
            f0 = self.stiff.start(t, y)
            if f0 is not None:
                with torch.no_grad():
                    self._rho = float(self.stiff.J.detach().abs().sum(-1).max())
            return f0
        f0 = self._end if self._end is not None else self.fc(t, y)
        self._end = None
        if not bool(torch.isfinite(f0.detach()).all()):
            return None
        return f0

    def attempt(self, t: float, y, h: float, f0):
        if self.mode == "stiff":
            y1, err, st = self.stiff.attempt(t, y, h, f0)
            return y1, err, ("stiff", st)
        eng = self.eng
        y1, K = eng.step(self.fc, t, y, f0, h)
        err = eng.error(K, h)
        s = eng.s
        with torch.no_grad():
            g6 = torch.addmv(y.detach(), K[: s - 2].detach().T, eng.a[s - 2], alpha=h)
            den = float(torch.linalg.vector_norm(y1.detach() - g6))
            num = float(torch.linalg.vector_norm(K[s - 1].detach() - K[s - 2].detach()))
            self._hl = abs(h) * num / den if den > 0 else 0.0
        if not torch.is_grad_enabled():
            K = K.clone()  # (the engine's buffer: the next step overwrites it)
        self._K_end = K[s]
        return y1, err, ("explicit", K)

    def dense(self, s, t: float, y, y1, h: float, st):
        if st[0] == "stiff":
            return self.stiff.dense(s, t, y, y1, h, st[1])
        K = st[1]
        W = interp_weights(self.tab, s.to(K.dtype))
        return y[None, :] + h * (W @ K)

    def next_h(self, h_used: float, h_new: float, accepted: bool) -> float:
        if not accepted:
            if self.mode == "explicit" and self._hl > _HLAMBDA_STIFF:
                self.iasti += 1  # a stability-limited explicit method rejects often: count it
            return h_new
        if self.mode == "explicit":
            self._end = self._K_end
            if self._hl > _HLAMBDA_STIFF:
                self.nonsti = 0
                self.iasti += 1
                if self.iasti >= self.detect:
                    self.mode, self.iasti, self.back = "stiff", 0, 0
                    self.switches += 1
                    self._end = None
            else:
                self.nonsti += 1
                if self.nonsti >= 6:
                    self.iasti = 0
            return h_new
        if h_new * self._rho < _HRHO_NONSTIFF:
            self.back += 1
            if self.back >= self.detect_back:
                self.mode, self.back, self.nonsti, self.iasti = "explicit", 0, 0, 0
                self.switches += 1
                self.detect_back *= 2  # each return makes the next one harder: no thrashing
        else:
            self.back = 0
        return h_new

    def stats_extra(self) -> dict:
        return {"switches": self.switches}


def solve_auto(f: Callable, y0: torch.Tensor, t: torch.Tensor, rtol: Any, atol: Any,
               norm: Callable | None, opts: dict, event_fn: Callable | None = None,
               t_max: float = math.inf) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` switching between tsit5 and a Rosenbrock method (same
    contract as :func:`~pydiffbridge.solvers.rosenbrock.solve_stiff`, events included);
    ``stats.switches`` counts the switches.  ``opts``: names in :data:`AUTO_OPTIONS`."""
    check_stiff_input("auto", y0, opts, AUTO_OPTIONS)
    check_auto_options(opts)
    sub = {k: v for k, v in opts.items() if k not in ("stiff_method", "stiff_detect",
                                                       "nonstiff_detect")}

    def make(fct, fc, tdtype):
        return AutoScheme(fct, fc, tdtype, y0.device, {**sub, **{
            k: opts[k] for k in ("stiff_method", "stiff_detect", "nonstiff_detect")
            if k in opts}}, y0)

    return run_stiff(f, y0, t, make, rtol, atol, norm, sub, "auto", event_fn, t_max)


def check_auto_options(opts: dict) -> None:
    m = opts.get("stiff_method", "rodas5")
    if m not in ROSENBROCK_METHODS:
        raise InputError(f"options['stiff_method'] must be one of {ROSENBROCK_METHODS} (the "
                         f"stiff half of method='auto'), got {m!r}")
    for key in ("stiff_detect", "nonstiff_detect"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(f"options[{key!r}] must be an integer >= 1 (accepted steps), got "
                             f"{v!r}; e.g. {key}=15")
