"""Planar flows: the discrete normalizing flow of Rezende & Mohamed (2015) and its
continuous analogue from Chen et al. (2018), for the "NF vs CNF" comparison.

* :class:`PlanarFlow` stacks ``K`` layers ``y = x + û h(wᵀx + b)`` (``h = tanh``) mapping data
  to the standard normal base; ``log|det ∂y/∂x| = log|1 + h'(wᵀx + b) ûᵀw|`` in closed form.
  ``û`` is reparametrised so that ``wᵀû > -1``, which keeps every layer invertible; the
  inverse (for sampling) is a 1-D monotone root find per layer, done by bisection.
* :class:`PlanarCNF` is the vector field ``f(t, z) = Σ_i g_i(t) u_i h(w_iᵀz + b_i)`` with
  time gates ``g_i(t) = σ(a_i t + c_i)``; its divergence is closed form,
  ``tr ∂f/∂z = Σ_i g_i(t) h'(w_iᵀz + b_i) u_iᵀw_i``, so ``CNF(..., trace="closed_form")``
  needs no vector-Jacobian products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ._checks import check_nonneg, check_size

__all__ = ["PlanarFlow", "PlanarCNF", "planar_flow_params", "planar_cnf_params"]


def planar_flow_params(num_layers: int, dim: int) -> int:
    """Parameter count of :class:`PlanarFlow`: ``K (2D + 1)``."""
    return int(num_layers) * (2 * int(dim) + 1)


def planar_cnf_params(width: int, dim: int, time_gated: bool = True) -> int:
    """Parameter count of :class:`PlanarCNF`: ``M (2D + 1)``, plus ``2M`` for the gates."""
    return int(width) * (2 * int(dim) + 1 + (2 if time_gated else 0))


def _log_normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.shape[-1] * math.log(2.0 * math.pi) - 0.5 * z.pow(2).sum(dim=-1)


def _check_2d(x: torch.Tensor, dim: int, where: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != dim:
        raise InputError(
            f"{where}: expected a tensor of shape [batch, {dim}], got "
            f"{tuple(getattr(x, 'shape', ()))}."
        )


class PlanarFlow(nn.Module):
    """``K`` planar layers from data ``x`` to base ``z ~ N(0, I)``.

    Args:
        dim: data dimension ``D``.
        num_layers: ``K``; the model has ``K (2D + 1)`` parameters.
        init_scale: standard deviation of the random initial ``u`` and ``w``.
    """

    def __init__(self, dim: int, num_layers: int, init_scale: float = 0.1) -> None:
        super().__init__()
        dim = check_size(dim, "PlanarFlow(dim)")
        num_layers = check_size(num_layers, "PlanarFlow(num_layers)")
        init_scale = check_nonneg(init_scale, "PlanarFlow(init_scale)")
        self.dim = dim
        self.u = nn.Parameter(torch.randn(num_layers, dim) * init_scale)
        self.w = nn.Parameter(torch.randn(num_layers, dim) * init_scale)
        self.b = nn.Parameter(torch.zeros(num_layers))

    @property
    def num_layers(self) -> int:
        return self.u.shape[0]

    def _u_hat(self, k: int) -> torch.Tensor:
        u, w = self.u[k], self.w[k]
        wu = (w * u).sum()
        m = -1.0 + F.softplus(wu)  # > -1
        return u + (m - wu) * w / (w.pow(2).sum() + 1e-12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map data to base: returns ``(z, log|det ∂z/∂x|)`` with shapes ``[batch, D]``,
        ``[batch]``."""
        _check_2d(x, self.dim, "PlanarFlow.forward")
        logdet = x.new_zeros(x.shape[0])
        for k in range(self.num_layers):
            u, w, b = self._u_hat(k), self.w[k], self.b[k]
            a = x @ w + b
            h = torch.tanh(a)
            x = x + h.unsqueeze(1) * u
            logdet = logdet + torch.log(torch.abs(1.0 + (1.0 - h.pow(2)) * (u @ w)))
        return x, logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x) = log N(z) + log|det ∂z/∂x|`` per sample."""
        z, logdet = self.forward(x)
        return _log_normal(z) + logdet

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, iters: int = 80) -> torch.Tensor:
        """Invert the flow (base to data) by bisection on each layer's scalar equation
        ``β = α + (wᵀû) tanh(α)``, where ``α = wᵀx + b``, ``β = wᵀy + b``; monotone since
        ``wᵀû > -1``, and ``|α - β| ≤ |wᵀû|`` brackets the root."""
        _check_2d(z, self.dim, "PlanarFlow.inverse")
        y = z
        for k in reversed(range(self.num_layers)):
            u, w, b = self._u_hat(k), self.w[k], self.b[k]
            c = u @ w
            beta = y @ w + b
            lo, hi = beta - c.abs() - 1e-12, beta + c.abs() + 1e-12
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                above = mid + c * torch.tanh(mid) > beta
                hi = torch.where(above, mid, hi)
                lo = torch.where(above, lo, mid)
            alpha = 0.5 * (lo + hi)
            y = y - torch.tanh(alpha).unsqueeze(1) * u
        return y

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples: base draws pushed through :meth:`inverse`."""
        n = check_size(n, "PlanarFlow.sample(n)", low=0)  # n = 0: an empty [0, D] result
        z = torch.randn(n, self.dim, dtype=self.u.dtype, device=self.u.device,
                        generator=generator)
        return self.inverse(z)


class PlanarCNF(nn.Module):
    """Planar vector field ``f(t, z) = Σ_i g_i(t) u_i tanh(w_iᵀz + b_i)`` with closed-form trace.

    Args:
        dim: state dimension ``D``.
        width: number of units ``M``.
        time_gated: multiply unit ``i`` by ``σ(a_i t + c_i)`` (time-dependent dynamics).
        init_scale: standard deviation of the random initial ``u`` and ``w``.
    """

    def __init__(
        self, dim: int, width: int, time_gated: bool = True, init_scale: float = 0.5
    ) -> None:
        super().__init__()
        dim, width = check_size(dim, "PlanarCNF(dim)"), check_size(width, "PlanarCNF(width)")
        init_scale = check_nonneg(init_scale, "PlanarCNF(init_scale)")
        self.dim = dim
        self.u = nn.Parameter(torch.randn(width, dim) * init_scale)
        self.w = nn.Parameter(torch.randn(width, dim) * init_scale)
        self.b = nn.Parameter(torch.zeros(width))
        if time_gated:
            self.gate_a = nn.Parameter(torch.randn(width))
            self.gate_c = nn.Parameter(torch.zeros(width))
        else:
            self.register_parameter("gate_a", None)
            self.register_parameter("gate_c", None)

    def _gates(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.gate_a is None:
            return like.new_ones(self.u.shape[0])
        tt = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        return torch.sigmoid(self.gate_a * tt + self.gate_c)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``dz/dt``, shape ``[batch, D]``."""
        g = self._gates(t, z)
        h = torch.tanh(z @ self.w.T + self.b)  # [batch, M]
        return (h * g) @ self.u

    def dynamics_and_trace(
        self, t: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dz/dt, tr ∂f/∂z)`` with the trace in closed form, shapes ``[batch, D]``,
        ``[batch]``."""
        g = self._gates(t, z)
        h = torch.tanh(z @ self.w.T + self.b)
        dz = (h * g) @ self.u
        uw = (self.u * self.w).sum(dim=1)  # [M]
        tr = ((1.0 - h.pow(2)) * g) @ uw
        return dz, tr
