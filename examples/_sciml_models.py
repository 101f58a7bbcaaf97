"""Models and data of the scientific-ML examples (``fit_parameters``, ``ude``).

Not an example itself (hence the leading underscore): the Lotka–Volterra and SIR right-hand
sides with learnable parameters, the universal differential equation (known Lotka–Volterra
physics plus a network), the reference solves that make the data, and the data themselves
(:func:`pydiffbridge.fit.make_observations` on random initial states).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from pydiffbridge import odeint
from pydiffbridge.fit import Observations, make_observations

# the classic Lotka–Volterra parameters: x' = αx - βxy, y' = -γy + δxy
ALPHA, BETA, GAMMA, DELTA = 1.5, 1.0, 3.0, 1.0

Solve = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference_solver(rhs: nn.Module) -> Solve:
    """``(y0, t) -> states at t`` of ``rhs`` at tight tolerance: the data's "truth"."""

    def solve(y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return odeint(rhs, y0, t, method="dopri8", rtol=1e-11, atol=1e-12)

    return solve


# ----------------------------------------------------------------------------- parametric
class LotkaVolterra(nn.Module):
    """``x' = αx - βxy``, ``y' = δxy - γy`` with θ = exp(log_theta) = (α, β, δ, γ)."""

    names = ("alpha", "beta", "delta", "gamma")
    truth = (ALPHA, BETA, DELTA, GAMMA)
    states = ("prey x", "predator y")

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.log_theta = nn.Parameter(torch.log(theta))

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        a, b, d, g = torch.exp(self.log_theta)
        x, y = u[..., 0], u[..., 1]
        return torch.stack([a * x - b * x * y, d * x * y - g * y], dim=-1)

    @staticmethod
    def initial_states(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        return 0.5 + 1.5 * torch.rand(n, 2, generator=gen, dtype=dtype)


class SIR(nn.Module):
    """``S' = -βSI``, ``I' = βSI - γI``, ``R' = γI`` (population fractions), θ = (β, γ)."""

    names = ("beta", "gamma")
    truth = (0.8, 0.25)
    states = ("S", "I", "R")

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.log_theta = nn.Parameter(torch.log(theta))

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        b, g = torch.exp(self.log_theta)
        s, i = u[..., 0], u[..., 1]
        inf, rec = b * s * i, g * i
        return torch.stack([-inf, inf - rec, rec], dim=-1)

    @staticmethod
    def initial_states(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        i0 = 0.01 + 0.09 * torch.rand(n, generator=gen, dtype=dtype)
        return torch.stack([1 - i0, i0, torch.zeros_like(i0)], dim=-1)


MODELS = {"lv": LotkaVolterra, "sir": SIR}
T_END = {"lv": 6.0, "sir": 25.0}


def simulate_truth(model_cls: type[nn.Module], theta: torch.Tensor) -> Solve:
    return reference_solver(model_cls(theta))


def parametric_data(args: argparse.Namespace) -> Observations:
    """``--series`` series of ``--model`` with the true θ, observed as ``--times``, ``--keep``,
    ``--t-end`` and ``--noise`` say (seeded by ``--seed``)."""
    cls = MODELS[args.model]
    dtype = torch.float64
    gen = torch.Generator().manual_seed(args.seed)
    y0 = cls.initial_states(args.series, gen, dtype)
    truth = torch.tensor(cls.truth, dtype=dtype)
    return make_observations(simulate_truth(cls, truth), y0, args.t_end, args.times, args.keep,
                             args.noise, gen)


# ----------------------------------------------------------------------------- UDE
def true_interaction(u: torch.Tensor) -> torch.Tensor:
    """The terms the network has to learn: ``(-βxy, δxy)``."""
    xy = u[..., 0] * u[..., 1]
    return torch.stack([-BETA * xy, DELTA * xy], dim=-1)


def known_physics(u: torch.Tensor) -> torch.Tensor:
    """The terms the model is given: ``(αx, -γy)``."""
    return torch.stack([ALPHA * u[..., 0], -GAMMA * u[..., 1]], dim=-1)


class TrueLV(nn.Module):
    """Lotka–Volterra as the UDE splits it: known physics plus the true interaction."""

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return known_physics(u) + true_interaction(u)


class UDE(nn.Module):
    """Known physics plus ``U_θ(u)``; ``U`` sees ``u / scale`` (the data's typical size)."""

    def __init__(self, hidden: int, scale: torch.Tensor, physics_only: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)  # start from the known physics alone
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("scale", scale.clone())
        self.physics_only = physics_only

    def interaction(self, u: torch.Tensor) -> torch.Tensor:
        if self.physics_only:
            return torch.zeros_like(u)
        return self.net(u / self.scale)

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return known_physics(u) + self.interaction(u)


truth_solve = reference_solver(TrueLV())


def ude_data(args: argparse.Namespace) -> Observations:
    """``--series`` Lotka–Volterra series over ``[0, --t-train]`` (seeded by ``--seed``)."""
    gen = torch.Generator().manual_seed(args.seed)
    y0 = 0.5 + 2.0 * torch.rand(args.series, 2, generator=gen, dtype=torch.float64)
    return make_observations(truth_solve, y0, args.t_train, args.times, args.keep, args.noise,
                             gen)
