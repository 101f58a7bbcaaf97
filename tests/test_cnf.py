"""Tests for continuous normalizing flows: CNF, regularisers, planar flows, toy data.

References are independent of the code under test: closed forms (matrix exponential),
SciPy quadrature / ``solve_ivp`` with the Jacobian from ``torch.autograd.functional``,
central finite differences, and statistical bounds for the Hutchinson estimator.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from torch import nn

from pydiffbridge.errors import InputError
from pydiffbridge.nn.cnf import CNF, ConcatSquashMLP
from pydiffbridge.nn.planar import PlanarCNF, PlanarFlow
from pydiffbridge.nn.regularizers import JacobianFrobenius, KineticEnergy
from pydiffbridge.nn.toy2d import TOY_DATASETS, sample_toy

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


class Linear(nn.Module):
    """f(t, z) = A z."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, t, z):
        return z @ self.A.T


def log_normal(z: np.ndarray) -> np.ndarray:
    return -0.5 * z.shape[-1] * np.log(2 * np.pi) - 0.5 * (z**2).sum(-1)


def linear_case(seed: int = 0, d: int = 3, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    A = 0.6 * torch.randn(d, d, generator=g, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64)
    return A, x


def mlp(seed: int = 0, dim: int = 2) -> ConcatSquashMLP:
    torch.manual_seed(seed)
    m = ConcatSquashMLP(dim, (16, 16), "tanh").to(F64)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)  # a clearly non-trivial flow
    return m


def reference_logp(func, x: torch.Tensor, t0: float, t1: float) -> np.ndarray:
    """log p(x) by SciPy solve_ivp of [z, ∫tr J] with the full autograd Jacobian."""
    out = []
    for xi in x:
        d = xi.numel()

        def rhs(t, y, d=d):
            z = torch.tensor(y[:d], dtype=F64)
            tt = torch.tensor(t, dtype=F64)
            with torch.no_grad():
                f = func(tt, z[None])[0]
            J = torch.autograd.functional.jacobian(lambda v: func(tt, v[None])[0], z)
            return np.concatenate([f.numpy(), [float(torch.trace(J))]])

        y0 = np.concatenate([xi.detach().numpy(), [0.0]])
        sol = scipy.integrate.solve_ivp(rhs, (t0, t1), y0, method="DOP853", rtol=1e-11,
                                        atol=1e-11)
        zT, int_tr = sol.y[:d, -1], sol.y[d, -1]
        out.append(log_normal(zT) + int_tr)
    return np.array(out)


# ----------------------------------------------------------------------------- exact trace
@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
@pytest.mark.parametrize("t", [(0.0, 0.7), (0.3, -0.4)])
def test_linear_field_log_prob_and_grad_match_matrix_exponential(gradient, t):
    A, x = linear_case()
    f = Linear(A)
    cnf = CNF(f, t=t, trace="exact", gradient=gradient, **TIGHT)
    logp = cnf.log_prob(x)
    T = t[1] - t[0]
    z = x.numpy() @ scipy.linalg.expm(T * A.numpy()).T
    ref = log_normal(z) + T * np.trace(A.numpy())
    np.testing.assert_allclose(logp.detach().numpy(), ref, rtol=0, atol=1e-8)
    # gradient of sum log p w.r.t. A against autograd through the closed form
    logp.sum().backward()
    A2 = A.clone().requires_grad_(True)
    z2 = x @ torch.linalg.matrix_exp(T * A2).T
    (-0.5 * (z2**2).sum() + len(x) * T * torch.trace(A2)).backward()
    torch.testing.assert_close(f.A.grad, A2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [
    "scipy", pytest.param("julia", marks=[pytest.mark.julia, pytest.mark.slow])])
@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_linear_field_other_backends(backend, gradient):
    if backend == "julia":
        pytest.importorskip("juliacall")
    A, x = linear_case(7, n=3)
    f = Linear(A)
    cnf = CNF(f, t=(0.0, 0.5), gradient=gradient, backend=backend, rtol=1e-9, atol=1e-9)
    logp = cnf.log_prob(x)
    z = x.numpy() @ scipy.linalg.expm(0.5 * A.numpy()).T
    ref = log_normal(z) + 0.5 * np.trace(A.numpy())
    np.testing.assert_allclose(logp.detach().numpy(), ref, rtol=0, atol=1e-7)
    logp.sum().backward()
    A2 = A.clone().requires_grad_(True)
    z2 = x @ torch.linalg.matrix_exp(0.5 * A2).T
    (-0.5 * (z2**2).sum() + len(x) * 0.5 * torch.trace(A2)).backward()
    torch.testing.assert_close(f.A.grad, A2.grad, rtol=1e-5, atol=1e-6)


def test_mlp_exact_log_prob_matches_scipy_reference():
    m = mlp(1)
    x = torch.tensor([[0.3, -0.8], [1.2, 0.4], [-1.0, -0.2]], dtype=F64)
    cnf = CNF(m, t=(0.0, 1.0), trace="exact", gradient="direct", **TIGHT)
    with torch.no_grad():
        logp = cnf.log_prob(x).numpy()
    np.testing.assert_allclose(logp, reference_logp(m, x, 0.0, 1.0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adjoint_gradient_matches_finite_differences(trace):
    """d/dθ mean log p for a nonlinear field: needs create_graph through the trace."""
    m = mlp(2)
    x = torch.tensor([[0.5, -0.3], [-0.7, 0.9]], dtype=F64)
    cnf = CNF(m, trace=trace, gradient="adjoint", rtol=1e-9, atol=1e-9,
              adjoint_options={"adjoint_rtol": 1e-9, "adjoint_atol": 1e-9})

    def loss():
        return cnf.log_prob(x, generator=torch.Generator().manual_seed(5)).mean()

    loss().backward()
    p = m.layers[1].linear.weight
    analytic = p.grad[3, 7].item()
    h = 1e-5
    with torch.no_grad():
        p[3, 7] += h
        up = loss().item()
        p[3, 7] -= 2 * h
        down = loss().item()
        p[3, 7] += h
    assert analytic == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


# ----------------------------------------------------------------------------- Hutchinson
def test_hutchinson_noise_is_fixed_over_the_solve():
    """For f = Az the estimate with noise fixed over the solve is exactly -T εᵀAε per row;
    noise redrawn at every evaluation would not give this identity."""
    A, _ = linear_case(3)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    cnf = CNF(Linear(A), t=(0.0, 0.5), trace="hutchinson", gradient="direct", **TIGHT)
    with torch.no_grad():
        res = cnf.transform(x, log_density=True)
    eps = cnf.last_noise
    assert set(eps.unique().tolist()) == {-1.0, 1.0}
    expected = -0.5 * torch.einsum("bi,ij,bj->b", eps, A, eps)
    torch.testing.assert_close(res.delta_logp, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_linear_field_unbiased_with_stated_bound(noise):
    """Mean over N rows of the estimate is within 5σ/√N of the closed form, σ the exact
    standard deviation of εᵀ(TA)ε: Var = 2‖S‖_F² (Gaussian), 2(‖S‖_F² - Σ S_ii²)
    (Rademacher), S = T(A + Aᵀ)/2.  False-failure probability < 1e-6 (CLT)."""
    A, x = linear_case(4, n=1)
    N, T = 4000, 0.8
    xs = x.expand(N, -1).contiguous()
    cnf = CNF(Linear(A), t=(0.0, T), trace="hutchinson", noise=noise, gradient="direct",
              rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        logp = cnf.log_prob(xs, generator=torch.Generator().manual_seed(0)).numpy()
    z = x.numpy() @ scipy.linalg.expm(T * A.numpy()).T
    ref = float(log_normal(z)[0] + T * np.trace(A.numpy()))
    S = T * (A.numpy() + A.numpy().T) / 2
    var = 2 * (S**2).sum() - (2 * (np.diag(S) ** 2).sum() if noise == "rademacher" else 0.0)
    assert logp.std() > 0.1 * math.sqrt(var)  # it really is a random estimate
    assert abs(logp.mean() - ref) < 5 * math.sqrt(var / N)


def test_hutchinson_mlp_log_prob_unbiased():
    """Nonlinear field: N copies of one point; the trajectory does not depend on ε, so the
    row estimates are iid with mean the exact log p (SciPy reference); bound 5·s/√N with s
    the sample standard deviation (false-failure probability < 1e-6)."""
    m = mlp(3)
    x = torch.tensor([[0.4, -0.6]], dtype=F64)
    N = 3000
    cnf = CNF(m, trace="hutchinson", gradient="direct", rtol=1e-8, atol=1e-8)
    with torch.no_grad():
        logp = cnf.log_prob(x.expand(N, -1).contiguous(),
                            generator=torch.Generator().manual_seed(1)).numpy()
    ref = reference_logp(m, x, 0.0, 1.0)[0]
    s = logp.std(ddof=1)
    assert s > 0
    assert abs(logp.mean() - ref) < 5 * s / math.sqrt(N)


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_sample_then_log_prob_round_trip(gradient):
    m = mlp(4)
    cnf = CNF(m, trace="exact", gradient=gradient, **TIGHT)
    z0 = torch.randn(20, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    x, logp_sample = cnf.sample(20, z=z0, return_log_prob=True)
    assert not torch.allclose(x, z0, atol=1e-2)  # the flow moved the points
    logp_data = cnf.log_prob(x)
    torch.testing.assert_close(logp_data, logp_sample, rtol=0, atol=1e-7)
    torch.testing.assert_close(cnf.transform(x).z, z0, rtol=0, atol=1e-7)


def test_sample_draws_base_with_dim_from_func():
    cnf = CNF(mlp(0), gradient="direct")
    x = cnf.sample(7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (7, 2) and x.dtype == F64 and torch.isfinite(x).all()


# ----------------------------------------------------------------------------- regularisers
def test_kinetic_energy_matches_quadrature():
    A, x = linear_case(5, n=3)
    T = 0.9
    cnf = CNF(Linear(A), t=(0.0, T), gradient="direct", regularizers={"kinetic": 0.5}, **TIGHT)
    with torch.no_grad():
        _, regs = cnf.log_prob(x, return_regularization=True)
    An = A.numpy()
    for i, xi in enumerate(x.numpy()):
        ref, _ = scipy.integrate.quad(
            lambda t, xi=xi: float(np.sum((An @ scipy.linalg.expm(t * An) @ xi) ** 2)), 0.0, T,
            epsabs=1e-12, epsrel=1e-12)
        assert regs["kinetic"][i].item() == pytest.approx(ref, rel=1e-8)
    assert float(cnf.regularization_loss(regs)) == pytest.approx(
        0.5 * regs["kinetic"].mean().item(), rel=1e-12)


def test_jacobian_frobenius_exact_and_hutchinson():
    A, _ = linear_case(6)
    T = 0.6
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    fro = T * float((A**2).sum())
    exact = CNF(Linear(A), t=(0.0, T), trace="exact", gradient="direct",
                regularizers=[JacobianFrobenius(1.0), KineticEnergy(0.1)], **TIGHT)
    with torch.no_grad():
        _, regs = exact.log_prob(x[:4], return_regularization=True)
    torch.testing.assert_close(regs["jacobian"], torch.full((4,), fro, dtype=F64))
    hutch = CNF(Linear(A), t=(0.0, T), trace="hutchinson", gradient="direct",
                regularizers={"jacobian": 1.0}, **TIGHT)
    with torch.no_grad():
        _, regs = hutch.log_prob(x, return_regularization=True)
    eps = hutch.last_noise
    torch.testing.assert_close(regs["jacobian"], T * ((eps @ A) ** 2).sum(1))  # fixed noise
    r = regs["jacobian"].numpy()
    assert abs(r.mean() - fro) < 5 * r.std(ddof=1) / math.sqrt(len(r))


# ----------------------------------------------------------------------------- NFE
def test_nfe_counts_calls_of_the_dynamics():
    calls = [0]
    m = mlp(0)

    def counted(t, z):
        calls[0] += 1
        return m(t, z)

    cnf = CNF(counted, gradient="direct", rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        cnf.log_prob(torch.zeros(3, 2, dtype=F64))
    assert cnf.last_nfe == calls[0] > 0
    cnf2 = CNF(counted, gradient="direct", method="rk4", options={"step_size": 0.125})
    calls[0] = 0
    with torch.no_grad():
        cnf2.log_prob(torch.zeros(3, 2, dtype=F64))
    assert cnf2.last_nfe == calls[0] >= 8 * 4 - 1


# ----------------------------------------------------------------------------- planar
def test_planar_cnf_closed_form_trace_equals_autograd():
    torch.manual_seed(0)
    f = PlanarCNF(3, width=6).to(F64)
    z = torch.randn(10, 3, dtype=F64)
    for t in (0.0, 0.37, 1.0):
        tt = torch.tensor(t, dtype=F64)
        dz, tr = f.dynamics_and_trace(tt, z)
        torch.testing.assert_close(dz, f(tt, z))
        for i in range(len(z)):
            J = torch.autograd.functional.jacobian(lambda v, tt=tt: f(tt, v[None])[0], z[i])
            assert tr[i].item() == pytest.approx(torch.trace(J).item(), abs=1e-12)


def test_planar_cnf_closed_form_density_matches_reference_and_integrates_to_one():
    torch.manual_seed(1)
    f = PlanarCNF(2, width=5).to(F64)
    cnf = CNF(f, trace="closed_form", gradient="direct", rtol=1e-8, atol=1e-8)
    x = torch.tensor([[0.2, 0.1], [-1.0, 0.5]], dtype=F64)
    with torch.no_grad():
        np.testing.assert_allclose(cnf.log_prob(x).numpy(), reference_logp(f, x, 0.0, 1.0),
                                   atol=1e-6)
        g = torch.linspace(-7, 7, 141, dtype=F64)
        gx, gy = torch.meshgrid(g, g, indexing="xy")
        dens = cnf.log_prob(torch.stack([gx, gy], -1).reshape(-1, 2)).exp()
    mass = dens.sum().item() * (g[1] - g[0]).item() ** 2
    assert mass == pytest.approx(1.0, abs=5e-3)


def test_planar_flow_logdet_inverse_and_normalisation():
    torch.manual_seed(2)
    flow = PlanarFlow(2, num_layers=6, init_scale=1.0).to(F64)
    with torch.no_grad():
        flow.u[0] = -5.0 * flow.w[0]  # would be non-invertible without the reparametrisation
    x = torch.randn(8, 2, dtype=F64)
    z, logdet = flow(x)
    for i in range(len(x)):
        J = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        assert logdet[i].item() == pytest.approx(torch.linalg.slogdet(J)[1].item(), abs=1e-10)
        assert torch.linalg.det(J).item() > 0
    torch.testing.assert_close(flow.inverse(z.detach()), x, rtol=0, atol=1e-10)
    g = torch.linspace(-9, 9, 301, dtype=F64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    with torch.no_grad():
        dens = flow.log_prob(torch.stack([gx, gy], -1).reshape(-1, 2)).exp()
    assert dens.sum().item() * (g[1] - g[0]).item() ** 2 == pytest.approx(1.0, abs=2e-3)


# ----------------------------------------------------------------------------- toy data
def test_toy_datasets_seeded_and_shaped():
    for name in TOY_DATASETS:
        a, b = sample_toy(name, 500, seed=3), sample_toy(name, 500, seed=3)
        assert a.shape == (500, 2) and torch.equal(a, b) and torch.isfinite(a).all()
        assert not torch.equal(a, sample_toy(name, 500, seed=4))
        assert a.abs().max() < 8


def test_toy_dataset_geometry():
    c = sample_toy("checkerboard", 4000, seed=0, dtype=F64).numpy()
    assert np.all((np.floor(c[:, 0] / 2) + np.floor(c[:, 1] / 2)) % 2 == 0)
    assert np.all(np.abs(c) <= 4.0)
    g = sample_toy("8gaussians", 4000, seed=0, dtype=F64).numpy()
    ang = 2 * np.pi * np.arange(8) / 8
    centers = 4 / np.sqrt(2) * np.stack([np.cos(ang), np.sin(ang)], 1)
    dist = np.linalg.norm(g[:, None] - centers[None], axis=2).min(1)
    assert np.mean(dist < 4 * 0.5 / np.sqrt(2)) > 0.99  # within 4σ of the nearest centre


# ----------------------------------------------------------------------------- errors
def test_bad_input_raises_input_error():
    m = mlp(0)
    with pytest.raises(InputError, match="trace"):
        CNF(m, trace="approx")
    with pytest.raises(InputError, match="noise"):
        CNF(m, noise="uniform")
    with pytest.raises(InputError, match="gradient"):
        CNF(m, gradient="backprop")
    with pytest.raises(InputError, match="dynamics_and_trace"):
        CNF(m, trace="closed_form")
    with pytest.raises(InputError, match="nn.Module"):
        CNF(lambda t, z: z)
    with pytest.raises(InputError, match="distinct"):
        CNF(m, t=(1.0, 1.0))
    with pytest.raises(InputError, match="unknown name"):
        CNF(m, regularizers={"kinetik": 1.0})
    with pytest.raises(InputError, match="weight"):
        CNF(m, regularizers={"kinetic": -1.0})
    cnf = CNF(m, gradient="direct")
    with pytest.raises(InputError, match=r"\[batch, D\]"):
        cnf.log_prob(torch.zeros(2, dtype=F64))
    with pytest.raises(InputError, match="sample"):
        CNF(lambda t, z: z, gradient="direct").sample(3)
    with pytest.raises(InputError):
        sample_toy("spirals", 10)
