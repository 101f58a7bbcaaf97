"""Terminal events: detect a sign change of ``event_fn(t, y)`` over an accepted step, locate
the root on the step's dense output, and make the event time differentiable.

The root is found without gradients (Illinois regula falsi on the interpolant).  The
differentiable event time is then one Newton step from that root,
``t* = t_r - g(t_r, y(t_r)) / (dg/dt)`` with the slope held constant: its value is ``t_r``
(``g`` vanishes there) and its derivative is the implicit-function-theorem derivative
``-(∂g/∂θ) / (dg/dt)``.
"""

from __future__ import annotations

import torch

from .interp import interp_weights

__all__ = ["EventTracker"]


class EventTracker:
    def __init__(self, event_fn, tdtype, device, t0: float, y0: torch.Tensor):
        self.fn = event_fn
        self.tdtype = tdtype
        self.device = device
        with torch.no_grad():
            self.g0 = self._g(t0, y0.detach())

    def _g(self, t: float, y: torch.Tensor) -> torch.Tensor:
        return self.fn(torch.tensor(t, dtype=self.tdtype, device=self.device), y).reshape(-1)

    @staticmethod
    def _interp(tab, y, K, hs, theta):
        W = interp_weights(tab, theta.reshape(1).to(K.real.dtype))
        if K.is_complex():
            W = W.to(K.dtype)
        return y + hs * (W @ K)[0]

    def check(self, tc, t1, hs, y, y1, K, tab, f=None):
        with torch.no_grad():
            g1 = self._g(t1, y1.detach())
            g0 = self.g0
            crossed = ((g0 * g1) < 0) | ((g1 == 0) & (g0 != 0))
            if not bool(crossed.any()):
                self.g0 = g1
                return None
            Kd, yd = K.detach(), y.detach()
            best = None
            for c in torch.nonzero(crossed).reshape(-1).tolist():
                def g_at(th: float, c: int = c) -> float:
                    theta = torch.tensor(th, dtype=yd.real.dtype, device=yd.device)
                    return float(self._g(tc + th * hs, self._interp(tab, yd, Kd, hs, theta))[c])

                th = self._root(g_at, float(g0[c]), float(g1[c]))
                if best is None or th < best[0]:
                    best = (th, c)
        th, c = best
        t_r = tc + th * hs
        t_rt = torch.tensor(t_r, dtype=self.tdtype, device=self.device)
        if not torch.is_grad_enabled():
            return t_rt, self._interp(tab, y, K, hs, torch.tensor(th, dtype=y.real.dtype,
                                                                 device=y.device))
        # differentiable event time: one Newton step with a frozen slope
        theta_r = torch.tensor(th, dtype=y.real.dtype, device=y.device)
        y_r = self._interp(tab, y, K, hs, theta_r)
        g = self.fn(t_rt, y_r).reshape(-1)[c]
        with torch.enable_grad():
            tt = t_rt.detach().clone().requires_grad_(True)
            thv = (tt.to(y.real.dtype) - tc) / hs
            yy = self._interp(tab, y.detach(), K.detach(), hs, thv)
            gg = self.fn(tt, yy).reshape(-1)[c]
            (slope,) = torch.autograd.grad(gg, tt)
        t_ev = t_rt - g.to(self.tdtype) / slope.detach()
        theta = (t_ev.to(y.real.dtype) - tc) / hs
        return t_ev, self._interp(tab, y, K, hs, theta)

    @staticmethod
    def _root(fun, ga: float, gb: float, tol: float = 1e-13, iters: int = 200) -> float:
        """Illinois variant of regula falsi on [0, 1] with g(0)=ga, g(1)=gb of opposite signs."""
        a, b = 0.0, 1.0
        if gb == 0.0:
            return 1.0
        side = 0
        c_prev = -1.0
        for _ in range(iters):
            c = (a * gb - b * ga) / (gb - ga)
            gc = fun(c)
            if gc == 0.0 or abs(b - a) < tol or abs(c - c_prev) < tol:
                return c
            c_prev = c
            if (gc > 0) == (gb > 0):
                b, gb = c, gc
                if side == -1:
                    ga /= 2
                side = -1
            else:
                a, ga = c, gc
                if side == 1:
                    gb /= 2
                side = 1
        return 0.5 * (a + b)
