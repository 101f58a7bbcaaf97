"""Continuous normalizing flows (Chen et al. 2018; FFJORD, Grathwohl et al. 2018).

The instantaneous change of variables ``d log p(z(t))/dt = -tr(∂f/∂z(t))`` turns any vector
field ``f(t, z)`` into a density model, no invertibility constraints needed.  :class:`CNF`
integrates the augmented state ``(z, Δlogp, *regulariser integrals)`` with
:func:`pydiffbridge.odeint` or :func:`pydiffbridge.odeint_adjoint`.

Convention (as in FFJORD): data lives at ``t0``, the standard normal base at ``t1``.
``log_prob(x)`` integrates ``t0 → t1`` and returns ``log N(z(t1)) - Δlogp(t1)``;
``sample(n)`` draws ``z ~ N(0, I)`` and integrates in reverse, ``t1 → t0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ._checks import check_positive, check_size
from .fields import ConcatSquashLinear, ConcatSquashMLP
from .regularizers import RateContext, Regularizer, RegularizerSpec, parse_regularizers
from .regularizers import regularization_loss as _reg_loss

__all__ = ["CNF", "CNFResult", "ConcatSquashLinear", "ConcatSquashMLP", "standard_normal_logprob"]

_TRACES = ("exact", "hutchinson", "closed_form")
_NOISES = ("rademacher", "gaussian")
_GRADIENTS = ("adjoint", "direct")


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over the last dimension; shape ``z.shape[:-1]``."""
    d = z.shape[-1]
    return -0.5 * d * math.log(2.0 * math.pi) - 0.5 * z.pow(2).sum(dim=-1)


def _draw_noise(kind: str, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    bits = torch.randint(0, 2, like.shape, device=like.device, generator=generator)
    return bits.to(like.dtype) * 2 - 1


class _AugmentedDynamics(nn.Module):
    """``(z, Δlogp, *r) ↦ (f, -tr ∂f/∂z, *rates)``; one instance per solve, so its fixed
    noise stays with that solve even if an adjoint backward runs later."""

    def __init__(
        self,
        func: nn.Module | Callable,
        trace: str,
        noise: torch.Tensor | None,
        regularizers: tuple[Regularizer, ...],
        counter: list[int],
        with_logp: bool,
    ) -> None:
        super().__init__()
        self.func = func
        self.trace = trace
        self.noise = noise
        self.regularizers = regularizers
        self.counter = counter
        self.with_logp = with_logp

    @staticmethod
    def _vjp(dz: torch.Tensor, z: torch.Tensor, v: torch.Tensor, create: bool) -> torch.Tensor:
        """``vᵀ ∂f/∂z`` (zeros when ``f`` does not depend on ``z``)."""
        g = None
        if dz.requires_grad:
            (g,) = torch.autograd.grad(dz, z, v, create_graph=create, retain_graph=True,
                                       allow_unused=True)
        return torch.zeros_like(z) if g is None else g

    def forward(self, t: torch.Tensor, state: Any) -> tuple[torch.Tensor, ...]:
        self.counter[0] += 1
        if not self.with_logp and not self.regularizers:
            z = state[0] if isinstance(state, (tuple, list)) else state
            return (self.func(t, z),)
        z = state[0]
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            div = None
            if self.trace == "closed_form":
                dz, div = self.func.dynamics_and_trace(t, z)
            else:
                dz = self.func(t, z)
            if dz.shape != z.shape:
                raise InputError(
                    f"CNF: func(t, z) returned shape {tuple(dz.shape)} for z of shape "
                    f"{tuple(z.shape)} at t={float(t):.6g}; it must return dz/dt of z's shape."
                )
            rows = None
            if self.trace == "exact":
                eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
                rows = torch.stack(
                    [self._vjp(dz, z, eye[i].expand_as(z), outer_grad) for i in range(z.shape[1])],
                    dim=1,
                )  # rows[b, i, :] = ∂f_i/∂z
                div = torch.diagonal(rows, dim1=1, dim2=2).sum(dim=1)

            def noise_vjp() -> torch.Tensor:
                return self._vjp(dz, z, self.noise, outer_grad)

            ctx = RateContext(t, z, dz, noise_vjp, rows)
            if self.trace == "hutchinson":
                div = (ctx.noise_vjp() * self.noise).sum(dim=1)
            out = [dz]
            if self.with_logp:
                out.append(-div)
            out.extend(reg.rate(ctx) for reg in self.regularizers)
        if not outer_grad:
            out = [o.detach() for o in out]
        return tuple(out)


@dataclass
class CNFResult:
    """Output of :meth:`CNF.transform`.

    Attributes:
        z: final state ``[batch, D]``.
        trajectory: states at every requested time ``[T, batch, D]``.
        delta_logp: ``Δlogp`` at the final time ``[batch]`` (``None`` unless requested).
        regularization: integral of each regulariser's rate, ``{name: [batch]}``.
        nfe: evaluations of the augmented dynamics in this forward solve.
    """

    z: torch.Tensor
    trajectory: torch.Tensor
    delta_logp: torch.Tensor | None = None
    regularization: dict[str, torch.Tensor] = field(default_factory=dict)
    nfe: int = 0


class CNF(nn.Module):
    """A continuous normalizing flow ``dz/dt = func(t, z)`` with a standard normal base.

    Args:
        func: ``func(t, z) -> dz/dt`` for ``z`` of shape ``[batch, D]`` (an ``nn.Module``
            for adjoint gradients).  With ``trace="closed_form"`` it must also provide
            ``func.dynamics_and_trace(t, z) -> (dz, tr ∂f/∂z)``, e.g. :class:`PlanarCNF`.
        t: ``(t0, t1)``, data at ``t0``, base distribution at ``t1``.
        trace: ``"exact"`` (one vector-Jacobian product per dimension), ``"hutchinson"``
            (``εᵀ(∂f/∂z)ε`` with ``ε`` drawn once per solve) or ``"closed_form"``.
        noise: Hutchinson noise, ``"rademacher"`` or ``"gaussian"``.
        method, rtol, atol, options: passed to the solver.
        gradient: ``"adjoint"`` (O(1) memory, :func:`pydiffbridge.odeint_adjoint`) or
            ``"direct"`` (backpropagate through the solver).
        backend: solver backend name.
        regularizers: ``{"kinetic": w, "jacobian": w}`` or :class:`Regularizer` objects;
            each adds an integrated channel (Finlay et al. 2020).
        adjoint_options: extra keyword arguments for ``odeint_adjoint`` (e.g.
            ``adjoint_rtol``).

    Attributes:
        last_nfe: evaluations of the augmented dynamics in the most recent forward solve.
        total_nfe: running count of all evaluations (forward and adjoint backward) since
            construction or :meth:`reset_nfe`.
        last_noise: the Hutchinson noise of the most recent solve (or ``None``).
    """

    def __init__(
        self,
        func: nn.Module | Callable,
        t: tuple[float, float] = (0.0, 1.0),
        trace: str = "exact",
        noise: str = "rademacher",
        method: str | None = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        gradient: str = "adjoint",
        backend: str = "torch",
        regularizers: RegularizerSpec = None,
        options: dict | None = None,
        adjoint_options: dict | None = None,
    ) -> None:
        super().__init__()
        if trace not in _TRACES:
            raise InputError(f"CNF(trace={trace!r}): unknown; use one of {_TRACES}.")
        if noise not in _NOISES:
            raise InputError(f"CNF(noise={noise!r}): unknown; use one of {_NOISES}.")
        if gradient not in _GRADIENTS:
            raise InputError(f"CNF(gradient={gradient!r}): unknown; use one of {_GRADIENTS}.")
        if trace == "closed_form" and not callable(getattr(func, "dynamics_and_trace", None)):
            raise InputError(
                "CNF(trace='closed_form'): func has no dynamics_and_trace(t, z) method; "
                "use PlanarCNF or trace='exact'/'hutchinson'."
            )
        if not callable(func):
            raise InputError(f"CNF(func=...): expected a callable func(t, z), got "
                             f"{type(func).__name__}.")
        rtol, atol = check_positive(rtol, "CNF(rtol)"), check_positive(atol, "CNF(atol)")
        if method is not None and not isinstance(method, str):
            raise InputError(f"CNF(method={method!r}): expected a method name such as "
                             "'dopri5', or None.")
        if len(tuple(t)) != 2:
            raise InputError(f"CNF(t={tuple(t)}): need two distinct finite times (t0, t1).")
        t0, t1 = (float(v) for v in t)
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise InputError(f"CNF(t={tuple(t)}): need two distinct finite times (t0, t1).")
        if gradient == "adjoint" and not isinstance(func, nn.Module):
            raise InputError(
                "CNF(gradient='adjoint'): func must be an nn.Module so its parameters can be "
                "collected; wrap it or use gradient='direct'."
            )
        self.func = func
        self.t0, self.t1 = t0, t1
        self.trace, self.noise, self.gradient = trace, noise, gradient
        self.method, self.rtol, self.atol = method, float(rtol), float(atol)
        self.options, self.backend = options, backend
        self.adjoint_options = dict(adjoint_options or {})
        self.regularizers = parse_regularizers(regularizers)
        self._counter = [0]
        self.last_nfe = 0
        self.last_noise: torch.Tensor | None = None

    @property
    def total_nfe(self) -> int:
        return self._counter[0]

    def reset_nfe(self) -> None:
        """Zero :attr:`total_nfe`."""
        self._counter[0] = 0

    def regularization_loss(self, values: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """``Σ weight · mean(∫ rate)`` for the integrals returned by :meth:`log_prob`."""
        return _reg_loss(values, self.regularizers)

    def _check(self, x: torch.Tensor, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise InputError(
                f"CNF.{what}: expected a floating tensor of shape [batch, D], got "
                f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}; reshape with "
                "x.reshape(len(x), -1)."
            )

    def transform(
        self,
        z: torch.Tensor,
        times: Sequence[float] | torch.Tensor | None = None,
        *,
        reverse: bool = False,
        log_density: bool = False,
        regularize: bool = False,
        generator: torch.Generator | None = None,
    ) -> CNFResult:
        """Integrate states ``z`` ``[batch, D]`` through the flow.

        ``times`` (monotonic, first entry = start) defaults to ``(t0, t1)``, or ``(t1, t0)``
        with ``reverse=True``.  ``log_density`` adds the ``Δlogp`` channel, ``regularize``
        the regulariser channels.
        """
        self._check(z, "transform")
        if times is None:
            times = (self.t1, self.t0) if reverse else (self.t0, self.t1)
        ts = torch.as_tensor(times, dtype=z.dtype, device=z.device).reshape(-1)
        regs = self.regularizers if regularize else ()
        need_noise = self.trace == "hutchinson" or (
            self.trace == "closed_form" and any(r.needs_noise for r in regs)
        )
        need_noise = need_noise and (log_density or bool(regs))
        noise = _draw_noise(self.noise, z, generator) if need_noise else None
        self.last_noise = noise
        dyn = _AugmentedDynamics(self.func, self.trace, noise, regs, self._counter, log_density)
        batch = z.shape[0]
        if batch == 0:  # an empty batch: nothing to solve (a solver would spin on it)
            return self._empty(z, ts, log_density, regs)
        state = [z]
        if log_density:
            state.append(z.new_zeros(batch))
        state.extend(z.new_zeros(batch) for _ in regs)
        start = self._counter[0]
        ys = self._odeint(dyn, tuple(state), ts)
        self.last_nfe = self._counter[0] - start
        dlogp, k = (ys[1][-1], 2) if log_density else (None, 1)
        reg_values = {r.name: ys[k + i][-1] for i, r in enumerate(regs)}
        return CNFResult(ys[0][-1], ys[0], dlogp, reg_values, self.last_nfe)

    def _empty(self, z: torch.Tensor, ts: torch.Tensor, log_density: bool,
               regs: tuple[Regularizer, ...]) -> CNFResult:
        self.last_nfe = 0
        traj = z.unsqueeze(0).expand(ts.numel(), *z.shape) + 0.0  # [T, 0, D], keeps z's graph
        none = z.sum(-1)  # [0]
        return CNFResult(traj[-1], traj, none if log_density else None,
                         {r.name: none for r in regs}, 0)

    def _odeint(self, dyn: _AugmentedDynamics, state: tuple, ts: torch.Tensor) -> tuple:
        from pydiffbridge import odeint, odeint_adjoint  # late import: core may import nn

        kw: dict[str, Any] = {"rtol": self.rtol, "atol": self.atol, "method": self.method,
                              "options": self.options, "backend": self.backend}
        if self.gradient == "adjoint" and torch.is_grad_enabled():
            params = tuple(p for p in dyn.parameters() if p.requires_grad)
            return odeint_adjoint(dyn, state, ts, adjoint_params=params, **kw,
                                  **self.adjoint_options)
        return odeint(dyn, state, ts, **kw)

    def log_prob(
        self,
        x: torch.Tensor,
        *,
        return_regularization: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``log p(x)`` per sample (nats), shape ``[batch]``.

        With ``return_regularization=True`` also returns the regulariser integrals
        ``{name: [batch]}`` (pass them to :meth:`regularization_loss`).
        """
        self._check(x, "log_prob")
        res = self.transform(x, log_density=True, regularize=return_regularization,
                             generator=generator)
        logp = standard_normal_logprob(res.z) - res.delta_logp
        return (logp, res.regularization) if return_regularization else logp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x)

    def sample(
        self,
        n: int,
        dim: int | None = None,
        *,
        return_log_prob: bool = False,
        z: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples: ``z ~ N(0, I)`` at ``t1`` integrated back to ``t0``.

        Give ``dim`` (or base draws ``z`` of shape ``[n, D]``).  With ``return_log_prob``
        also returns ``log p(x)`` of the samples from the same reverse solve.
        """
        if z is None:
            if dim is None:
                dim = getattr(self.func, "dim", None)
            if dim is None:
                raise InputError(
                    f"CNF.sample(n={n}): the dimension D is unknown; pass dim=..., or base "
                    "draws z=..."
                )
            n = check_size(n, "CNF.sample(n)", low=0)  # n = 0: an empty [0, D] result
            dim = check_size(dim, "CNF.sample(dim)")
            if dtype is None or device is None:
                p = next(iter(self.parameters()), None)
                dtype = dtype or (p.dtype if p is not None else torch.get_default_dtype())
                device = device or (p.device if p is not None else "cpu")
            z = torch.randn(int(n), int(dim), dtype=dtype, device=device, generator=generator)
        self._check(z, "sample")
        res = self.transform(z, reverse=True, log_density=return_log_prob, generator=generator)
        if return_log_prob:
            return res.z, standard_normal_logprob(z) + res.delta_logp
        return res.z
