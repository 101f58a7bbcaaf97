"""Hostile inputs to the pydiffbridge.nn modules: wrong shapes and sizes raise InputError
naming the argument; a sequence gets in a batch what it gets alone (also with no conditioning
point at all); empty batches return empty results at once."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from pydiffbridge.errors import InputError
from pydiffbridge.nn import (
    CNF,
    ODERNN,
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashMLP,
    ConvODEFunc,
    KineticEnergy,
    LatentODE,
    ODEBlock,
    PlanarCNF,
    PlanarFlow,
    RNNBaseline,
    SolverConfig,
    sample_toy,
)
from pydiffbridge.nn.latent import ODEFunc
from pydiffbridge.nn.odeblock import group_norm
from pydiffbridge.nn.timeseries import IrregularBatch, TimeSeries, collate, split_at

F64 = torch.float64
TIGHT = SolverConfig(rtol=1e-10, atol=1e-12)
RK4 = SolverConfig(method="rk4", options={"step_size": 0.25})


def _series(seed: int = 0, n: int = 4, dim: int = 2) -> list[TimeSeries]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = 3 + 2 * i
        t = torch.sort(torch.rand(k, generator=g, dtype=F64) * 2.0).values
        out.append(TimeSeries(t, torch.randn(k, dim, generator=g, dtype=F64)))
    return out


def _finishes(fn, timeout: float = 60.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return."""
    box: dict = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["exc"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"{fn} did not return within {timeout} s on an empty batch"
    if "exc" in box:
        raise box["exc"]
    return box["out"]


def _latent(encoder: str = "rnn", enc_solver: SolverConfig | None = None) -> LatentODE:
    torch.manual_seed(0)
    return LatentODE(2, latent_dim=3, rec_hidden=6, ode_hidden=8, dec_hidden=8, encoder=encoder,
                     solver=TIGHT, encoder_solver=enc_solver).double()


# ----------------------------------------------------------------------------- shapes
def test_batch_with_wrong_mask_shape_or_times_length() -> None:
    times, values = torch.linspace(0, 1, 5, dtype=F64), torch.zeros(2, 5, 3, dtype=F64)
    with pytest.raises(InputError, match=r"mask .*expected \(2, 5, 3\), got \(2, 5, 1\)"):
        IrregularBatch(times, values, torch.ones(2, 5, 1, dtype=F64))
    with pytest.raises(InputError, match=r"times has length 4.*expected values \[B, 4, D\]"):
        IrregularBatch(times[:4], values, torch.ones_like(values))
    with pytest.raises(InputError, match=r"values must be \[B, N, D\]"):
        IrregularBatch(times, values[0], values[0])
    with pytest.raises(InputError, match=r"times must be 1-D"):
        IrregularBatch(times[None], values, torch.ones_like(values))
    b = collate(_series())
    with pytest.raises(InputError, match=r"with_mask: mask must be \[B, N\]"):
        b.with_mask(torch.ones(b.values.shape[0], b.values.shape[1] + 1))


def test_models_check_their_inputs() -> None:
    model = _latent()
    batch = collate(_series())
    B, N, D = batch.values.shape
    wrong_d = collate(_series(dim=3))
    with pytest.raises(InputError, match=r"LatentODE.encode: obs has 3 channels.*input_dim=2"):
        model.encode(wrong_d)
    with pytest.raises(InputError, match=r"LatentODE.elbo: target has 3 channels"):
        model.elbo(batch, wrong_d)
    times = torch.linspace(0, 2, 7, dtype=F64)
    with pytest.raises(InputError, match=r"predict: mask must be \[B, len\(times\)\] = "
                                         rf"\({B}, 7\).*got \({B}, 6\)"):
        model.predict(batch, times, mask=torch.ones(B, 6))
    with pytest.raises(InputError, match=r"times must be 1-D"):
        model.predict(batch, times[None])
    rnn = RNNBaseline(2, 4, 4).double()
    with pytest.raises(InputError, match=r"RNNBaseline.forward: mask must be"):
        rnn(batch, times, torch.ones(B + 1, 7, dtype=torch.bool))
    unsorted = IrregularBatch(batch.times.flip(0), batch.values, batch.mask)
    with pytest.raises(InputError, match="strictly increasing"):
        model.encode(unsorted)
    odernn = ODERNN(2, 4, 4, solver=RK4).double()
    with pytest.raises(InputError, match=r"t_end must be a number or a \[B\]"):
        odernn(batch, t_end=torch.zeros(B + 2, dtype=F64))
    with pytest.raises(InputError, match=r"z0 must be \[\.\.\., latent_dim=3\]"):
        model.trajectory(torch.zeros(2, 4, dtype=F64), times)


# ----------------------------------------------------------------------------- invariance
def _with_empty_sample(batch: IrregularBatch, k: int) -> IrregularBatch:
    keep = torch.ones(batch.values.shape[:2], dtype=F64)
    keep[k] = 0
    return batch.with_mask(keep)


CASES = [("rnn", None, 1e-12), ("odernn", RK4, 1e-12), ("odernn", TIGHT, 1e-7)]


@pytest.mark.parametrize("encoder,enc_solver,tol", CASES,
                         ids=["gru", "odernn-fixed-step", "odernn-adaptive"])
def test_posterior_in_a_batch_equals_alone_also_without_points(encoder, enc_solver, tol) -> None:
    """Fixed-step and GRU encoders: equal to rounding; an adaptive ODE-RNN shares its steps
    over the batch, so equal to the solver tolerance.  A sequence without conditioning points
    gets the prior, exactly, whatever else is in the batch."""
    model = _latent(encoder, enc_solver)
    cond = _with_empty_sample(split_at(collate(_series()), 1.0)[0], k=1)
    assert not bool(cond.point_mask[1].any())
    with torch.no_grad():
        mu, logvar = model.encode(cond.select(slice(None)), t0=0.0)
        for i in range(cond.values.shape[0]):
            alone = cond.select(i)
            m1, l1 = model.encode(alone, t0=0.0)
            torch.testing.assert_close(m1[0], mu[i], rtol=tol, atol=tol)
            torch.testing.assert_close(l1[0], logvar[i], rtol=tol, atol=tol)
    assert alone.times.numel() > 0
    assert cond.select(1).times.numel() == 0  # alone it has no time grid at all
    assert float(mu[1].abs().max()) == 0.0 and float(logvar[1].abs().max()) == 0.0
    # its KL term is 0 and the batch's other sequences do not move it
    shifted = _with_empty_sample(split_at(collate(_series(seed=5)), 1.5)[0], k=1)
    with torch.no_grad():
        m2, l2 = model.encode(shifted, t0=0.0)
        terms = model.elbo(cond, collate(_series()), eps=torch.zeros(1, 4, 3, dtype=F64))
    assert float(m2[1].abs().max()) == 0.0 and float(l2[1].abs().max()) == 0.0
    assert float(terms.kl[1]) == 0.0


@pytest.mark.parametrize("reverse", [False, True])
def test_odernn_leaves_a_sequence_without_points_at_the_initial_state(reverse: bool) -> None:
    odernn = ODERNN(2, 5, 6, solver=RK4).double()
    for seed in (0, 1):
        batch = _with_empty_sample(collate(_series(seed)), k=2)
        with torch.no_grad():
            h = odernn(batch, t_end=3.0, reverse=reverse)
        assert float(h[2].abs().max()) == 0.0 and float(h[0].abs().max()) > 0.0


def test_masked_out_nan_values_never_reach_a_result() -> None:
    model, rnn = _latent(), RNNBaseline(2, 4, 4).double()
    batch = collate(_series())
    cond = split_at(batch, 1.0)[0]
    poison = [IrregularBatch(b.times, torch.where(b.mask > 0, b.values, torch.nan), b.mask)
              for b in (batch, cond)]
    eps = torch.zeros(1, 4, 3, dtype=F64)
    with torch.no_grad():
        clean = model.elbo(cond, batch, eps=eps)
        dirty = model.elbo(poison[1], poison[0], eps=eps)
        torch.testing.assert_close(dirty.elbo, clean.elbo, rtol=0, atol=0)
        assert math.isfinite(float(rnn.loss(poison[1], poison[0])))
        torch.testing.assert_close(rnn.loss(poison[1], poison[0]), rnn.loss(cond, batch))


# ----------------------------------------------------------------------------- empty batches
def _empty_batch(n_times: int = 3, dim: int = 2) -> IrregularBatch:
    return IrregularBatch(torch.linspace(0, 1, n_times, dtype=F64),
                          torch.zeros(0, n_times, dim, dtype=F64),
                          torch.zeros(0, n_times, dim, dtype=F64))


@pytest.mark.parametrize("trace,gradient", [("exact", "adjoint"), ("exact", "direct"),
                                            ("hutchinson", "adjoint")])
def test_cnf_empty_batch_returns_at_once(trace: str, gradient: str) -> None:
    cnf = CNF(ConcatSquashMLP(2, (8,)).double(), trace=trace, gradient=gradient,
              regularizers={"kinetic": 0.1})
    x = torch.zeros(0, 2, dtype=F64)
    logp = _finishes(lambda: cnf.log_prob(x))
    assert logp.shape == (0,) and cnf.last_nfe == 0
    logp, regs = _finishes(lambda: cnf.log_prob(x, return_regularization=True))
    assert logp.shape == (0,) and regs["kinetic"].shape == (0,)
    res = _finishes(lambda: cnf.transform(x, torch.linspace(0, 1, 4, dtype=F64)))
    assert res.trajectory.shape == (4, 0, 2) and res.z.shape == (0, 2)
    s, lp = _finishes(lambda: cnf.sample(0, dim=2, return_log_prob=True, dtype=F64))
    assert s.shape == (0, 2) and lp.shape == (0,)


def test_other_flows_and_blocks_on_empty_batches() -> None:
    planar_cnf = CNF(PlanarCNF(2, 3).double(), trace="closed_form")
    assert _finishes(lambda: planar_cnf.log_prob(torch.zeros(0, 2, dtype=F64))).shape == (0,)
    flow = PlanarFlow(2, 3).double()
    assert _finishes(lambda: flow.log_prob(torch.zeros(0, 2, dtype=F64))).shape == (0,)
    assert _finishes(lambda: flow.sample(0)).shape == (0, 2)
    block = ODEBlock(ConcatSquashMLP(2, (4,)).double(), gradient="adjoint")
    x = torch.zeros(0, 2, dtype=F64, requires_grad=True)
    assert _finishes(lambda: block(x)).shape == (0, 2) and block.nfe_forward == 0
    traj = _finishes(lambda: block.trajectory(x, torch.linspace(0, 1, 5)))
    assert traj.shape == (5, 0, 2)
    conv = ODEBlock(ConvODEFunc(4), method="rk4", options={"step_size": 0.5})
    assert _finishes(lambda: conv(torch.zeros(0, 4, 5, 5))).shape == (0, 4, 5, 5)
    t = torch.tensor(0.5)
    assert ConcatLinear(2, 3)(t, torch.zeros(0, 2)).shape == (0, 3)
    assert ConcatConv2d(2, 3)(t, torch.zeros(0, 2, 4, 4)).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("encoder", ["rnn", "odernn"])
def test_latent_models_on_empty_batches(encoder: str) -> None:
    model = _latent(encoder, RK4 if encoder == "odernn" else None)
    empty, times = _empty_batch(), torch.linspace(0, 2, 6, dtype=F64)
    mu, logvar = _finishes(lambda: model.encode(empty))
    assert mu.shape == (0, 3) and logvar.shape == (0, 3)
    terms = _finishes(lambda: model.elbo(empty, empty))
    assert terms.elbo.shape == (0,) and float(terms.loss.detach()) == 0.0
    pred = _finishes(lambda: model.predict(empty, times, n_samples=2))
    assert pred.mean.shape == (0, 6, 2) and pred.samples.shape == (2, 0, 6, 2)
    z = _finishes(lambda: model.trajectory(torch.zeros(0, 3, dtype=F64), times))
    assert z.shape == (0, 6, 3)
    no_times = _empty_batch(n_times=0)
    assert _finishes(lambda: model.encode(no_times))[0].shape == (0, 3)
    odernn = ODERNN(2, 5, 6).double()
    assert _finishes(lambda: odernn(empty, t_end=0.0, reverse=True)).shape == (0, 5)
    rnn = RNNBaseline(2, 4, 4).double()
    assert _finishes(lambda: rnn(empty, times)).shape == (0, 6, 2)
    assert _finishes(lambda: rnn.predict(empty, times)).mean.shape == (0, 6, 2)
    assert float(_finishes(lambda: rnn.loss(empty, empty)).detach()) == 0.0


def test_sequences_without_any_time_point_get_the_prior() -> None:
    model = _latent("odernn", RK4)
    b = IrregularBatch(torch.zeros(0, dtype=F64), torch.zeros(3, 0, 2, dtype=F64),
                       torch.zeros(3, 0, 2, dtype=F64))
    mu, logvar = (v.detach() for v in _finishes(lambda: model.encode(b)))
    assert mu.shape == (3, 3) and float(mu.abs().max()) == 0.0 == float(logvar.abs().max())


# ----------------------------------------------------------------------------- constructors
def _cnf(**kw):
    return CNF(ConcatSquashMLP(2, (4,)), **kw)


BAD = [
    (lambda: LatentODE(0), "LatentODE(input_dim)"),
    (lambda: LatentODE(2, latent_dim=0), "LatentODE(latent_dim)"),
    (lambda: LatentODE(2, rec_hidden=-1), "LatentODE(rec_hidden)"),
    (lambda: LatentODE(2, obs_std=0.0), "LatentODE(obs_std): must be > 0"),
    (lambda: LatentODE(2, obs_std=float("nan")), "LatentODE(obs_std): expected a finite"),
    (lambda: LatentODE(2, solver="dopri5"), "expected a SolverConfig"),
    (lambda: ODERNN(2, hidden_dim=0), "ODERNN(hidden_dim)"),
    (lambda: ODERNN(2.5), "ODERNN(input_dim): expected an integer"),
    (lambda: RNNBaseline(2, hidden_dim=True), "RNNBaseline(hidden_dim)"),
    (lambda: ODEFunc(0), "ODEFunc(dim)"),
    (lambda: SolverConfig(rtol=-1e-3), "SolverConfig.rtol"),
    (lambda: SolverConfig(gradient="magic"), "SolverConfig.gradient"),
    (lambda: _cnf(trace="magic"), "CNF(trace="),
    (lambda: _cnf(rtol=0.0), "CNF(rtol)"),
    (lambda: _cnf(atol=float("inf")), "CNF(atol)"),
    (lambda: _cnf(method=5), "CNF(method=5)"),
    (lambda: _cnf(t=(0.0, 1.0, 2.0)), "two distinct finite times"),
    (lambda: CNF(3), "CNF(func=...)"),
    (lambda: ConcatSquashMLP(2, "64,64"), "sequence of layer widths"),
    (lambda: ConcatSquashMLP(2, (8, 0)), "ConcatSquashMLP(hidden[1])"),
    (lambda: ODEBlock(ConcatSquashMLP(2, (4,)), rtol=float("nan")), "ODEBlock(rtol)"),
    (lambda: ODEBlock(ConcatSquashMLP(2, (4,)), method=None), "ODEBlock(method=None)"),
    (lambda: PlanarFlow(2, 0), "PlanarFlow(num_layers)"),
    (lambda: PlanarFlow(2, 3).sample(-1), "PlanarFlow.sample(n)"),
    (lambda: PlanarCNF(0, 3), "PlanarCNF(dim)"),
    (lambda: KineticEnergy(weight=-1.0), "KineticEnergy(weight)"),
    (lambda: group_norm(40), "multiple of 32"),
    (lambda: ConcatConv2d(0, 3), "ConcatConv2d(in_channels)"),
    (lambda: ConcatLinear(2, 0), "ConcatLinear(out_features)"),
    (lambda: sample_toy("moons", 0), "sample_toy(n)"),
    (lambda: _cnf().sample(-2, dim=2), "CNF.sample(n)"),
    (lambda: CNF(lambda t, z: -z, gradient="direct").sample(3), "dimension D is unknown"),
]


@pytest.mark.parametrize("make,words", BAD, ids=[w for _, w in BAD])
def test_bad_constructor_arguments_raise_input_error(make, words: str) -> None:
    with pytest.raises(InputError) as exc:
        make()
    assert words in str(exc.value)
