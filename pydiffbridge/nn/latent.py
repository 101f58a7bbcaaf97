"""Latent ODEs and ODE-RNNs for irregularly sampled time series.

* :class:`ODERNN` (Rubanova et al. 2019): a GRU update at every observation, an ODE evolution
  of the hidden state between observations.
* :class:`LatentODE` (Chen et al. 2018, sec. 5): encoder (ODE-RNN or a GRU with time gaps, run
  backwards in time) -> ``q(z0|x) = N(mu, diag(sigma^2))`` -> reparameterised ``z0`` -> one ODE
  solve of the latent state over the union of requested times -> decoder -> Gaussian
  likelihood.  ``elbo`` returns per-sequence log-likelihood and closed-form KL to ``N(0, I)``.
* :class:`RNNBaseline`: an autoregressive GRU that gets the time gap as an input.

Batches are :class:`~pydiffbridge.nn.timeseries.IrregularBatch` (union of times + mask); a
sample's likelihood only sums over its own masked-in entries and masked-out values are never
read (not even NaN ones), so a batch gives each sequence what it would get alone: exactly (to
rounding) for the encoders, whose recurrences visit only a sample's own points, with the
GRU encoder or a fixed-step ODE-RNN; up to the solver tolerance where an adaptive solve is
shared by the batch (the latent trajectory, an adaptive ODE-RNN).  A sequence with no
conditioning point at all gets the prior as its posterior, ``q(z0) = N(0, I)`` (no data, no
update; its KL term is 0); the encoders leave its hidden state at the initial zeros.

**Per-sample gaps in one solve.**  Between two observations the ODE-RNN must evolve every
sample ``i`` over its own interval ``[t_prev_i, t_i]`` of length ``dt_i`` (gaps differ per sample
and may be negative when running backwards).  With autonomous dynamics ``dh/dt = f(h)`` the
substitution ``t = t_prev_i + s * dt_i`` gives ``dh/ds = dt_i * f(h)`` on ``s in [0, 1]`` for all
samples, so the whole batch is advanced by *one* solve over ``[0, 1]``; samples with
``dt_i = 0`` (padding) have zero derivative and stay exactly unchanged.  The price is a shared
adaptive step size for the batch (error control is over the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import pydiffbridge
from pydiffbridge.errors import InputError
from pydiffbridge.nn._checks import (
    check_obs,
    check_positive,
    check_query_mask,
    check_size,
    check_t_end,
)
from pydiffbridge.nn.baseline import Prediction, RNNBaseline, _gather, _mlp
from pydiffbridge.nn.timeseries import IrregularBatch, masked_values, pack, random_split, split_at

__all__ = ["SolverConfig", "ODEFunc", "ODERNN", "LatentODE", "RNNBaseline", "Prediction",
           "ElboTerms", "kl_normal_std", "gaussian_loglik", "masked_mse", "extrapolate",
           "interpolate"]


@dataclass
class SolverConfig:
    """How the ODE solves run; everything is passed through to :func:`pydiffbridge.odeint`.

    ``gradient``: ``"direct"`` (backprop through the solver) or ``"adjoint"`` (O(1) memory).
    """

    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-4
    options: dict[str, Any] | None = None
    gradient: str = "direct"
    backend: str = "torch"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if self.gradient not in ("direct", "adjoint"):
            raise InputError(f"SolverConfig.gradient={self.gradient!r}: use 'direct' or 'adjoint'.")
        for name in ("rtol", "atol"):
            if isinstance(getattr(self, name), (int, float)):  # tensors: checked by the solver
                check_positive(getattr(self, name), f"SolverConfig.{name}")

    def solve(self, func: nn.Module, y0: Tensor, t: Tensor) -> Tensor:
        """``odeint``/``odeint_adjoint`` of ``func`` from ``y0``; returns ``[len(t), ...]``."""
        self._check()  # (the fields may have been changed since construction)
        solver = pydiffbridge.odeint_adjoint if self.gradient == "adjoint" else pydiffbridge.odeint
        return solver(func, y0, t, rtol=self.rtol, atol=self.atol, method=self.method,
                      options=self.options, backend=self.backend, **self.extra)


class ODEFunc(nn.Module):
    """Autonomous MLP dynamics ``f(t, h) = net(h)``; ``nfe`` counts evaluations."""

    def __init__(self, dim: int, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        dim, hidden = check_size(dim, "ODEFunc(dim)"), check_size(hidden, "ODEFunc(hidden)")
        self.net = _mlp(dim, hidden, dim, layers)
        self.nfe = 0

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        self.nfe += 1
        return self.net(h)


class _GapFunc(nn.Module):
    """``dh/ds = dt * f(h)`` on ``s in [0, 1]`` (see the module docstring)."""

    def __init__(self, f: ODEFunc, dt: Tensor) -> None:
        super().__init__()
        self.f = f
        self.dt = dt  # [B, 1]; kept alive for an adjoint's backward solve

    def forward(self, s: Tensor, h: Tensor) -> Tensor:
        return self.dt * self.f(s, h)


def _points(batch: IrregularBatch, reverse: bool) -> tuple[Tensor, Tensor]:
    """Packed per-sample points in time order (or reversed): ``idx [B, L]``, ``valid [B, L]``."""
    pm = batch.point_mask
    if not reverse:
        return pack(pm)
    idx, valid = pack(pm.flip(1))
    return pm.shape[1] - 1 - idx, valid


class ODERNN(nn.Module):
    """ODE-RNN: ``h`` evolves by ``dh/dt = f(h)`` between a sample's observations and is updated
    by ``GRUCell([x * m, m], h)`` at each of them (``m`` = the channel mask)."""

    def __init__(self, input_dim: int, hidden_dim: int = 32, ode_hidden: int = 64,
                 solver: SolverConfig | None = None) -> None:
        super().__init__()
        self.input_dim = check_size(input_dim, "ODERNN(input_dim)")
        self.hidden_dim = hidden_dim = check_size(hidden_dim, "ODERNN(hidden_dim)")
        if solver is not None and not isinstance(solver, SolverConfig):
            raise InputError(f"ODERNN(solver=...): expected a SolverConfig, got "
                             f"{type(solver).__name__}.")
        self.gru = nn.GRUCell(2 * input_dim, hidden_dim)
        self.func = ODEFunc(hidden_dim, ode_hidden)
        self.solver = solver or SolverConfig()

    def evolve(self, h: Tensor, dt: Tensor) -> Tensor:
        """Advance each row ``h[i]`` by time ``dt[i]`` (any sign) in one batched solve."""
        if not bool((dt != 0).any()):
            return h
        gap = _GapFunc(self.func, dt.to(h.dtype).unsqueeze(-1))
        s = torch.tensor([0.0, 1.0], dtype=h.dtype, device=h.device)
        return self.solver.solve(gap, h, s)[-1]

    def forward(self, batch: IrregularBatch, t_end: float | Tensor | None = None,
                reverse: bool = False) -> Tensor:
        """Final hidden state ``[B, H]``: after the last observation processed (the first one in
        time if ``reverse``), evolved on to ``t_end`` if given (e.g. the latent origin ``t0``).
        A sample without observations keeps the initial state, zeros (it has no time to
        evolve from)."""
        check_obs(batch, "ODERNN.forward", self.input_dim, "batch")
        idx, valid = _points(batch, reverse)
        ts, xs, ms = _gather(batch, idx)
        B = idx.shape[0]
        h = batch.values.new_zeros(B, self.hidden_dim)
        if B == 0:
            return h
        prev_t = ts[:, 0] if idx.shape[1] else batch.times.new_zeros(B)
        for j in range(idx.shape[1]):
            v = valid[:, j]
            h = self.evolve(h, torch.where(v, ts[:, j] - prev_t, torch.zeros_like(prev_t)))
            h_new = self.gru(torch.cat([masked_values(xs[:, j], ms[:, j]), ms[:, j]], -1), h)
            h = torch.where(v[:, None], h_new, h)
            prev_t = torch.where(v, ts[:, j], prev_t)
        if t_end is not None:  # only samples with a last observation have a gap to t_end
            gap = check_t_end(t_end, prev_t, "ODERNN.forward") - prev_t
            h = self.evolve(h, torch.where(valid.any(1), gap, torch.zeros_like(gap)))
        return h


class _GRUDeltaEncoder(nn.Module):
    """GRU over a sample's points (backwards in time) with input ``[x * m, m, |gap|]``."""

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.cell = nn.GRUCell(2 * input_dim + 1, hidden_dim)
        self.func = ODEFunc(1, 1)  # unused; keeps the ``encoder.func.nfe`` interface (always 0)

    def forward(self, batch: IrregularBatch, t_end: float | Tensor | None = None,
                reverse: bool = True) -> Tensor:
        check_obs(batch, "LatentODE encoder", self.input_dim, "batch")
        idx, valid = _points(batch, reverse)
        ts, xs, ms = _gather(batch, idx)
        B, D = idx.shape[0], batch.values.shape[-1]
        h = batch.values.new_zeros(B, self.hidden_dim)
        if B == 0:
            return h
        prev_t = ts[:, 0] if idx.shape[1] else batch.times.new_zeros(B)
        for j in range(idx.shape[1]):
            v = valid[:, j]
            gap = (ts[:, j] - prev_t).abs().unsqueeze(-1)
            h_new = self.cell(torch.cat([masked_values(xs[:, j], ms[:, j]), ms[:, j], gap], -1),
                              h)
            h = torch.where(v[:, None], h_new, h)
            prev_t = torch.where(v, ts[:, j], prev_t)
        if t_end is not None:  # a gap-only update to the latent origin (samples with points)
            gap = (check_t_end(t_end, prev_t, "LatentODE encoder") - prev_t).abs().unsqueeze(-1)
            h_new = self.cell(torch.cat([h.new_zeros(B, 2 * D), gap], -1), h)
            h = torch.where(valid.any(1)[:, None], h_new, h)
        return h


@dataclass
class ElboTerms:
    """Per-sequence ``elbo``, ``loglik`` (MC average over z0 samples), ``kl`` (closed form),
    all ``[B]``; ``loss`` = ``-(loglik - kl_weight * kl).sum() / number of target entries``."""

    elbo: Tensor
    loglik: Tensor
    kl: Tensor
    loss: Tensor


def kl_normal_std(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, diag(exp(logvar))) || N(0, I))`` summed over the last dim (closed form)."""
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(-1)


def gaussian_loglik(x: Tensor, mean: Tensor, std: float, mask: Tensor) -> Tensor:
    """``sum over masked-in entries of log N(x | mean, std^2)`` over the last dim."""
    var = std * std
    lp = -0.5 * (x - mean).pow(2) / var - 0.5 * math.log(2 * math.pi * var)
    return masked_values(lp, mask).sum(-1)


def masked_mse(pred: Tensor, target: IrregularBatch) -> float:
    """Mean squared error over the target's masked-in entries."""
    m = target.mask
    return float(masked_values((pred - target.values).pow(2), m).sum() / m.sum().clamp_min(1.0))


class LatentODE(nn.Module):
    """Latent ODE: ``z0 ~ q(z0 | obs)``, ``dz/dt = f(z)``, ``x(t) ~ N(dec(z(t)), obs_std^2)``.

    ``encoder``: ``"odernn"`` (ODE-RNN run backwards in time, then evolved to ``t0``) or
    ``"rnn"`` (GRU with time-gap inputs run backwards).  ``solver`` configures the latent solve
    (``gradient="adjoint"`` for O(1) memory), ``encoder_solver`` the ODE-RNN's gap solves.
    """

    def __init__(self, input_dim: int, latent_dim: int = 6, rec_hidden: int = 32,
                 ode_hidden: int = 64, dec_hidden: int = 64, encoder: str = "odernn",
                 obs_std: float = 0.1, solver: SolverConfig | None = None,
                 encoder_solver: SolverConfig | None = None) -> None:
        super().__init__()
        input_dim = check_size(input_dim, "LatentODE(input_dim)")
        latent_dim = check_size(latent_dim, "LatentODE(latent_dim)")
        for name, v in (("rec_hidden", rec_hidden), ("ode_hidden", ode_hidden),
                        ("dec_hidden", dec_hidden)):
            check_size(v, f"LatentODE({name})")
        obs_std = check_positive(obs_std, "LatentODE(obs_std)")
        for name, v in (("solver", solver), ("encoder_solver", encoder_solver)):
            if v is not None and not isinstance(v, SolverConfig):
                raise InputError(f"LatentODE({name}=...): expected a SolverConfig, got "
                                 f"{type(v).__name__}.")
        if encoder == "odernn":
            self.encoder: nn.Module = ODERNN(input_dim, rec_hidden, ode_hidden, encoder_solver)
        elif encoder == "rnn":
            self.encoder = _GRUDeltaEncoder(input_dim, rec_hidden)
        else:
            raise InputError(f"LatentODE: encoder={encoder!r}; use 'odernn' or 'rnn'.")
        self.input_dim, self.latent_dim, self.obs_std = input_dim, latent_dim, obs_std
        self.to_z0 = nn.Linear(rec_hidden, 2 * latent_dim)
        self.func = ODEFunc(latent_dim, ode_hidden)
        self.decoder = _mlp(latent_dim, dec_hidden, input_dim, layers=1)
        self.solver = solver or SolverConfig()

    def nfe(self) -> dict[str, int]:
        """Function evaluations since the last :meth:`reset_nfe` (forward and backward)."""
        return {"latent": self.func.nfe, "encoder": self.encoder.func.nfe}

    def reset_nfe(self) -> None:
        self.func.nfe = 0
        self.encoder.func.nfe = 0

    def encode(self, obs: IrregularBatch, t0: float = 0.0) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(mu, logvar)``, each ``[B, latent_dim]``, of ``z0 = z(t0)``;
        the prior ``(0, 0)`` for a sequence without any observation in ``obs``."""
        check_obs(obs, "LatentODE.encode", self.input_dim)
        mu, logvar = self.to_z0(self.encoder(obs, t_end=t0, reverse=True)).chunk(2, -1)
        seen = obs.point_mask.any(1, keepdim=True)
        zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
        return torch.where(seen, mu, zero), torch.where(seen, logvar.clamp(-12.0, 6.0), zero)

    def trajectory(self, z0: Tensor, times: Tensor, t0: float = 0.0) -> Tensor:
        """Latent path ``[..., N, latent]`` at ``times`` (1-D, increasing, ``>= t0``) from
        ``z0 [..., latent]`` at ``t0``, all leading dims solved together in one call."""
        if times.dim() != 1 or times.numel() == 0:
            raise InputError(f"LatentODE.trajectory: times must be a non-empty 1-D tensor, got "
                             f"shape {tuple(times.shape)}.")
        if float(times[0]) < t0:
            raise InputError(f"LatentODE.trajectory: times start at {float(times[0])} < t0={t0}; "
                             "pass t0 <= the earliest requested time.")
        if z0.shape[-1:] != (self.latent_dim,):
            raise InputError(f"LatentODE.trajectory: z0 must be [..., latent_dim={self.latent_dim}]"
                             f", got shape {tuple(z0.shape)}.")
        lead = z0.shape[:-1]
        if z0.numel() == 0:  # an empty batch: nothing to solve
            return z0.new_zeros(*lead, times.numel(), self.latent_dim)
        prepend = float(times[0]) > t0
        grid = torch.cat([times.new_tensor([t0]), times]) if prepend else times
        zs = self.solver.solve(self.func, z0.reshape(-1, self.latent_dim), grid)
        zs = zs[1:] if prepend else zs  # [N, prod(lead), latent]
        return zs.movedim(0, 1).reshape(*lead, times.numel(), self.latent_dim)

    def _z0(self, mu: Tensor, logvar: Tensor, n_samples: int, eps: Tensor | None) -> Tensor:
        if eps is None:
            eps = torch.randn(n_samples, *mu.shape, dtype=mu.dtype, device=mu.device)
        return mu + (0.5 * logvar).exp() * eps  # [S, B, latent]

    def elbo(self, obs: IrregularBatch, target: IrregularBatch, n_samples: int = 1,
             kl_weight: float = 1.0, eps: Tensor | None = None, t0: float = 0.0) -> ElboTerms:
        """ELBO of ``target`` given the encoder's view ``obs`` (``eps [S, B, latent]`` fixes the
        reparameterisation noise, e.g. zeros for the posterior mean)."""
        check_obs(target, "LatentODE.elbo", self.input_dim, "target")
        if obs.values.shape[0] != target.values.shape[0]:
            raise InputError("LatentODE.elbo: obs and target must hold the same samples "
                             f"(batch {obs.values.shape[0]} vs {target.values.shape[0]}).")
        mu, logvar = self.encode(obs, t0)
        z = self.trajectory(self._z0(mu, logvar, n_samples, eps), target.times, t0)
        bi, ki = target.point_mask.nonzero(as_tuple=True)  # decode only the observed points
        lp = gaussian_loglik(target.values[bi, ki], self.decoder(z[:, bi, ki]), self.obs_std,
                             target.mask[bi, ki])  # [S, P]
        loglik = lp.new_zeros(lp.shape[0], mu.shape[0]).index_add(1, bi, lp).mean(0)
        kl = kl_normal_std(mu, logvar)
        loss = -(loglik - kl_weight * kl).sum() / target.mask.sum().clamp_min(1.0)
        return ElboTerms(loglik - kl, loglik, kl, loss)

    def loss(self, obs: IrregularBatch, target: IrregularBatch, **kw: Any) -> Tensor:
        """Training loss: the normalised negative ELBO (``kw`` as for :meth:`elbo`)."""
        return self.elbo(obs, target, **kw).loss

    @torch.no_grad()
    def predict(self, obs: IrregularBatch, times: Tensor, mask: Tensor | None = None,
                n_samples: int = 8, t0: float = 0.0) -> Prediction:
        """Decoded trajectories at ``times`` from ``n_samples`` posterior draws of ``z0``; mean
        and spread over draws (``n_samples=0``: the posterior mean ``z0 = mu`` only).
        ``mask`` (which of ``times`` each sample wants, ``[B, N]`` or ``[B, N, D]``) is only
        checked: the latent ODE predicts every time."""
        check_query_mask(mask, obs.values.shape[0], times, self.input_dim, "LatentODE.predict")
        check_size(n_samples, "LatentODE.predict(n_samples)", low=0)
        mu, logvar = self.encode(obs, t0)
        eps = None
        if n_samples == 0:
            eps = torch.zeros(1, *mu.shape, dtype=mu.dtype, device=mu.device)
        samples = self.decoder(self.trajectory(self._z0(mu, logvar, max(n_samples, 1), eps),
                                               times, t0))
        mean = samples.mean(0)
        std = samples.std(0, unbiased=False) if samples.numel() else torch.zeros_like(mean)
        return Prediction(mean, std, samples)


def extrapolate(model: LatentODE | RNNBaseline, batch: IrregularBatch, t_split: float,
                n_samples: int = 8, t0: float = 0.0
                ) -> tuple[Prediction, IrregularBatch, IrregularBatch]:
    """Condition on the points with ``t <= t_split``, predict those after it.

    Returns ``(prediction on future.times, conditioning batch, future batch)``.
    """
    cond, future = split_at(batch, t_split)
    cond, future = cond.select(slice(None)), future.select(slice(None))
    return model.predict(cond, future.times, future.point_mask, n_samples, t0), cond, future


def interpolate(model: LatentODE | RNNBaseline, batch: IrregularBatch, keep: float = 0.5,
                n_samples: int = 8, generator: torch.Generator | None = None, t0: float = 0.0
                ) -> tuple[Prediction, IrregularBatch, IrregularBatch]:
    """Condition on a random fraction ``keep`` of each sample's points, predict the others.

    Returns ``(prediction on held.times, conditioning batch, held-out batch)``.
    """
    cond, held = random_split(batch, keep, generator)
    cond, held = cond.select(slice(None)), held.select(slice(None))
    return model.predict(cond, held.times, held.point_mask, n_samples, t0), cond, held
