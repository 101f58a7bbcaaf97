"""Interpolating adjoint (``gradient="interpolated"``) against independent references: closed
forms (matrix exponential, Van Loan), central finite differences of SciPy's own ``solve_ivp``
at tight tolerance, gradcheck and direct backprop; on stiff problems where the plain adjoint
breaks down."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _models import MLP, Linear
from _models import rotated as _stiff_matrix
from _models import vanloan as _vanloan

import pydiffbridge as pdb
from pydiffbridge import errors as E

DT = torch.float64
scipy_integrate = pytest.importorskip("scipy.integrate")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------ stiff linear: closed form
def _stiff_linear_grads(gradient: str, method: str):
    A = _stiff_matrix(1000.0)
    f = Linear(A)
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    c = torch.tensor([1.0, 0.3], dtype=DT)
    sol = pdb.solve(f, y0, torch.tensor([0.0, 1.0], dtype=DT), rtol=1e-8, atol=1e-10,
                    backend="scipy", method=method, gradient=gradient)
    (sol.ys[-1] @ c).backward()
    ref_A = _vanloan(A, c, y0.detach(), 1.0)
    ref_y0 = torch.linalg.matrix_exp(A.T) @ c
    return _rel(f.A.grad, ref_A), _rel(y0.grad, ref_y0), sol.stats


def test_plain_adjoint_is_inaccurate_on_stiff_linear_system():
    # back-solving z through the -1000 mode amplifies forward errors by up to e^1000 (damped
    # only by the implicit method): dL/dA comes out wrong at a tolerance of 1e-8
    err_A, _, _ = _stiff_linear_grads("adjoint", "Radau")
    assert err_A > 1e-5, err_A


@pytest.mark.parametrize("method", ["Radau", "BDF"])
def test_stiff_linear_system_closed_form(method):
    err_A, err_y0, stats = _stiff_linear_grads("interpolated", method)
    assert err_A < 2e-6, err_A
    assert err_y0 < 1e-7, err_y0
    assert stats.nfe_backward > 0 and stats.steps_backward > 0


# ------------------------------------------------------------- Van der Pol mu = 1000
class VanDerPol(torch.nn.Module):
    def __init__(self, mu: float):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=DT))

    def forward(self, t, y):
        x, v = y
        return torch.stack([v, self.mu * (1 - x * x) * v - x])


def _vdp_loss_np(y0: np.ndarray, mu: float, tv: list[float], c: np.ndarray) -> float:
    def rhs(t, y):
        return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]

    def jac(t, y):
        return [[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]]

    r = scipy_integrate.solve_ivp(rhs, (tv[0], tv[-1]), y0, method="Radau", t_eval=tv,
                                  rtol=1e-12, atol=1e-14, jac=jac)
    assert r.success
    return float((r.y.T * c).sum())


@pytest.mark.parametrize("method", ["Radau"])
def test_van_der_pol_stiff_against_finite_differences(method):
    mu, tv = 1000.0, [0.0, 0.25, 0.5]
    y0v = np.array([2.0, -0.66])
    c = np.array([[0.0, 0.0], [0.5, 0.001], [1.0, 0.002]])
    f = VanDerPol(mu)
    y0 = torch.tensor(y0v, requires_grad=True)
    sol = pdb.solve(f, y0, torch.tensor(tv, dtype=DT), rtol=1e-8, atol=1e-10, backend="scipy",
                    method=method, gradient="interpolated")
    (sol.ys * torch.from_numpy(c)).sum().backward()
    eps = 1e-6
    e0 = np.array([eps, 0.0])
    fd_x0 = (_vdp_loss_np(y0v + e0, mu, tv, c) - _vdp_loss_np(y0v - e0, mu, tv, c)) / (2 * eps)
    # d/d(log mu): the mu-sensitivity is tiny in absolute terms, compare it on the log scale
    fd_lmu = (_vdp_loss_np(y0v, mu * math.exp(eps), tv, c)
              - _vdp_loss_np(y0v, mu * math.exp(-eps), tv, c)) / (2 * eps)
    assert abs(float(y0.grad[0]) - fd_x0) < 1e-6 * abs(fd_x0), (float(y0.grad[0]), fd_x0)
    assert abs(mu * float(f.mu.grad) - fd_lmu) < 1e-4 * abs(fd_lmu), (mu * float(f.mu.grad),
                                                                       fd_lmu)


# ------------------------------------------------------------------------ Robertson
class Robertson(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logk = torch.nn.Parameter(torch.log(torch.tensor([0.04, 3e7, 1e4], dtype=DT)))

    def forward(self, t, y):
        k1, k2, k3 = self.logk.exp()
        y1, y2, y3 = y
        return torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k2 * y2 * y2 - k3 * y2 * y3,
                            k2 * y2 * y2])


def _rober_loss_np(y0: np.ndarray, logk: np.ndarray, tv: list[float], c: np.ndarray) -> float:
    k = np.exp(logk)

    def rhs(t, y):
        y1, y2, y3 = y
        return [-k[0] * y1 + k[2] * y2 * y3, k[0] * y1 - k[1] * y2 * y2 - k[2] * y2 * y3,
                k[1] * y2 * y2]

    def jac(t, y):
        y1, y2, y3 = y
        return [[-k[0], k[2] * y3, k[2] * y2], [k[0], -2 * k[1] * y2 - k[2] * y3, -k[2] * y2],
                [0.0, 2 * k[1] * y2, 0.0]]

    r = scipy_integrate.solve_ivp(rhs, (tv[0], tv[-1]), y0, method="Radau", t_eval=tv,
                                  rtol=1e-12, atol=1e-16, jac=jac)
    assert r.success
    return float((r.y.T * c).sum())


@pytest.mark.slow
def test_robertson_bdf_against_finite_differences():
    tv = [0.0, 1.0, 10.0]
    c = np.array([[0.0, 0.0, 0.0], [1.0, 1e4, 0.0], [0.5, 2e4, 0.3]])
    y0v, lk = np.array([1.0, 0.0, 0.0]), np.log([0.04, 3e7, 1e4])
    f = Robertson()
    y0 = torch.tensor(y0v, requires_grad=True)
    sol = pdb.solve(f, y0, torch.tensor(tv, dtype=DT), rtol=1e-8, atol=1e-12, backend="scipy",
                    method="BDF", gradient="interpolated")
    (sol.ys * torch.from_numpy(c)).sum().backward()
    eps = 1e-6
    e = np.array([eps, 0.0, 0.0])
    fd_y1 = (_rober_loss_np(y0v + e, lk, tv, c) - _rober_loss_np(y0v - e, lk, tv, c)) / (2 * eps)
    e = np.array([0.0, eps, 0.0])
    fd_k2 = (_rober_loss_np(y0v, lk + e, tv, c) - _rober_loss_np(y0v, lk - e, tv, c)) / (2 * eps)
    assert abs(float(y0.grad[0]) - fd_y1) < 1e-5 * abs(fd_y1), (float(y0.grad[0]), fd_y1)
    assert abs(float(f.logk.grad[1]) - fd_k2) < 1e-5 * abs(fd_k2), (float(f.logk.grad[1]), fd_k2)


# --------------------------------------------------------------- torch backend, non-stiff
def test_gradcheck_torch_backend():
    W = torch.tensor([[-0.3, 0.8], [-0.7, -0.2]], dtype=DT, requires_grad=True)
    b = torch.tensor([0.2, -0.1], dtype=DT, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DT, requires_grad=True)
    t = torch.tensor([0.1, 0.3, 0.45], dtype=DT, requires_grad=True)

    def func(tt, y):
        return W @ torch.tanh(y) + b * torch.cos(3 * tt)

    def fn(y0, t, W_, b_):
        return pdb.solve(func, y0, t, rtol=1e-10, atol=1e-10, gradient="interpolated",
                         adjoint_params=(W_, b_)).ys

    assert torch.autograd.gradcheck(fn, (y0, t, W, b), eps=1e-6, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("checkpoints", ["auto", 5])
def test_matches_direct_backprop_torch_backend(checkpoints):
    f = MLP(hidden=8, scale=0.6, amp=0.2, freq=2.0)
    y0 = torch.tensor([0.4, -0.2], dtype=DT, requires_grad=True)
    t = torch.linspace(0, 2.0, 5, dtype=DT)
    target = torch.tensor([0.1, 0.3], dtype=DT)
    grads = {}
    for gradient in ("direct", "interpolated"):
        sol = pdb.solve(f, y0, t, rtol=1e-10, atol=1e-12, gradient=gradient,
                        adjoint_options={"checkpoints": checkpoints})
        loss = ((sol.ys - target) ** 2).sum()
        grads[gradient] = torch.autograd.grad(loss, (y0, *f.parameters()))
    for gi, gd in zip(grads["interpolated"], grads["direct"], strict=True):
        torch.testing.assert_close(gi, gd, rtol=1e-7, atol=1e-9)


def test_fixed_step_forward_matches_direct_backprop():
    # rk4 with h = 0.01: the continuous adjoint and backprop through the steps agree to O(h^4);
    # a record read off linear output interpolation (O(h^2)) would not
    f = MLP(hidden=8, seed=2, scale=0.6, amp=0.2, freq=2.0)
    y0 = torch.tensor([0.4, -0.2], dtype=DT, requires_grad=True)
    t = torch.linspace(0, 2.0, 5, dtype=DT)
    grads = {}
    for gradient in ("direct", "interpolated"):
        sol = pdb.solve(f, y0, t, method="rk4", options={"step_size": 0.01}, gradient=gradient,
                        adjoint_method="dopri5", adjoint_rtol=1e-10, adjoint_atol=1e-12)
        grads[gradient] = torch.autograd.grad(sol.ys.pow(2).sum(), (y0, *f.parameters()))
    for gi, gd in zip(grads["interpolated"], grads["direct"], strict=True):
        torch.testing.assert_close(gi, gd, rtol=1e-8, atol=1e-9)


def test_record_refinement_is_what_makes_a_coarse_record_accurate():
    A = torch.tensor([[-0.2, 2.0], [-2.0, -0.1]], dtype=DT)  # oscillates 2-3 times on [0, 5]
    c = torch.tensor([1.0, -0.5], dtype=DT)
    y0v = torch.tensor([1.0, 0.5], dtype=DT)
    ref = _vanloan(A, c, y0v, 5.0)
    errs = {}
    for refine in (0, 6):
        f = Linear(A)
        sol = pdb.solve(f, y0v.clone(), torch.tensor([0.0, 5.0], dtype=DT), rtol=1e-10,
                        atol=1e-12, gradient="interpolated",
                        adjoint_options={"checkpoints": 2, "refine": refine})
        (sol.ys[-1] @ c).backward()
        errs[refine] = _rel(f.A.grad, ref)
    assert errs[0] > 1e-3, errs  # three Hermite cubics cannot follow the oscillation
    assert errs[6] < 1e-7, errs


@pytest.mark.parametrize("reverse", [False, True])
def test_time_gradients_closed_form(reverse):
    A = torch.tensor([[-0.2, 1.0], [-0.8, -0.1]], dtype=DT)
    f = Linear(A)
    y0 = torch.tensor([1.0, -0.5], dtype=DT, requires_grad=True)
    tv = [0.2, 0.7, 1.5] if not reverse else [1.5, 0.7, 0.2]
    t = torch.tensor(tv, dtype=DT, requires_grad=True)
    cs = torch.tensor([[0.3, 0.0], [1.0, 0.5], [-0.3, 2.0]], dtype=DT)
    sol = pdb.solve(f, y0, t, rtol=1e-10, atol=1e-12, gradient="interpolated")
    (sol.ys * cs).sum().backward()
    y0d = y0.detach()
    Es = [torch.linalg.matrix_exp(A * (ti - tv[0])) for ti in tv]
    ref_t = torch.stack([c @ (A @ (E_ @ y0d)) for c, E_ in zip(cs, Es, strict=True)])
    # y(t0) = y0 does not move with t0: only the later outputs feel a shift of t0
    ref_t[0] = -sum(c @ E_ @ (A @ y0d) for c, E_ in zip(cs[1:], Es[1:], strict=True))
    ref_y0 = sum(E_.T @ c for c, E_ in zip(cs, Es, strict=True))
    ref_A = sum(_vanloan(A, c, y0d, ti - tv[0]) for c, ti in zip(cs, tv, strict=True))
    torch.testing.assert_close(t.grad, ref_t, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(y0.grad, ref_y0, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(f.A.grad, ref_A, rtol=1e-7, atol=1e-8)


class Ball(torch.nn.Module):
    def __init__(self, g: float):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(g, dtype=DT))

    def forward(self, t, y):
        return torch.stack([y[1], -self.g])


def test_event_time_gradient_closed_form():
    f = Ball(9.0)
    y0 = torch.tensor([2.0, 1.5], dtype=DT, requires_grad=True)
    sol = pdb.solve(f, y0, torch.tensor([0.0], dtype=DT), rtol=1e-10, atol=1e-12,
                    gradient="interpolated", event_fn=lambda t, y: y[0],
                    options={"t_max": 10.0})
    sol.event_t.backward()
    h, v, g = 2.0, 1.5, 9.0
    root = math.sqrt(v * v + 2 * g * h)  # t* = (v + root) / g
    torch.testing.assert_close(float(sol.event_t.detach()), (v + root) / g, rtol=1e-9,
                               atol=1e-9)
    torch.testing.assert_close(y0.grad, torch.tensor([1 / root, (1 + v / root) / g], dtype=DT),
                               rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(float(f.g.grad), -(v + root) / g ** 2 + h / (g * root),
                               rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("opts", [{"checkpoints": -1}, {"checkpoints": "dense"},
                                  {"refine": -2}, {"max_record": 1}])
def test_bad_options_raise(opts):
    f = Linear(_stiff_matrix(2.0))
    y0 = torch.ones(2, dtype=DT, requires_grad=True)
    with pytest.raises(E.InputError, match=next(iter(opts))):
        pdb.solve(f, y0, torch.tensor([0.0, 1.0], dtype=DT), gradient="interpolated",
                  adjoint_options=opts)
