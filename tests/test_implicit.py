"""Fixed-grid implicit Runge-Kutta steps (pydiffbridge.solvers.implicit), against closed forms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pydiffbridge.errors import InputError
from pydiffbridge.solvers.implicit import (
    IMPLICIT_METHODS,
    IMPLICIT_OPTIONS,
    IMPLICIT_ORDER,
    IMPLICIT_TABLEAUS,
    ConvergenceWarning,
    check_implicit_options,
    implicit_step,
)

F64 = torch.float64
L_STABLE = ("implicit_euler", "radauIIA3", "radauIIA5", "sdirk2", "trbdf2")
TIGHT = 1e-13  # rtol = atol: Newton then stops at roundoff, far below the truncation errors


class Counted:
    """fc of the fixed-grid loop: float t, flat y; records every evaluation time."""

    def __init__(self, f):
        self.f, self.ts = f, []

    def __call__(self, t, y):
        self.ts.append(t)
        return self.f(torch.scalar_tensor(t, dtype=y.real.dtype), y)


def integrate(f, method, y0, t0, t1, n, opts=None, rtol=TIGHT, atol=TIGHT, pass_f0=False,
              **kw):
    """n uniform steps; ``pass_f0``: hand each step f(t0, y) as the fixed-grid loop does."""
    fc, h, y = Counted(f), (t1 - t0) / n, y0
    for i in range(n):
        f0 = fc(t0 + i * h, y) if pass_f0 else None
        y = implicit_step(fc, method, t0 + i * h, h, y, f0, opts or {}, rtol, atol, **kw)
    return y, fc


# y' = A y with eigenvalues -10, -1, 0.7 (both signs, mildly stiff), non-normal A
_V = torch.tensor([[1.0, 0.3, -0.2], [0.1, 1.0, 0.4], [-0.3, 0.2, 1.0]], dtype=F64)
A_LIN = _V @ torch.diag(torch.tensor([-10.0, -1.0, 0.7], dtype=F64)) @ torch.linalg.inv(_V)
Y0_LIN = torch.tensor([1.0, -0.5, 0.25], dtype=F64)


def slope(hs, errs):
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


def test_tableaus_satisfy_order_conditions():
    # independent check of the transcribed coefficients: row sums, B(p) quadrature conditions
    # and C(q) for the collocation methods, in float64
    for name, tab in IMPLICIT_TABLEAUS.items():
        a, b, c = (np.array(v, dtype=float) for v in (tab.a, tab.b, tab.c))
        np.testing.assert_allclose(a.sum(1), c, atol=1e-15, err_msg=name)
        for k in range(1, tab.order + 1):
            assert abs(b @ c ** (k - 1) - 1 / k) < 1e-14, (name, k)
        assert abs(b @ c ** tab.order - 1 / (tab.order + 1)) > 1e-6, name  # not one order more
        if name.startswith(("radau", "gl")):
            for k in range(1, tab.stages + 1):
                np.testing.assert_allclose(a @ c ** (k - 1), c**k / k, atol=1e-14, err_msg=name)
    assert set(IMPLICIT_METHODS) == set(IMPLICIT_ORDER) and len(IMPLICIT_METHODS) == 9
    assert IMPLICIT_OPTIONS == {"max_iters", "newton_tol", "jacobian"}


_NS = {1: [40, 80, 160, 320], 2: [20, 40, 80, 160], 3: [10, 20, 40, 80], 4: [10, 20, 40, 80],
       5: [8, 16, 32, 64], 6: [6, 12, 24, 48]}


@pytest.mark.parametrize("method", IMPLICIT_METHODS)
def test_order_linear(method):
    p = IMPLICIT_ORDER[method]
    exact = torch.linalg.matrix_exp(A_LIN) @ Y0_LIN
    errs = [float((integrate(lambda t, y: A_LIN @ y, method, Y0_LIN, 0.0, 1.0, n)[0]
                   - exact).abs().max()) for n in _NS[p]]
    assert abs(slope([1 / n for n in _NS[p]], errs) - p) < 0.3, errs


@pytest.mark.parametrize("method", IMPLICIT_METHODS)
def test_order_reverse_time(method):
    # h < 0: integrate from 1 back to 0 (A / 5: backwards, -10 grows like exp(10 t))
    p, A = IMPLICIT_ORDER[method], A_LIN / 5
    y1 = torch.linalg.matrix_exp(A) @ Y0_LIN
    errs = [float((integrate(lambda t, y: A @ y, method, y1, 1.0, 0.0, n)[0]
                   - Y0_LIN).abs().max()) for n in _NS[p]]
    assert abs(slope([1 / n for n in _NS[p]], errs) - p) < 0.3, errs


def _logistic(t, y):
    return 3.0 * y * (1.0 - y)


@pytest.mark.parametrize("method", IMPLICIT_METHODS)
def test_order_logistic_nonlinear(method):
    # y' = r y (1 - y), y(t) = 1 / (1 + (1/y0 - 1) exp(-r t)); Newton on nonlinear stages
    p, y0 = IMPLICIT_ORDER[method], torch.tensor([0.1, 0.6, 1.5], dtype=F64)
    exact = 1 / (1 + (1 / y0 - 1) * math.exp(-3.0 * 2.0))
    ns = _NS[p]
    errs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        for n in ns:
            errs.append(float((integrate(_logistic, method, y0, 0.0, 2.0, 2 * n)[0]
                               - exact).abs().max()))
    assert abs(slope([1 / n for n in ns], errs) - p) < 0.3, errs
    assert errs[-1] < 1e-3


def test_linear_problem_newton_stops_after_one_iteration():
    # the W-method predictor is exact for y' = A y, so one evaluation round confirms it:
    # NFE per step = 1 (Jacobian, which also gives f0) + one per implicit stage
    implicit_stages = {"implicit_euler": 1, "implicit_midpoint": 1, "trapezoid": 1,
                       "radauIIA3": 2, "radauIIA5": 3, "gl4": 2, "gl6": 3, "sdirk2": 2,
                       "trbdf2": 2}
    for method in IMPLICIT_METHODS:
        with torch.no_grad():
            _, fc = integrate(lambda t, y: A_LIN @ y, method, Y0_LIN, 0.0, 1.0, 10)
        assert len(fc.ts) == 10 * (1 + implicit_stages[method]), method


def _pr(t, y):  # Prothero-Robinson: y' = -1000 (y - cos t) - sin t, y = cos t on the manifold
    return -1000.0 * (y - torch.cos(t)) - torch.sin(t)


@pytest.mark.parametrize("method", L_STABLE)
def test_stiff_prothero_robinson(method):
    # h = 0.1, h*lambda = -100; start off the smooth solution (y0 = cos 0 + 1): L-stable
    # methods damp the transient at once and then follow cos t
    y0 = torch.tensor([2.0], dtype=F64)
    y, _ = integrate(_pr, method, y0, 0.0, 2.0, 20, rtol=1e-8, atol=1e-10)
    assert abs(float(y) - math.cos(2.0)) < 2e-3
    # explicit Euler on the same grid: amplification |1 - 100| per step
    ye = y0.clone()
    for i in range(20):
        ye = ye + 0.1 * _pr(torch.scalar_tensor(0.1 * i, dtype=F64), ye)
    assert abs(float(ye)) > 1e30


def test_stiff_a_stable_but_not_l_stable_keeps_transient():
    # contrast that makes the test above meaningful: the trapezoid rule's R(-100) ~ -0.96
    y, _ = integrate(_pr, "trapezoid", torch.tensor([2.0], dtype=F64), 0.0, 2.0, 20)
    assert 0.1 < abs(float(y) - math.cos(2.0)) < 1.0


def _param_rhs(W, b):
    def f(t, y):
        return W @ torch.tanh(y) + b * torch.cos(t) - 0.5 * y**3
    return f


@pytest.mark.parametrize("pass_f0", [False, True])
@pytest.mark.parametrize("method", IMPLICIT_METHODS)
def test_gradcheck(method, pass_f0):
    # exact IFT derivative w.r.t. y0 and a parameter W captured by f, through 3 steps
    W0 = torch.tensor([[-2.0, 1.0, 0.3], [0.5, -1.5, 0.2], [0.1, -0.4, -3.0]], dtype=F64)
    b = torch.tensor([0.3, -0.2, 0.5], dtype=F64)

    def run(y0, W):
        return integrate(_param_rhs(W, b), method, y0, 0.1, 0.7, 3, pass_f0=pass_f0)[0]

    y0 = torch.tensor([0.4, -0.3, 0.8], dtype=F64, requires_grad=True)
    W = W0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(run, (y0, W), eps=1e-6, atol=1e-7, rtol=1e-6)


def _jac_exact(W, b):
    def jac(t, y):
        return W * (1 - torch.tanh(y) ** 2)[None, :] - torch.diag(1.5 * y**2)
    return jac


@pytest.mark.parametrize("method", IMPLICIT_METHODS)
def test_fd_and_user_jacobian_agree_with_autograd(method):
    W = torch.tensor([[-2.0, 1.0, 0.3], [0.5, -1.5, 0.2], [0.1, -0.4, -3.0]], dtype=F64)
    b = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
    f, y0 = _param_rhs(W, b), torch.tensor([0.4, -0.3, 0.8], dtype=F64)
    ref = integrate(f, method, y0, 0.0, 1.0, 5)[0]
    for jac in ("fd", _jac_exact(W, b)):
        y = integrate(f, method, y0, 0.0, 1.0, 5, opts={"jacobian": jac})[0]
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_user_jacobian_gradients_and_wrong_shape():
    W = torch.tensor([[-2.0, 1.0], [0.5, -1.5]], dtype=F64, requires_grad=True)
    b = torch.tensor([0.3, -0.2], dtype=F64)
    y0 = torch.tensor([0.4, -0.3], dtype=F64, requires_grad=True)
    opts = {"jacobian": lambda t, y: _jac_exact(W.detach(), b)(t, y)}
    y = integrate(_param_rhs(W, b), "radauIIA5", y0, 0.0, 1.0, 4, opts=opts)[0]
    g = torch.autograd.grad(y.sum(), (y0, W))
    y = integrate(_param_rhs(W, b), "radauIIA5", y0, 0.0, 1.0, 4)[0]
    for g1, g2 in zip(g, torch.autograd.grad(y.sum(), (y0, W)), strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError, match="jacobian"):
        integrate(_param_rhs(W, b), "gl4", y0, 0.0, 1.0, 1,
                  opts={"jacobian": lambda t, y: torch.eye(3, dtype=F64)})


class _NoVmapCube(torch.autograd.Function):
    """y**3 with a backward that vmap cannot batch (goes through numpy)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.from_numpy(g.numpy() * 3 * x.detach().numpy() ** 2)


def test_jacobian_fallback_when_vmap_fails():
    y0 = torch.tensor([0.5, -0.2, 0.1], dtype=F64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap's own performance warnings
        y = integrate(lambda t, y: -_NoVmapCube.apply(y) - y, "radauIIA3", y0, 0.0, 1.0, 4)[0]
    ref = integrate(lambda t, y: -(y**3) - y, "radauIIA3", y0, 0.0, 1.0, 4)[0]
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [{"max_iters": 0}, {"max_iters": -3}, {"max_iters": 2.5},
                                 {"max_iters": True}, {"max_iters": "10"},
                                 {"newton_tol": 0.0}, {"newton_tol": -1e-3},
                                 {"newton_tol": float("nan")}, {"newton_tol": float("inf")},
                                 {"newton_tol": "1e-3"}, {"jacobian": "numeric"},
                                 {"jacobian": 3}])
def test_check_options_rejects(bad):
    (name,) = bad
    with pytest.raises(InputError, match=name):
        check_implicit_options("radauIIA5", bad)


def test_check_options_accepts_and_unknown_method():
    check_implicit_options("gl6", {})
    check_implicit_options("sdirk2", {"max_iters": np.int64(5), "newton_tol": 1e-6,
                                      "jacobian": "fd", "step_size": 0.1})
    check_implicit_options("trbdf2", {"jacobian": lambda t, y: None, "max_iters": None})
    with pytest.raises(InputError, match="implicit method"):
        check_implicit_options("dopri5", {})


def test_nonconvergence_warns_and_returns_last_iterate():
    y0 = torch.tensor([0.1, 0.6], dtype=F64)
    with pytest.warns(ConvergenceWarning, match=r"max_iters=1.*t0=0.*h=0.5.*step_size"):
        y, _ = integrate(_logistic, "radauIIA5", y0, 0.0, 0.5, 1, opts={"max_iters": 1})
    assert torch.isfinite(y).all()
    with pytest.warns(ConvergenceWarning, match="NaN"):  # f turns NaN away from y0
        y, _ = integrate(lambda t, y: torch.where(y > 0.105, torch.nan, -y * y), "sdirk2",
                         torch.tensor([0.1], dtype=F64), 0.0, -1.0, 1)
    assert not torch.isfinite(y).all()  # not silent: the caller sees the NaN too


def test_diverging_newton_warns():
    # y' = y^2 from 1 blows up at t = 1; h = 2 has no implicit-Euler root (1 = y - 2 y^2)
    with pytest.warns(ConvergenceWarning, match="diverged|NaN|converge"):
        integrate(lambda t, y: y * y, "implicit_euler", torch.tensor([1.0], dtype=F64),
                  0.0, 2.0, 1)


@pytest.mark.parametrize("method", ["radauIIA5", "trbdf2", "gl4"])
def test_float32(method):
    # float32: eps ~ 1.2e-7, so Newton stops on the roundoff floor rather than newton_tol with
    # odeint's default rtol/atol, and the result carries ~1e-6 relative roundoff
    A32, y32 = A_LIN.float(), Y0_LIN.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        y, _ = integrate(lambda t, y: A32 @ y, method, y32, 0.0, 1.0, 20, rtol=1e-7, atol=1e-9)
    ref, _ = integrate(lambda t, y: A_LIN @ y, method, Y0_LIN, 0.0, 1.0, 20)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", IMPLICIT_METHODS)
def test_perturb_avoids_step_ends(method):
    for h in (0.25, -0.25):
        fc, t0 = Counted(lambda t, y: 0.2 * A_LIN @ torch.sin(y) + torch.cos(t)), 0.5
        implicit_step(fc, method, t0, h, Y0_LIN, None, {}, 1e-8, 1e-8, perturb=True)
        assert fc.ts and t0 not in fc.ts and t0 + h not in fc.ts
        assert all(min(t0, t0 + h) < t < max(t0, t0 + h) for t in fc.ts)


def test_complex_state():
    # y' = (i w - k) y: solved as the real system of twice the size
    lam = torch.tensor([2j - 0.5, -1j - 3.0], dtype=torch.complex128)
    y0 = torch.tensor([1.0 + 0.5j, -0.3j], dtype=torch.complex128)
    for method in ("radauIIA5", "gl6", "sdirk2"):
        opts_list = [{}, {"jacobian": lambda t, y: torch.diag(lam)}]
        for opts in opts_list:
            y, _ = integrate(lambda t, y: lam * y, method, y0, 0.0, 1.0, 40, opts=opts)
            assert y.dtype == torch.complex128
            torch.testing.assert_close(y, y0 * torch.exp(lam), rtol=1e-4, atol=1e-4)


def test_complex_gradcheck():
    lam = torch.tensor([2j - 0.5, -1j - 3.0], dtype=torch.complex128)

    def run(y0, w):
        return integrate(lambda t, y: lam * y + w * torch.tanh(y.real), "radauIIA3", y0, 0.0,
                         0.5, 2)[0]

    y0 = torch.tensor([1.0 + 0.5j, -0.3j], dtype=torch.complex128, requires_grad=True)
    w = torch.tensor([0.5, -0.2], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, w), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_grad_mode_costs_one_jacobian_per_stage_only_when_needed():
    y0 = torch.tensor([0.4, -0.3, 0.8], dtype=F64)
    W = torch.tensor([[-2.0, 1.0, 0.3], [0.5, -1.5, 0.2], [0.1, -0.4, -3.0]], dtype=F64)
    b = torch.zeros(3, dtype=F64)
    with torch.no_grad():
        _, fc0 = integrate(_param_rhs(W, b), "radauIIA5", y0, 0.0, 1.0, 4, pass_f0=True)
    _, fc1 = integrate(_param_rhs(W, b), "radauIIA5", y0, 0.0, 1.0, 4, pass_f0=True)
    assert len(fc1.ts) == len(fc0.ts)  # grad mode, nothing requires grad: no extra work
    y, fc2 = integrate(_param_rhs(W, b), "radauIIA5", y0.requires_grad_(), 0.0, 1.0, 4,
                       pass_f0=True)
    assert y.requires_grad and len(fc2.ts) == len(fc0.ts) + 4 * 3


def test_large_state_and_tolerance_tensors():
    # 1-D diffusion, n = 200 (stiff: |lambda| up to 4 (n+1)^2 ~ 1.6e5), radauIIA5 and trbdf2
    n = 200
    L = (torch.diag(torch.full((n,), -2.0)) + torch.diag(torch.ones(n - 1), 1)
         + torch.diag(torch.ones(n - 1), -1)).double() * (n + 1) ** 2 * 1e-2
    x = torch.linspace(0, 1, n + 2, dtype=F64)[1:-1]
    y0 = torch.sin(math.pi * x) + 0.3 * torch.sin(7 * math.pi * x)
    exact = torch.linalg.matrix_exp(L * 0.5) @ y0
    atol = torch.full((n,), 1e-10, dtype=F64)
    for method, tol in (("radauIIA5", 1e-6), ("trbdf2", 5e-4)):
        with torch.no_grad():
            y, fc = integrate(lambda t, y: L @ y, method, y0, 0.0, 0.5, 10, rtol=1e-10,
                              atol=atol)
        assert float((y - exact).abs().max()) < tol, method
        assert len(fc.ts) <= 10 * 4  # still one Newton iteration: linear problem


def test_inference_mode_and_batched_grad_free_path():
    with torch.inference_mode():
        y, _ = integrate(_logistic, "gl4", torch.tensor([0.2], dtype=F64), 0.0, 1.0, 5)
    exact = 1 / (1 + 4 * math.exp(-3.0))
    assert abs(float(y) - exact) < 1e-5
