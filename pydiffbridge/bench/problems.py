"""The benchmark problems, each with its own reference solution.

Every problem has a batched state ``y0`` of shape ``(B, d)`` and a right-hand side
``func(t, y)`` that works for any ``t`` (scalar or per-sample ``(B,)``), so the same problem
runs on our solvers, on torchdiffeq and on torchode.  References are independent of the
solvers under test: a closed form (matrix exponential) or SciPy's DOP853 at ``rtol=1e-12``
or tighter, computed once per process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Problem", "PROBLEMS", "make_problem", "MLP"]


@dataclass
class Problem:
    name: str
    func: Callable
    y0: torch.Tensor
    t: torch.Tensor
    reference: torch.Tensor  # states at t, shape (len(t), B, d)
    description: str
    #: the per-evaluation cost of func alone (seconds), measured by the runner
    extra: dict = field(default_factory=dict)

    def error(self, ys: torch.Tensor) -> float:
        """Max over outputs of the relative RMS error ``rms(ys - ref) / rms(ref)``."""
        ys = ys.detach().to(self.reference.dtype).cpu()
        ref = self.reference
        num = torch.sqrt(((ys - ref) ** 2).flatten(1).mean(1))
        den = torch.sqrt((ref**2).flatten(1).mean(1)).clamp(min=1e-12)
        val = float((num / den).max())
        return val if math.isfinite(val) else float("inf")


class MLP(torch.nn.Module):
    """``dy/dt = W2 tanh(W1 y + b1) + b2``: the 2→64→2 neural ODE of the benchmarks (and,
    with ``init="normal"``, the adjoint benchmark's); ``calls`` counts evaluations.

    ``init``: ``"uniform"`` draws U(-1, 1)·scale/√fan_in, ``"normal"`` N(0, 1)·0.5·scale/√fan_in
    (each parameter in turn from one seeded generator)."""

    def __init__(self, dim: int = 2, hidden: int = 64, seed: int = 0, scale: float = 1.0,
                 hamiltonian: bool = False, init: str = "uniform"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(dim, hidden)
        self.l2 = torch.nn.Linear(hidden, dim)
        self.calls = 0
        with torch.no_grad():
            for p in self.parameters():
                if init == "normal":
                    p.copy_(torch.randn(p.shape, generator=g) * (0.5 * scale / p.shape[-1] ** 0.5))
                else:
                    p.copy_(scale * (torch.rand(p.shape, generator=g) * 2 - 1)
                            / math.sqrt(p.shape[-1]))
            if hamiltonian and dim == 2:
                # W2 = J W1^T, b2 = 0: f = J ∇H with H = Σ log cosh(W1 y + b1) convex, so every
                # orbit is a closed curve and the work per unit time stays steady
                J = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
                self.l2.weight.copy_(J @ self.l1.weight.T)
                self.l2.bias.zero_()

    def forward(self, t, y):
        self.calls += 1
        return self.l2(torch.tanh(self.l1(y)))

    def trace_jac(self, y: torch.Tensor) -> torch.Tensor:
        """Exact ``tr(∂f/∂y)`` per sample: ``Σ_k (1 - tanh²(a_k)) Σ_i W2[i,k] W1[k,i]``."""
        h = torch.tanh(self.l1(y))
        w = (self.l2.weight * self.l1.weight.T).sum(0)  # (hidden,)
        return (1 - h * h) @ w


class CNFStep(torch.nn.Module):
    """One CNF block: ``[z, logp]' = [f(z), -tr(∂f/∂z)]`` with the exact trace."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.mlp = mlp

    def forward(self, t, y):
        z = y[..., :2]
        return torch.cat([self.mlp(t, z), -self.mlp.trace_jac(z)[..., None]], -1)


class VdP(torch.nn.Module):
    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", mu)

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


class Lorenz(torch.nn.Module):
    def forward(self, t, y):
        x, yy, z = y[..., 0], y[..., 1], y[..., 2]
        return torch.stack([10.0 * (yy - x), x * (28.0 - z) - yy, x * yy - (8.0 / 3.0) * z], -1)


class Linear(torch.nn.Module):
    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)

    def forward(self, t, y):
        return y @ self.A.T


def _scipy_ref(func, y0: torch.Tensor, t: torch.Tensor, rtol: float, per_sample: bool = False
               ) -> torch.Tensor:
    from scipy.integrate import solve_ivp

    tn = t.double().numpy()

    def run(y_init, f):
        r = solve_ivp(f, (tn[0], tn[-1]), y_init, method="DOP853", rtol=rtol, atol=rtol * 1e-2,
                      t_eval=tn)
        if not r.success:
            raise RuntimeError(f"reference solve failed: {r.message}")
        return r.y.T

    y0d = y0.double()
    with torch.no_grad():
        if not per_sample:
            shape = y0d.shape
            out = run(y0d.reshape(-1).numpy(), lambda s, v: func(
                torch.tensor(s), torch.from_numpy(v).reshape(shape)).reshape(-1).numpy())
            return torch.from_numpy(out).reshape(len(tn), *shape)
        cols = []
        for b in range(y0d.shape[0]):
            f = func(b)
            cols.append(run(y0d[b].numpy(), f))
        return torch.from_numpy(np.stack(cols, 1))


def _np_vdp(mu: float):
    return lambda t, y: [y[1], mu * (1 - y[0] * y[0]) * y[1] - y[0]]


def _np_lorenz(t, y):
    return [10.0 * (y[1] - y[0]), y[0] * (28.0 - y[2]) - y[1], y[0] * y[1] - (8.0 / 3.0) * y[2]]


_REF_CACHE: dict = {}


def _cached(key, fn):
    if key not in _REF_CACHE:
        _REF_CACHE[key] = fn()
    return _REF_CACHE[key]


def mlp_problem(batch: int = 256, t_end: float = 15.0, seed: int = 0) -> Problem:
    f = MLP(seed=seed, scale=1.0, hamiltonian=True).double()
    y0 = torch.randn(batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.0, t_end, 2, dtype=torch.float64)
    ref = _cached(("mlp", batch, t_end, seed), lambda: _scipy_ref(f, y0, t, 1e-12))
    return Problem("mlp", f, y0, t, ref, f"2→64→2 tanh MLP neural ODE, batch {batch}, "
                   f"t∈[0,{t_end:g}] (ref: SciPy DOP853 rtol 1e-12)")


def vdp_problem(batch: int = 32, t_end: float = 20.0) -> Problem:
    mu = torch.linspace(0.5, 25.0, batch, dtype=torch.float64)
    f = VdP(mu)
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64).repeat(batch, 1)
    t = torch.linspace(0.0, t_end, 5, dtype=torch.float64)
    ref = _cached(("vdp", batch, t_end), lambda: _scipy_ref(
        lambda b: _np_vdp(float(mu[b])), y0, t, 1e-12, per_sample=True))
    return Problem("vdp", f, y0, t, ref, f"Van der Pol, batch {batch}, μ∈[0.5,25], "
                   f"t∈[0,{t_end:g}] (ref: SciPy DOP853 rtol 1e-12 per sample)")


def lorenz_problem() -> Problem:
    f = Lorenz()
    y0 = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    t = torch.linspace(0.0, 20.0, 11, dtype=torch.float64)
    ref = _cached("lorenz", lambda: _scipy_ref(lambda b: _np_lorenz, y0, t, 1e-13,
                                               per_sample=True))
    return Problem("lorenz", f, y0, t, ref, "Lorenz (σ=10, ρ=28, β=8/3), t∈[0,20] "
                   "(ref: SciPy DOP853 rtol 1e-13)")


def linear_problem(dim: int = 100, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    A = (M - M.T) - 0.5 * torch.eye(dim, dtype=torch.float64) - 0.2 * (M @ M.T)
    y0 = torch.randn(1, dim, generator=g, dtype=torch.float64)
    t = torch.linspace(0.0, 5.0, 6, dtype=torch.float64)
    ref = torch.stack([y0 @ torch.linalg.matrix_exp(A * float(s)).T for s in t])
    return Problem("linear100", Linear(A), y0, t, ref, f"{dim}-dim linear y'=Ay, t∈[0,5] "
                   "(ref: closed form, matrix exponential)")


def cnf_problem(batch: int = 64, seed: int = 0) -> Problem:
    f = CNFStep(MLP(seed=seed, scale=1.5).double())
    z0 = torch.randn(batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y0 = torch.cat([z0, torch.zeros(batch, 1, dtype=torch.float64)], -1)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ref = _cached(("cnf", batch, seed), lambda: _scipy_ref(f, y0, t, 1e-12))
    return Problem("cnf", f, y0, t, ref, f"one CNF step [z, log p] with exact trace, batch "
                   f"{batch}, t∈[0,1] (ref: SciPy DOP853 rtol 1e-12)")


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "mlp": mlp_problem,
    "vdp": vdp_problem,
    "lorenz": lorenz_problem,
    "linear100": linear_problem,
    "cnf": cnf_problem,
}


def make_problem(name: str, device: str = "cpu", dtype: torch.dtype = torch.float64,
                 **kw) -> Problem:
    """Build problem ``name`` and move its tensors and module to ``device`` and ``dtype``
    (the reference stays in float64)."""
    p = PROBLEMS[name](**kw)
    if isinstance(p.func, torch.nn.Module):
        p.func = p.func.to(device=device, dtype=dtype)
    p.y0 = p.y0.to(device=device, dtype=dtype)
    p.t = p.t.to(device=device, dtype=dtype)
    if dtype != torch.float64:
        p.description += f", {str(dtype).replace('torch.', '')}"
    return p
