"""The native torch backend: batched explicit RK and Adams solvers from
:mod:`pydiffbridge.solvers`, on any device, differentiable by direct backprop."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError, UnknownMethodError, UnknownOptionError
from ..solution import Solution
from ..solvers.fixed import ADAMS, solve_fixed
from ..solvers.rk import solve_adaptive
from ..solvers.tableaus import TABLEAUS
from .base import SolveSpec

__all__ = ["TorchBackend", "ADAPTIVE_METHODS", "FIXED_METHODS", "METHODS"]

ADAPTIVE_METHODS = ("dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8")
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4") + ADAMS
METHODS = ADAPTIVE_METHODS + FIXED_METHODS

_COMMON = {"dtype", "norm", "max_num_steps", "t_max"}
ADAPTIVE_OPTIONS = _COMMON | {"first_step", "step_t", "jump_t", "min_step", "max_step",
                              "safety", "ifactor", "dfactor", "pcoeff", "icoeff", "dcoeff"}
FIXED_OPTIONS = _COMMON | {"step_size", "grid_constructor", "perturb", "interp", "max_iters",
                           "max_order"}
# other names users bring from torchdiffeq or other engines
_ALIASES = {"rk4_classic": "rk4", "explicit_euler": "euler", "Tsit5": "tsit5", "DP5": "dopri5",
            "BS3": "bosh3", "RK45": "dopri5", "RK23": "bosh3", "DP8": "dopri8",
            "DOP853": "dopri8", "Euler": "euler", "Midpoint": "midpoint", "RK4": "rk4",
            "Heun": "heun2"}


class TorchBackend:
    name = "torch"
    supports_direct_grad = True

    def methods(self) -> list[str]:
        return list(METHODS)

    def availability(self) -> str:
        return ""

    def resolve_method(self, method: str | None) -> str:
        if method is None:
            return "dopri5"
        m = _ALIASES.get(method, method)
        if m not in METHODS:
            raise UnknownMethodError(
                f"unknown method {method!r} for backend 'torch'. Adaptive: "
                f"{', '.join(ADAPTIVE_METHODS)}; fixed-step: {', '.join(FIXED_METHODS)}. "
                "Stiff or engine-specific methods (Radau, BDF, LSODA, Rodas5, ...) need "
                "backend='scipy' or backend='julia'.")
        return m

    def check_options(self, method: str, options: dict) -> None:
        allowed = ADAPTIVE_OPTIONS if method in ADAPTIVE_METHODS else FIXED_OPTIONS
        bad = sorted(set(options) - allowed)
        if bad:
            raise UnknownOptionError(
                f"option(s) {bad} not understood by method {method!r}; it accepts: "
                f"{', '.join(sorted(allowed))}")

    def solve(self, func: Callable, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec,
              event_fn: Callable | None = None) -> Solution:
        method = self.resolve_method(spec.method)
        opts = dict(spec.options)
        norm = spec.norm or _rms
        if method in ADAPTIVE_METHODS:
            sol = solve_adaptive(func, y0, t, TABLEAUS[method], spec.rtol, spec.atol, norm, opts,
                                 event_fn)
        else:
            if event_fn is not None:
                names = ", ".join(ADAPTIVE_METHODS)
                raise InputError(f"event_fn needs an adaptive method ({names}); {method!r} "
                                 "steps on a fixed grid")
            sol = solve_fixed(func, y0, t, method, TABLEAUS.get(method), opts, norm, spec.rtol,
                              spec.atol)
        sol.backend, sol.method = "torch", method
        return sol


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / (x.numel() ** 0.5)
