"""Native torch solvers: convergence order and agreement with SciPy DOP853 at rtol 1e-12."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from pydiffbridge import odeint, solve

D = torch.float64
ADAPTIVE = ["dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"]
ORDERS = {"dopri5": 5, "tsit5": 5, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 2, "dopri8": 8,
          "euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4, "explicit_adams": 4,
          "implicit_adams": 4, "fixed_adams": 4}


def _exp_sin(t, y):
    # y' = cos(t) * y, y(0) = 1  ->  y = exp(sin t)
    return torch.cos(t) * y


def _forced(t, y):
    # y' = -y + t^4 sin(5t): a forcing whose high derivatives keep the leading error term
    # dominant (on very smooth problems tsit5 is pre-asymptotically better than order 5)
    return -y + t**4 * torch.sin(5 * t)


def _forced_exact(T):
    r = solve_ivp(lambda t, y: -y + t**4 * np.sin(5 * t), (0, T), [1.0], method="DOP853",
                  rtol=1e-13, atol=1e-15)
    return float(r.y[0, -1])


def _slope(hs, errs):
    return np.polyfit(np.log(hs), np.log(errs), 1)[0]


@pytest.mark.parametrize("method", list(ORDERS))
def test_convergence_order(method):
    order = ORDERS[method]
    T = 2.0
    ns = {8: [4, 6, 8, 12], 5: [16, 24, 32, 48], 4: [16, 24, 32, 48]}.get(order, [32, 64, 128, 256])
    if "adams" in method:  # multistep: its asymptotic range starts at smaller steps
        ns = [64, 96, 128, 192]
    y0 = torch.tensor([1.0], dtype=D)
    t = torch.tensor([0.0, T], dtype=D)
    rhs, exact = (_exp_sin, math.exp(math.sin(T))) if order == 8 else (_forced, _forced_exact(T))
    hs, errs = [], []
    for n in ns:
        h = T / n
        if method in ADAPTIVE:  # force a fixed step: min_step = max_step = h is always accepted
            opts = {"first_step": h, "min_step": h, "max_step": h}
        else:
            opts = {"step_size": h}
        y = odeint(rhs, y0, t, method=method, options=opts, rtol=1e-3, atol=1e-3)
        hs.append(h)
        errs.append(abs(float(y[-1, 0]) - exact))
    slope = _slope(hs, errs)
    assert abs(slope - order) <= 0.3, f"{method}: observed order {slope:.2f}, expected {order}"


def _vdp(mu):
    def f(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    def fn(t, y):
        return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]

    return f, fn, [2.0, 0.0], (0.0, 6.0)


def _linear():
    A = np.array([[-0.5, 2.0, 0.0], [-2.0, -0.5, 0.3], [0.0, -0.3, -0.1]])
    At = torch.tensor(A, dtype=D)
    return (lambda t, y: At @ y), (lambda t, y: A @ y), [1.0, -0.5, 0.25], (0.0, 5.0)


def _timedep():
    # non-autonomous: y' = -t y + sin(3t)
    return ((lambda t, y: -t * y + torch.sin(3 * t)), (lambda t, y: -t * y + np.sin(3 * t)),
            [1.0], (0.0, 4.0))


PROBLEMS = {"linear": _linear, "vdp1": lambda: _vdp(1.0), "timedep": _timedep}
TOLS = {"dopri5": 1e-8, "tsit5": 1e-8, "dopri8": 1e-9, "bosh3": 1e-6, "fehlberg2": 1e-5,
        "adaptive_heun": 1e-5}


def _ref(fn, y0, span, ts):
    r = solve_ivp(fn, span, y0, method="DOP853", rtol=1e-12, atol=1e-14, t_eval=ts)
    assert r.success
    return r.y.T


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", ADAPTIVE)
def test_agrees_with_scipy_dop853(problem, method):
    f, fn, y0, span = PROBLEMS[problem]()
    ts = np.linspace(span[0], span[1], 13)
    tol = TOLS[method]
    sol = solve(f, torch.tensor(y0, dtype=D), torch.tensor(ts, dtype=D), method=method,
                rtol=tol, atol=tol)
    assert sol.success, sol.message
    err = np.abs(sol.ys.numpy() - _ref(fn, y0, span, ts)).max()
    scale = max(1.0, np.abs(_ref(fn, y0, span, ts)).max())
    # global error of a locally controlled solver: a modest multiple of the tolerance.
    # fehlberg2 controls with the error of its first-order companion, whose error constant is
    # ~1/512 of the second-order solution's: its global error runs ~500x the tolerance (the
    # same in torchdiffeq); it still scales with the tolerance (test_tolerance_proportionality)
    mult = 1500 if method == "fehlberg2" else 200
    assert err <= mult * tol * scale, f"{method} on {problem}: max error {err:.2e} (tol {tol:g})"
    assert sol.stats.nfe > 0 and sol.stats.steps == sol.stats.accepted + sol.stats.rejected


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "rk4"])
def test_reverse_time(method):
    f, fn, y0, span = _vdp(1.0)
    ts = np.linspace(span[1], span[0], 7)
    y_end = _ref(fn, y0, span, [span[1]])[0]
    opts = {"step_size": 0.01} if method == "rk4" else None
    ys = odeint(f, torch.tensor(y_end, dtype=D), torch.tensor(ts, dtype=D), method=method,
                rtol=1e-9, atol=1e-11, options=opts)
    ref = solve_ivp(fn, (span[1], span[0]), y_end, method="DOP853", rtol=1e-12, atol=1e-14,
                    t_eval=ts).y.T
    tol = 1e-5 if method == "rk4" else 1e-6
    assert np.abs(ys.numpy() - ref).max() < tol
    assert np.abs(ys[-1].numpy() - np.array(y0)).max() < tol


def test_dense_output_matches_step_accuracy():
    # many output times inside few steps: the interpolant must keep the step's accuracy
    f, fn, y0, span = _vdp(1.0)
    ts = np.linspace(span[0], span[1], 400)
    for method in ["dopri5", "tsit5"]:
        ys = odeint(f, torch.tensor(y0, dtype=D), torch.tensor(ts, dtype=D), method=method,
                    rtol=1e-9, atol=1e-11)
        err = np.abs(ys.numpy() - _ref(fn, y0, span, ts)).max()
        assert err < 5e-7, f"{method}: dense output error {err:.2e}"


def test_tuple_state_matches_flat():
    f, fn, y0, span = _vdp(1.0)
    t = torch.linspace(0, 6, 9, dtype=D)

    def ft(t, s):
        x, v = s
        return v, (1 - x**2) * v - x

    xs, vs = odeint(ft, (torch.tensor(2.0, dtype=D), torch.tensor(0.0, dtype=D)), t,
                    rtol=1e-10, atol=1e-12)
    ref = _ref(fn, y0, span, t.numpy())
    assert xs.shape == (9,) and vs.shape == (9,)
    assert np.abs(xs.numpy() - ref[:, 0]).max() < 1e-7
    assert np.abs(vs.numpy() - ref[:, 1]).max() < 1e-7


def test_per_component_tolerances():
    # two uncoupled oscillators; a tight tolerance on one component only must make that one
    # accurate and cost more steps than the loose uniform tolerance
    def f(t, y):
        return torch.stack([y[1], -y[0], y[3], -4 * y[2]])

    y0 = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=D)
    t = torch.tensor([0.0, 10.0], dtype=D)
    loose = solve(f, y0, t, rtol=1e-3, atol=1e-3)
    rtol = torch.tensor([1e-10, 1e-10, 1e-3, 1e-3], dtype=D)
    mixed = solve(f, y0, t, rtol=rtol, atol=rtol)
    err_tight = abs(float(mixed.ys[-1, 0]) - math.cos(10.0))
    err_loose = abs(float(loose.ys[-1, 0]) - math.cos(10.0))
    assert err_tight < 1e-7 < err_loose
    assert mixed.stats.nfe > 3 * loose.stats.nfe


def test_jump_t_discontinuity():
    # y' = 1 for t < 1, -2 for t >= 1: y(3) = 1 - 4 = -3, y piecewise linear
    def f(t, y):
        return torch.where(t < 1.0, torch.ones_like(y), -2 * torch.ones_like(y))

    y0 = torch.zeros(1, dtype=D)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0], dtype=D)
    with_jump = solve(f, y0, t, rtol=1e-8, atol=1e-8, options={"jump_t": [1.0]})
    without = solve(f, y0, t, rtol=1e-8, atol=1e-8)
    exact = torch.tensor([0.0, 0.5, 1.0, -1.0, -3.0], dtype=D)
    assert (with_jump.ys[:, 0] - exact).abs().max() < 1e-10
    assert with_jump.stats.rejected < without.stats.rejected
    assert with_jump.stats.nfe < without.stats.nfe


def test_step_t_lands_on_times():
    f, fn, y0, span = _vdp(1.0)
    seen = []

    def g(t, y):
        seen.append(float(t))
        return f(t, y)

    odeint(g, torch.tensor(y0, dtype=D), torch.tensor(span, dtype=D),
           options={"step_t": [1.2345, 3.21]})
    assert 1.2345 in seen and 3.21 in seen


def test_float32_and_complex():
    t = torch.linspace(0, 2, 5)
    y = odeint(lambda t, y: -y, torch.ones(3), t)
    assert y.dtype == torch.float32
    assert torch.allclose(y[:, 0], torch.exp(-t), atol=1e-6)
    # complex: y' = i y  ->  y = exp(i t)
    yc = odeint(lambda t, y: 1j * y, torch.ones(1, dtype=torch.complex128),
                t.double(), rtol=1e-10, atol=1e-12)
    assert yc.dtype == torch.complex128
    assert (yc[:, 0] - torch.exp(1j * t.double())).abs().max() < 1e-8


def test_pi_controller_and_custom_norm():
    f, fn, y0, span = _vdp(1.0)
    ref = _ref(fn, y0, span, [span[1]])[0]
    calls = []

    def norm(x):
        calls.append(1)
        return x.abs().max()

    sol = solve(f, torch.tensor(y0, dtype=D), torch.tensor(span, dtype=D), rtol=1e-8, atol=1e-8,
                options={"pcoeff": 0.2, "icoeff": 0.8, "norm": norm})
    assert calls and np.abs(sol.ys[-1].numpy() - ref).max() < 1e-5


def test_direct_backprop_closed_form():
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    y0 = torch.tensor([2.0], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.5], dtype=D)
    y = odeint(lambda t, y: -k * y, y0, t, method="tsit5", rtol=1e-10, atol=1e-12)
    y[-1, 0].backward()
    assert abs(float(k.grad) - (-1.5 * 2 * math.exp(-1.05))) < 1e-8
    assert abs(float(y0.grad) - math.exp(-1.05)) < 1e-8


@pytest.mark.parametrize("method", ADAPTIVE)
def test_tolerance_proportionality(method):
    # tightening the tolerance 100x must shrink the global error by a large factor
    f, fn, y0, span = _linear()
    ts = np.linspace(span[0], span[1], 5)
    ref = _ref(fn, y0, span, ts)
    tol = TOLS[method] * 100
    errs = []
    for tl in (tol, tol / 100):
        ys = odeint(f, torch.tensor(y0, dtype=D), torch.tensor(ts, dtype=D), method=method,
                    rtol=tl, atol=tl)
        errs.append(np.abs(ys.numpy() - ref).max())
    assert errs[1] < errs[0] / 20, f"{method}: errors {errs}"


@pytest.mark.parametrize("method", ADAPTIVE)
def test_no_grad_path_matches_grad_path(method):
    # without autograd the loop reuses its stage buffer; results must be identical
    f, fn, y0, span = _vdp(1.0)
    t = torch.linspace(*span, 7, dtype=D)
    y0 = torch.tensor(y0, dtype=D)
    a = solve(f, y0, t, method=method, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        b = solve(f, y0, t, method=method, rtol=1e-6, atol=1e-6)
    assert a.stats.rejected > 0
    assert a.stats.as_dict() == b.stats.as_dict()
    assert torch.equal(a.ys, b.ys)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_direct_backprop_time_gradients(method):
    # gradcheck w.r.t. every output time, the first included, on a non-autonomous problem;
    # output times that coincide with step ends (dopri8 lands on them) included
    def f(t, y):
        return torch.stack([y[1], -y[0] + torch.sin(2 * t)])

    y0 = torch.tensor([1.0, 0.5], dtype=D)
    t = torch.tensor([0.1, 0.7, 1.6], dtype=D, requires_grad=True)
    tol = 1e-8 if method == "bosh3" else 1e-11
    assert torch.autograd.gradcheck(
        lambda tt: odeint(f, y0, tt, method=method, rtol=tol, atol=tol), (t,), atol=1e-5)


def test_fixed_grid_time_gradients_gradcheck():
    # as torchdiffeq, the grid is built from t, so d/dt flows (closed forms: test_fixed_hooks)
    t = torch.tensor([0.0, 0.45, 1.0], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda tt: odeint(lambda s, y: -y * torch.cos(s), torch.ones(1, dtype=D), tt,
                          method="rk4", options={"step_size": 0.1}), (t,))
