"""The RNN baseline for irregularly sampled series, and the parts it shares with
:mod:`pydiffbridge.nn.latent` (the prediction container, the MLP builder, point gathering).

:class:`RNNBaseline` is an autoregressive GRU that gets the time gap as an input (the "RNN-Δt"
of Rubanova et al. 2019); it visits each sample's own points only, so a batch gives each
sequence exactly what it gets alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pydiffbridge.nn._checks import check_obs, check_query_mask, check_size
from pydiffbridge.nn.timeseries import IrregularBatch, masked_values, pack

__all__ = ["RNNBaseline", "Prediction"]


@dataclass
class Prediction:
    """``mean``/``std`` ``[B, N, D]`` at the requested times; ``samples [S, B, N, D]`` or None."""

    mean: Tensor
    std: Tensor
    samples: Tensor | None = None


def _mlp(n_in: int, hidden: int, n_out: int, layers: int = 2) -> nn.Sequential:
    layers = check_size(layers, "layers", low=0)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.Tanh()]
    mods.append(nn.Linear(hidden if layers else n_in, n_out))
    return nn.Sequential(*mods)


def _gather(batch: IrregularBatch, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b = torch.arange(idx.shape[0], device=idx.device)[:, None]
    return batch.times[idx], batch.values[b, idx], batch.mask[b, idx]


class RNNBaseline(nn.Module):
    """Autoregressive GRU with time gaps: at each of a sample's points ``t_j`` (observed or
    queried) ``h_j = GRU([v_{j-1}, m_{j-1}, t_j - t_{j-1}], h_{j-1})`` and ``x_hat_j = dec(h_j)``,
    where ``v`` is the previous observation, or the model's own prediction where there was
    none (``m`` its mask).  A point's prediction never sees its own value."""

    def __init__(self, input_dim: int, hidden_dim: int = 64, dec_hidden: int = 64) -> None:
        super().__init__()
        self.input_dim = input_dim = check_size(input_dim, "RNNBaseline(input_dim)")
        self.hidden_dim = hidden_dim = check_size(hidden_dim, "RNNBaseline(hidden_dim)")
        dec_hidden = check_size(dec_hidden, "RNNBaseline(dec_hidden)")
        self.cell = nn.GRUCell(2 * input_dim + 1, hidden_dim)
        self.decoder = _mlp(hidden_dim, dec_hidden, input_dim, layers=1)

    def forward(self, obs: IrregularBatch, times: Tensor, mask: Tensor | None = None,
                t0: float = 0.0) -> Tensor:
        """Predictions ``[B, len(times), D]`` (only requested points are meaningful)."""
        check_obs(obs, "RNNBaseline.forward", self.input_dim)
        check_query_mask(mask, obs.values.shape[0], times, self.input_dim, "RNNBaseline.forward")
        grid = torch.unique(torch.cat([obs.times, times.to(obs.times.dtype)]))
        io, iq = torch.searchsorted(grid, obs.times), torch.searchsorted(grid, times)
        B, D = obs.values.shape[0], obs.values.shape[-1]
        vals = obs.values.new_zeros(B, grid.numel(), D)
        msk = obs.values.new_zeros(B, grid.numel(), D)
        vals[:, io], msk[:, io] = obs.values, obs.mask
        want = torch.zeros(B, grid.numel(), dtype=torch.bool, device=grid.device)
        q = (torch.ones(B, times.numel(), dtype=torch.bool, device=grid.device)
             if mask is None else mask.bool())
        want[:, iq] = q if q.dim() == 2 else q.any(-1)
        full = IrregularBatch(grid, vals, msk)
        idx, valid = pack(want | full.point_mask)
        ts, xs, ms = _gather(full, idx)
        h = vals.new_zeros(B, self.hidden_dim)
        v, m = vals.new_zeros(B, D), vals.new_zeros(B, D)
        prev_t = torch.full((B,), float(t0), dtype=grid.dtype)
        outs = []
        for j in range(idx.shape[1]):
            ok = valid[:, j]
            h_new = self.cell(torch.cat([v, m, (ts[:, j] - prev_t).unsqueeze(-1)], -1), h)
            y = self.decoder(h_new)
            outs.append(y)
            h = torch.where(ok[:, None], h_new, h)
            v = torch.where(ok[:, None], masked_values(xs[:, j], ms[:, j]) + (1 - ms[:, j]) * y, v)
            m = torch.where(ok[:, None], ms[:, j], m)
            prev_t = torch.where(ok, ts[:, j], prev_t)
        out = vals.new_zeros(B, grid.numel(), D)
        if outs:  # padded idx are distinct unused points, so the scatter never collides
            out = out.scatter(1, idx.unsqueeze(-1).expand(-1, -1, D), torch.stack(outs, 1))
        return out[:, iq]

    def loss(self, obs: IrregularBatch, target: IrregularBatch, **kw: Any) -> Tensor:
        """Mean squared error over the target's entries (Gaussian NLL up to constants)."""
        check_obs(target, "RNNBaseline.loss", self.input_dim, "target")
        pred = self.forward(obs, target.times, target.point_mask, t0=kw.get("t0", 0.0))
        err = masked_values((pred - target.values).pow(2), target.mask)
        return err.sum() / target.mask.sum().clamp_min(1)

    @torch.no_grad()
    def predict(self, obs: IrregularBatch, times: Tensor, mask: Tensor | None = None,
                n_samples: int = 0, t0: float = 0.0) -> Prediction:
        """Deterministic predictions (``std`` is zero; ``n_samples`` is ignored)."""
        mean = self.forward(obs, times, mask, t0)
        return Prediction(mean, torch.zeros_like(mean))
