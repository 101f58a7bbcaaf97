"""Tests of pydiffbridge.nn.latent and pydiffbridge.nn.timeseries (issue 8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from torch.distributions import Normal, kl_divergence

from pydiffbridge.errors import InputError
from pydiffbridge.nn.latent import (
    ODERNN,
    LatentODE,
    RNNBaseline,
    SolverConfig,
    extrapolate,
    gaussian_loglik,
    kl_normal_std,
    masked_mse,
)
from pydiffbridge.nn.timeseries import (
    IrregularBatch,
    SpiralConfig,
    TimeSeries,
    collate,
    make_spirals,
    make_windows,
    pack,
    random_split,
    split_at,
)

TIGHT = SolverConfig(rtol=1e-10, atol=1e-12)
ITERS = 150  # training iterations per model in the spiral extrapolation test


def _series(seed: int = 0, n: int = 3, dim: int = 2) -> list[TimeSeries]:
    """Sequences with different, irregular times and lengths (float64)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = 4 + 3 * i
        t = torch.sort(torch.rand(k, generator=g, dtype=torch.float64) * 2.0).values
        out.append(TimeSeries(t, torch.randn(k, dim, generator=g, dtype=torch.float64)))
    return out


def test_collate_union_mask_and_pack() -> None:
    seqs = _series()
    b = collate(seqs)
    assert b.times.shape[0] == sum(s.t.numel() for s in seqs)  # random times: all distinct
    assert bool((b.times[1:] > b.times[:-1]).all())
    idx, valid = pack(b.point_mask)
    for i, s in enumerate(seqs):
        n = s.t.numel()
        assert int(b.mask[i].sum()) == 2 * n
        assert int(valid[i].sum()) == n
        own = idx[i, :n]
        torch.testing.assert_close(b.times[own], s.t, rtol=0, atol=0)
        torch.testing.assert_close(b.values[i, own], s.x, rtol=0, atol=0)
    # random_split partitions each sample's points and keeps at least one
    kept, held = random_split(b, 0.3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(kept.mask + held.mask, b.mask, rtol=0, atol=0)
    assert bool((kept.point_mask.sum(1) >= 1).all())


@pytest.mark.parametrize("encoder", ["odernn", "rnn"])
def test_batch_likelihood_equals_each_sequence_alone(encoder: str) -> None:
    torch.manual_seed(0)
    model = LatentODE(2, latent_dim=3, rec_hidden=8, ode_hidden=16, dec_hidden=16,
                      encoder=encoder, obs_std=0.3, solver=TIGHT, encoder_solver=TIGHT).double()
    seqs = _series(seed=3)
    batch = collate(seqs)
    cond, _ = split_at(batch, 1.0)
    eps = torch.randn(2, len(seqs), 3, dtype=torch.float64)
    together = model.elbo(cond, batch, n_samples=2, eps=eps)
    # masked-out values must never matter: fill them with garbage
    junk = IrregularBatch(batch.times, batch.values + 1e3 * (1 - batch.mask), batch.mask)
    junk_cond = IrregularBatch(cond.times, cond.values + 1e3 * (1 - cond.mask), cond.mask)
    with_junk = model.elbo(junk_cond, junk, n_samples=2, eps=eps)
    torch.testing.assert_close(with_junk.loglik, together.loglik, rtol=1e-9, atol=1e-9)
    for i, s in enumerate(seqs):
        alone = collate([s])
        c1, _ = split_at(alone, 1.0)
        one = model.elbo(c1.select(0), alone, n_samples=2, eps=eps[:, i:i + 1])
        torch.testing.assert_close(one.loglik[0], together.loglik[i], rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(one.kl[0], together.kl[i], rtol=1e-7, atol=1e-9)


def _reference_odernn(model: ODERNN, s: TimeSeries, t_end: float, reverse: bool) -> np.ndarray:
    """Per-observation loop on real time with SciPy's DOP853 (no normalised-gap trick)."""
    def rhs(_t: float, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.func.net(torch.as_tensor(y)[None]).numpy()[0]

    order = range(s.t.numel() - 1, -1, -1) if reverse else range(s.t.numel())
    h = np.zeros(model.hidden_dim)
    prev = None
    for k in order:
        tk = float(s.t[k])
        if prev is not None:
            h = solve_ivp(rhs, (prev, tk), h, method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1]
        with torch.no_grad():
            x = torch.cat([s.x[k], torch.ones_like(s.x[k])])[None]
            h = model.gru(x, torch.as_tensor(h)[None]).numpy()[0]
        prev = tk
    return solve_ivp(rhs, (prev, t_end), h, method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1]


@pytest.mark.parametrize("reverse", [False, True])
def test_odernn_normalised_gap_solve_matches_scipy(reverse: bool) -> None:
    torch.manual_seed(1)
    model = ODERNN(2, hidden_dim=5, ode_hidden=12, solver=TIGHT).double()
    seqs = _series(seed=5)
    t_end = -0.2 if reverse else 2.3
    with torch.no_grad():
        h = model(collate(seqs), t_end=t_end, reverse=reverse)
    for i, s in enumerate(seqs):
        ref = _reference_odernn(model, s, t_end, reverse)
        np.testing.assert_allclose(h[i].numpy(), ref, rtol=1e-7, atol=1e-8)


def test_kl_matches_torch_distributions_and_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(4, 3, generator=g, dtype=torch.float64)
    q = Normal(mu, (0.5 * logvar).exp())
    ref = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
    torch.testing.assert_close(kl_normal_std(mu, logvar), ref, rtol=1e-12, atol=1e-12)
    # Monte Carlo: E_q[log q(z) - log p(z)] within 5 standard errors
    z = q.sample((200_000,))
    diff = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)
    se = diff.std(0) / math.sqrt(diff.shape[0])
    assert bool(((diff.mean(0) - kl_normal_std(mu, logvar)).abs() < 5 * se).all())


def test_elbo_terms_match_independent_formulas() -> None:
    torch.manual_seed(2)
    model = LatentODE(2, latent_dim=3, rec_hidden=8, ode_hidden=16, dec_hidden=16,
                      encoder="rnn", obs_std=0.25, solver=TIGHT).double()
    batch = collate(_series(seed=7))
    cond, _ = split_at(batch, 1.0)
    eps = torch.randn(3, 3, 3, dtype=torch.float64)
    terms = model.elbo(cond, batch, n_samples=3, eps=eps)
    mu, logvar = model.encode(cond)
    q = Normal(mu, (0.5 * logvar).exp())
    kl_ref = kl_divergence(q, Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(terms.kl, kl_ref, rtol=1e-10, atol=1e-12)
    # likelihood: decode the samples on the dense union grid, torch's Normal.log_prob
    with torch.no_grad():
        mean = model.decoder(model.trajectory(mu + (0.5 * logvar).exp() * eps, batch.times))
    lp = Normal(mean, 0.25).log_prob(batch.values) * batch.mask
    torch.testing.assert_close(terms.loglik, lp.sum((-2, -1)).mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(terms.elbo, terms.loglik - terms.kl)
    x, m = torch.randn(5, 2, dtype=torch.float64), torch.ones(5, 2, dtype=torch.float64)
    m[1, 0] = 0
    ref = (Normal(0.3, 0.7).log_prob(x) * m).sum(-1)
    torch.testing.assert_close(gaussian_loglik(x, torch.full_like(x, 0.3), 0.7, m), ref)


def test_adjoint_gradient_matches_direct() -> None:
    batch = collate(_series(seed=9))
    cond, _ = split_at(batch, 1.0)
    grads = []
    for gradient in ("direct", "adjoint"):
        torch.manual_seed(3)
        solver = SolverConfig(rtol=1e-10, atol=1e-12, gradient=gradient)
        model = LatentODE(2, latent_dim=3, rec_hidden=6, ode_hidden=10, dec_hidden=10,
                          solver=solver, encoder_solver=solver).double()
        eps = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
        model.loss(cond, batch, eps=eps).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-8)


def test_rnn_baseline_never_sees_the_value_it_predicts_and_batches_exactly() -> None:
    torch.manual_seed(4)
    model = RNNBaseline(2, hidden_dim=8, dec_hidden=8).double()
    seqs = _series(seed=11)
    batch = collate(seqs)
    values = batch.values.clone().requires_grad_(True)
    pred = model(IrregularBatch(batch.times, values, batch.mask), batch.times, batch.point_mask)
    for b, k in [(0, 2), (2, 5)]:
        kk = int(pack(batch.point_mask)[0][b, k])
        (g,) = torch.autograd.grad(pred[b, kk].sum(), values, retain_graph=True)
        assert float(g[b, kk].abs().max()) == 0.0  # its own value is not an input
        assert float(g[b].abs().sum()) > 0.0  # the earlier ones are
        others = [j for j in range(len(seqs)) if j != b]
        assert float(g[others].abs().max()) == 0.0  # nor other samples'
    for i, s in enumerate(seqs):
        one = model(collate([s]), s.t)
        own = pack(batch.point_mask)[0][i, : s.t.numel()]
        torch.testing.assert_close(one[0], pred[i, own], rtol=1e-12, atol=1e-12)


def test_spirals_turn_both_ways_and_windows_standardise() -> None:
    seqs = make_spirals(6, SpiralConfig(noise_std=0.0), seed=0, dtype=torch.float64)
    for s in seqs:
        x = s.x
        cross = x[:-1, 0] * x[1:, 1] - x[:-1, 1] * x[1:, 0]  # sign of the turning direction
        assert bool((torch.sign(cross) == s.info["direction"]).all())
        assert float(x.abs().max()) <= 1.0
    t = np.arange(200) * 0.1
    y = np.sin(t) + 3.0
    y[7] = np.nan
    wins, mean, std = make_windows(t, y, window=4.0, stride=1.0, keep=0.5, t_start=0.0,
                                   t_stop=float(t[-1]), seed=0)
    ok = np.isfinite(y)
    assert mean == pytest.approx(y[ok].mean()) and std == pytest.approx(y[ok].std())
    assert len(wins) == 16
    for w in wins:
        assert 0.0 <= float(w.t[0]) and float(w.t[-1]) <= 4.0 + 1e-6
        start = w.info["start"]
        ref = (np.sin(w.t.numpy().astype(float) + start) + 3.0 - mean) / std
        np.testing.assert_allclose(w.x[:, 0].numpy(), ref, atol=1e-5)


def test_bad_inputs_raise_input_error() -> None:
    with pytest.raises(InputError, match="encoder"):
        LatentODE(2, encoder="lstm")
    with pytest.raises(InputError, match="strictly increasing"):
        collate([TimeSeries(torch.tensor([0.0, 0.0]), torch.zeros(2, 1))])
    with pytest.raises(InputError, match="same number of channels"):
        collate([TimeSeries(torch.tensor([0.0]), torch.zeros(1, 1)),
                 TimeSeries(torch.tensor([0.0]), torch.zeros(1, 2))])
    model = LatentODE(2, latent_dim=2, rec_hidden=4, ode_hidden=4, dec_hidden=4, encoder="rnn")
    with pytest.raises(InputError, match="t0"):
        model.trajectory(torch.zeros(1, 2), torch.tensor([-1.0, 0.5]))
    with pytest.raises(InputError, match="gradient"):
        SolverConfig(gradient="magic").solve(model.func, torch.zeros(1, 2), torch.tensor([0., 1.]))


@pytest.mark.slow
def test_latent_ode_extrapolates_spirals_better_than_rnn() -> None:
    """Noise-free spirals, fixed seed, equal budgets: latent ODE beats the RNN-Δt baseline."""
    cfg = SpiralConfig(n_obs=(10, 20), n_extrap=(10, 20))
    train, test = make_spirals(48, cfg, seed=1), make_spirals(32, cfg, seed=2)
    errors = {}
    for kind in ("latent", "rnn"):
        torch.manual_seed(0)
        model = (LatentODE(2, latent_dim=4, rec_hidden=64, ode_hidden=64, dec_hidden=64,
                           encoder="rnn", obs_std=0.1) if kind == "latent"
                 else RNNBaseline(2, hidden_dim=64, dec_hidden=64))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for it in range(ITERS):
            batch = collate([train[int(i)] for i in torch.randperm(48, generator=g)[:32]])
            cond = split_at(batch, cfg.t_obs)[0].select(slice(None))
            kw = {"kl_weight": min(1.0, (it + 1) / 100)} if kind == "latent" else {}
            loss = model.loss(cond, batch, **kw)
            opt.zero_grad()
            loss.backward()
            opt.step()
        pred, _, future = extrapolate(model, collate(test), cfg.t_obs, n_samples=0)
        errors[kind] = masked_mse(pred.mean, future)
    msg = (f"extrapolation MSE after {ITERS} iterations: latent ODE {errors['latent']:.4f}, "
           f"RNN-Δt {errors['rnn']:.4f}")
    print(msg)
    assert errors["latent"] < errors["rnn"], msg

