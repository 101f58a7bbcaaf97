"""Three classic stiff test problems, each as a torch right-hand side (for our solvers) and a
NumPy one with its Jacobian (for SciPy's ``solve_ivp``, the independent reference).

* ``robertson``: H. H. Robertson's chemical kinetics (1966), as in Hairer & Wanner, *Solving
  ODEs II*, Sec. IV.1, eq. (1.3): ``y0 = (1, 0, 0)``, here on ``[0, 1e5]``.
* ``vdp``: Van der Pol's equation with ``mu = 1000`` (ibid., Sec. IV.1, eq. (1.5') unscaled):
  ``y1' = y2``, ``y2' = mu (1 - y1^2) y2 - y1``, ``y0 = (2, 0)``, on ``[0, 3000]`` (about
  1.9 periods of the relaxation oscillation).
* ``hires``: the "High Irradiance RESponse" photomorphogenesis model of Schäfer (1975), the
  8-component problem of Hairer & Wanner's test set (ibid., Sec. IV.10, and the IVP test set of
  Mazzia & Magherini), on ``[0, 321.8122]``.

A batched torch right-hand side takes ``y`` of shape ``(..., n)`` (independent problems on the
leading dimensions); :func:`ensemble` makes ``B`` independent copies with perturbed initial
states (the perturbation is deterministic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["StiffProblem", "STIFF_PROBLEMS", "ensemble"]

VDP_MU = 1000.0


@dataclass(frozen=True)
class StiffProblem:
    name: str
    y0: tuple[float, ...]
    t_end: float
    rhs: Callable  # torch: (t, y[..., n]) -> dy[..., n]
    rhs_np: Callable  # numpy: (t, y[n]) -> dy[n]
    jac_np: Callable  # numpy: (t, y[n]) -> J[n, n]
    atol_scale: float = 1.0  # atol = atol_scale * rtol (the components' magnitudes)

    def times(self, m: int = 6, dtype=torch.float64) -> torch.Tensor:
        """``m`` output times: log-spaced for Robertson, uniform for the others."""
        if self.name == "robertson":
            return torch.tensor([0.0] + list(np.logspace(-3, 5, m - 1)), dtype=dtype)
        return torch.linspace(0.0, self.t_end, m, dtype=dtype)


def _rober(t, y):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3,
                        0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2], -1)


def _rober_np(t, y):
    return np.array([-0.04 * y[0] + 1e4 * y[1] * y[2],
                     0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2])


def _rober_jac(t, y):
    return np.array([[-0.04, 1e4 * y[2], 1e4 * y[1]],
                     [0.04, -1e4 * y[2] - 6e7 * y[1], -1e4 * y[1]],
                     [0.0, 6e7 * y[1], 0.0]])


def _vdp(t, y):
    x, v = y[..., 0], y[..., 1]
    return torch.stack([v, VDP_MU * (1 - x * x) * v - x], -1)


def _vdp_np(t, y):
    return np.array([y[1], VDP_MU * (1 - y[0] ** 2) * y[1] - y[0]])


def _vdp_jac(t, y):
    return np.array([[0.0, 1.0], [-2 * VDP_MU * y[0] * y[1] - 1.0, VDP_MU * (1 - y[0] ** 2)]])


def _hires_terms(y, stack):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[..., i] for i in range(8))
    r = 280.0 * y6 * y8
    return stack([-1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
                  1.71 * y1 - 8.75 * y2,
                  -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
                  8.32 * y2 + 1.71 * y3 - 1.12 * y4,
                  -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
                  -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
                  r - 1.81 * y7,
                  -r + 1.81 * y7])


def _hires(t, y):
    return _hires_terms(y, lambda xs: torch.stack(xs, -1))


def _hires_np(t, y):
    return _hires_terms(y, np.array)


def _hires_jac(t, y):
    J = np.zeros((8, 8))
    J[0, :3] = [-1.71, 0.43, 8.32]
    J[1, :2] = [1.71, -8.75]
    J[2, 2:5] = [-10.03, 0.43, 0.035]
    J[3, 1:4] = [8.32, 1.71, -1.12]
    J[4, 4:7] = [-1.745, 0.43, 0.43]
    J[5, 3:8] = [0.69, 1.71, -0.43 - 280 * y[7], 0.69, -280 * y[5]]
    J[6, 5:8] = [280 * y[7], -1.81, 280 * y[5]]
    J[7, 5:8] = [-280 * y[7], 1.81, -280 * y[5]]
    return J


STIFF_PROBLEMS: dict[str, StiffProblem] = {
    "robertson": StiffProblem("robertson", (1.0, 0.0, 0.0), 1e5, _rober, _rober_np, _rober_jac,
                              atol_scale=1e-4),
    "vdp": StiffProblem("vdp", (2.0, 0.0), 3000.0, _vdp, _vdp_np, _vdp_jac),
    "hires": StiffProblem("hires", (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057), 321.8122,
                          _hires, _hires_np, _hires_jac, atol_scale=1e-2),
}


def ensemble(p: StiffProblem, batch: int, dtype=torch.float64) -> torch.Tensor:
    """``(batch, n)`` initial states: ``y0`` scaled by ``1 + 0.1 * (b / batch)`` for sample
    ``b`` (Robertson: only its first component, so that ``y0`` stays a distribution)."""
    y0 = torch.tensor(p.y0, dtype=dtype)
    s = 1.0 + 0.1 * torch.arange(batch, dtype=dtype) / max(batch, 1)
    if p.name == "robertson":
        out = y0.repeat(batch, 1)
        out[:, 0] = s
        return out
    return y0[None, :] * s[:, None]
