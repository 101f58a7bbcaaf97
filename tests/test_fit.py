"""pydiffbridge.fit: observations on irregular times, the Adam/LBFGS loop (early stopping,
resumption), and parameter recovery of a noiseless Lotka-Volterra problem through the adjoint."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pydiffbridge import odeint
from pydiffbridge.fit import FitConfig, FitState, Trajectories, fit, make_observations

TRUTH = torch.tensor([1.5, 1.0, 1.0, 3.0], dtype=torch.float64)  # alpha, beta, delta, gamma


class LV(nn.Module):
    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.log_theta = nn.Parameter(torch.log(theta.clone()))

    def forward(self, t, u):
        a, b, d, g = torch.exp(self.log_theta)
        x, y = u[..., 0], u[..., 1]
        return torch.stack([a * x - b * x * y, d * x * y - g * y], dim=-1)


def _truth_sim(y0, t):
    return odeint(LV(TRUTH), y0, t, method="dopri8", rtol=1e-12, atol=1e-12)


def _obs(noise=0.0, keep=0.6, n_times=12, series=2, seed=0, t_end=2.0):
    gen = torch.Generator().manual_seed(seed)
    y0 = torch.tensor([[1.0, 1.0], [1.8, 0.6], [0.7, 1.4]], dtype=torch.float64)[:series]
    return make_observations(_truth_sim, y0, t_end, n_times, keep, noise, gen)


def test_observations_layout():
    obs = _obs(keep=0.4, n_times=10, series=3)
    assert obs.t.ndim == 1 and bool((obs.t[1:] > obs.t[:-1]).all())
    assert float(obs.t[0]) == 0.0 and float(obs.t[-1]) <= 2.0
    assert obs.y.shape == obs.clean.shape == (len(obs.t), 3, 2)
    assert not bool(obs.mask[0].any())  # the initial state is given, not observed
    assert bool((obs.mask.sum(0) >= 3).all())  # min_per_series
    # noiseless: observed values are the clean ones, unobserved ones are zero
    m = obs.mask
    assert torch.equal(obs.y[m], obs.clean[m])
    assert bool((obs.y[~m] == 0).all())
    assert obs.n_obs == int(m.sum()) * 2
    # each series has its own times: not all masks are equal
    assert not all(torch.equal(m[:, 0], m[:, b]) for b in range(3))
    # sse of the clean values is 0, and counts only observed points
    assert float(obs.sse(obs.clean)) == 0.0
    pred = obs.clean.clone()
    pred[~m] += 100.0
    assert float(obs.sse(pred)) == 0.0
    pred[m] += 1.0
    assert float(obs.sse(pred)) == pytest.approx(obs.n_obs)
    assert float(obs.sse(pred, scale=torch.tensor([2.0, 2.0], dtype=torch.float64))) == \
        pytest.approx(obs.n_obs / 4)


def test_select_and_with_noise():
    obs = _obs(series=3)
    sub = obs.select([2, 0])
    assert torch.equal(sub.y0, obs.y0[[2, 0]]) and torch.equal(sub.mask, obs.mask[:, [2, 0]])
    a = obs.with_noise(0.1, torch.Generator().manual_seed(1))
    b = obs.with_noise(0.1, torch.Generator().manual_seed(1))
    c = obs.with_noise(0.1, torch.Generator().manual_seed(2))
    assert torch.equal(a.y, b.y) and not torch.equal(a.y, c.y)
    assert torch.equal(a.mask, obs.mask) and torch.equal(a.t, obs.t)
    resid = (a.y - obs.clean)[obs.mask]
    spread = obs.clean.reshape(-1, 2).std(0)
    assert 0.02 < float((resid / spread).std()) < 0.3  # about 0.1 of the spread


def _quadratic():
    w = nn.Parameter(torch.tensor([3.0, -2.0], dtype=torch.float64))
    target = torch.tensor([1.0, 0.5], dtype=torch.float64)
    return w, (lambda: ((w - target) ** 2).sum()), target


def test_fit_adam_then_lbfgs_converges():
    w, loss_fn, target = _quadratic()
    st = fit(loss_fn, [w], FitConfig(adam_iters=20, lr=0.1, lbfgs_iters=3, patience=0),
             progress=False)
    assert st.phase == "done" and st.lbfgs_start == 20
    assert torch.allclose(w.detach(), target, atol=1e-8)
    assert st.losses[-1] < 1e-12 and len(st.losses) >= 21
    assert "lbfgs" in st.stop_reason


def test_fit_early_stopping():
    w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    st = fit(lambda: (w * 0).sum() + 1.0, [w], FitConfig(adam_iters=100, patience=5),
             progress=False)  # a constant loss never improves
    assert len(st.losses) == 6 and "no improvement for 5" in st.stop_reason


def test_fit_resume_equals_uninterrupted():
    w1, loss1, _ = _quadratic()
    cfg = FitConfig(adam_iters=12, lr=0.2, lbfgs_iters=2, patience=0, ckpt_every=5)
    ref = fit(loss1, [w1], cfg, progress=False)

    saved = []
    w2, loss2, _ = _quadratic()
    fit(loss2, [w2], cfg, progress=False,
        save=lambda st: saved.append((st.to_dict(), w2.detach().clone())))
    # resume from the checkpoint taken after 10 Adam iterations
    state, w_at = next((s, w) for s, w in saved if s["phase"] == "adam" and s["iter"] == 10)
    w3 = nn.Parameter(w_at.clone())
    target = torch.tensor([1.0, 0.5], dtype=torch.float64)
    st = fit(lambda: ((w3 - target) ** 2).sum(), [w3], cfg, progress=False,
             state=FitState.from_dict(copy.deepcopy(state)))
    assert torch.equal(w3.detach(), w1.detach())
    assert st.losses == ref.losses


def test_trajectories_counts_nfe():
    obs = _obs()
    sim = Trajectories(LV(TRUTH * 1.1), method="dopri5", rtol=1e-6, atol=1e-8)
    loss = obs.sse(sim(obs.y0, obs.t))
    loss.backward()
    f1, b1 = sim.nfe()
    assert f1 > 0 and b1 > 0  # adjoint: the backward pass evaluates the rhs again
    sim(obs.y0, obs.t)
    f2, b2 = sim.nfe()
    assert f2 > f1 and b2 == b1


def test_recover_lotka_volterra_noiseless():
    """Noiseless data, initial guess 15-30 % off: the fit recovers every parameter to 1 %."""
    obs = _obs(noise=0.0, keep=0.7, n_times=12, series=2, t_end=2.0)
    guess = TRUTH * torch.tensor([1.3, 0.8, 1.2, 0.85], dtype=torch.float64)
    rhs = LV(guess)
    sim = Trajectories(rhs, method="dopri5", rtol=1e-7, atol=1e-9, gradient="adjoint")
    scale = obs.scale()
    n = obs.n_obs
    st = fit(lambda: obs.sse(sim(obs.y0, obs.t), scale) / n, sim.parameters(),
             FitConfig(adam_iters=30, lr=0.05, lbfgs_iters=4, patience=0), progress=False)
    theta = torch.exp(rhs.log_theta.detach())
    rel = ((theta - TRUTH).abs() / TRUTH)
    assert float(rel.max()) < 0.01, (theta.tolist(), st.stop_reason)
    assert st.losses[-1] < 1e-8 and math.isfinite(st.losses[-1])
