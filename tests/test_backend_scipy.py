"""The SciPy backend against independent references: SciPy's own solve_ivp at tight
tolerance, closed forms, finite differences and gradcheck."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pydiffbridge as pdb
from pydiffbridge.backends.base import get_backend
from pydiffbridge.errors import (
    MaxStepsExceededError,
    SolverError,
    UnknownMethodError,
    UnknownOptionError,
)
from pydiffbridge.solution import Status

F64 = torch.float64


# Lotka-Volterra: nonlinear, non-stiff
def lv_np(t, y):
    return [1.5 * y[0] - y[0] * y[1], y[0] * y[1] - 3.0 * y[1]]


def lv_torch(t, y):
    return torch.stack([1.5 * y[0] - y[0] * y[1], y[0] * y[1] - 3.0 * y[1]])


T_OUT = np.linspace(0.0, 4.0, 9)
Y0 = [1.0, 1.0]


@pytest.fixture(scope="module")
def lv_reference():
    ref = solve_ivp(lv_np, (0.0, 4.0), Y0, method="DOP853", t_eval=T_OUT, rtol=1e-12,
                    atol=1e-14)
    return torch.tensor(ref.y.T)


@pytest.mark.parametrize("backend,method", [
    ("scipy", "RK45"), ("scipy", "DOP853"), ("scipy", "Radau"), ("scipy", "BDF"),
    ("scipy", "LSODA"), ("scipy", "RK23"), ("scipy", "dopri5"), ("scipy", "dopri8"),
    ("torch", "dopri5"), ("torch", "tsit5"), ("torch", "bosh3"), ("torch", "dopri8"),
])
def test_agrees_with_dop853_reference(backend, method, lv_reference):
    rtol = 1e-7 if method not in ("RK23", "bosh3") else 1e-6
    ys = pdb.odeint(lv_torch, torch.tensor(Y0, dtype=F64), torch.tensor(T_OUT), rtol=rtol,
                    atol=rtol * 1e-2, method=method, backend=backend)
    err = (ys - lv_reference).abs().max().item()
    assert err < 300 * rtol, f"{backend}/{method}: max error {err:.3g}"


def test_method_names_map_across_engines():
    b = get_backend("scipy")
    assert b.resolve_method(None) == "RK45"
    assert [b.resolve_method(m) for m in ("dopri5", "DP5", "bosh3", "BS3", "dopri8", "DP8",
                                          "lsoda", "radau", "RadauIIA5", "FBDF")] == \
        ["RK45", "RK45", "RK23", "RK23", "DOP853", "DOP853", "LSODA", "Radau", "Radau", "BDF"]
    with pytest.raises(UnknownMethodError, match="backend='julia'.*Tsit5"):
        b.resolve_method("tsit5")
    with pytest.raises(UnknownMethodError, match="RK45, RK23, DOP853, Radau, BDF, LSODA"):
        b.resolve_method("not_a_method")
    with pytest.raises(UnknownMethodError, match="backend='scipy'"):
        get_backend("torch").resolve_method("Radau")


def test_scipy_solver_spelling_on_scipy_backend():
    t = torch.linspace(0, 1, 3, dtype=F64)
    sol = pdb.solve(lambda t, y: -y, torch.ones(2, dtype=F64), t, backend="scipy",
                    method="scipy_solver", options={"solver": "LSODA"}, rtol=1e-10, atol=1e-12)
    assert sol.method == "LSODA"
    assert torch.allclose(sol.ys[:, 0], torch.exp(-t), atol=1e-8)


class _Decay(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))

    def forward(self, t, y):
        return -self.w * y


def test_torchdiffeq_scipy_solver_spelling_with_gradients():
    func = _Decay()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = pdb.odeint(func, torch.ones(1, dtype=F64), t, method="scipy_solver",
                    options={"solver": "LSODA"}, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(ys[-1, 0], func.w)
    assert abs(float(g) + math.exp(-0.7)) < 1e-6  # d/dw e^{-w} = -e^{-w}
    # a plain function's captured tensors cannot be found: say so instead of a silent zero
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    with pytest.warns(pdb.errors.GradientWarning, match="adjoint_params"):
        pdb.odeint(lambda t, y: -w * y, torch.ones(1, dtype=F64), t, method="scipy_solver",
                   options={"solver": "LSODA"})


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A = torch.nn.Parameter(0.5 * torch.randn(3, 3, dtype=F64, generator=g))
        self.b = torch.nn.Parameter(0.1 * torch.randn(3, dtype=F64, generator=g))

    def forward(self, t, y):
        return torch.tanh(y @ self.A.T + self.b)


@pytest.mark.parametrize("method", ["DOP853"])
def test_gradcheck_adjoint_on_scipy(method):
    f = Linear()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    y0 = torch.tensor([0.3, -0.2, 0.5], dtype=F64, requires_grad=True)

    def run(y, A):
        return pdb.odeint_adjoint(f, y, t, backend="scipy", method=method, rtol=1e-11,
                                  atol=1e-13, adjoint_params=(A,))

    A = f.A
    assert torch.autograd.gradcheck(run, (y0, A), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["RK45", "DOP853", "LSODA"])
def test_adjoint_gradients_match_torch_direct(method):
    f = Linear()
    t = torch.linspace(0, 1.5, 4, dtype=F64)
    y0 = torch.tensor([0.3, -0.2, 0.5], dtype=F64, requires_grad=True)
    params = [y0, f.A, f.b]
    ref = torch.autograd.grad(pdb.odeint(f, y0, t, rtol=1e-11, atol=1e-13).pow(2).sum(), params)
    ys = pdb.odeint_adjoint(f, y0, t, backend="scipy", method=method, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(ys.pow(2).sum(), params)
    for r, g in zip(ref, got, strict=True):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)


# Robertson's stiff chemical kinetics: y1 + y2 + y3 = 1 for all t (a closed-form invariant)
def rober_np(t, y, k=(0.04, 3e7, 1e4)):
    y1, y2, y3 = y
    return [-k[0] * y1 + k[2] * y2 * y3, k[0] * y1 - k[1] * y2 * y2 - k[2] * y2 * y3,
            k[1] * y2 * y2]


class Robertson(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logk = torch.nn.Parameter(torch.log(torch.tensor([0.04, 3e7, 1e4], dtype=F64)))

    def forward(self, t, y):
        k1, k2, k3 = self.logk.exp()
        y1, y2, y3 = y
        return torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k2 * y2 * y2 - k3 * y2 * y3,
                            k2 * y2 * y2])


@pytest.mark.parametrize("method", ["Radau", "BDF"])
def test_stiff_robertson_forward(method):
    t = torch.tensor([0.0, 1.0, 10.0], dtype=F64)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    with torch.no_grad():
        sol = pdb.solve(Robertson(), y0, t, backend="scipy", method=method, rtol=1e-7,
                        atol=1e-12)
    assert sol.success
    ref = solve_ivp(rober_np, (0.0, 10.0), [1.0, 0.0, 0.0], method="Radau", t_eval=t.numpy(),
                    rtol=1e-12, atol=1e-16)
    assert np.allclose(sol.ys.numpy(), ref.y.T, rtol=1e-4, atol=1e-10)
    assert torch.allclose(sol.ys.sum(1), torch.ones(3, dtype=F64), atol=1e-8)
    # an explicit method is stuck on the same problem: far more steps than the implicit one
    with torch.no_grad():
        explicit = pdb.solve(Robertson(), y0, t, backend="scipy", method="RK45", rtol=1e-7,
                             atol=1e-12, options={"max_num_steps": 2 * sol.stats.steps})
    assert explicit.status == Status.MAX_STEPS


class VanDerPol(torch.nn.Module):
    def __init__(self, mu: float):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=F64))

    def forward(self, t, y):
        x, v = y
        return torch.stack([v, self.mu * (1 - x * x) * v - x])


@pytest.mark.slow
def test_stiff_van_der_pol_gradient_bdf():
    # Back-solving the state of a strongly contracting problem is unstable, so the stiff
    # gradient goes through gradient="checkpointed" (short back-solves between checkpoints).
    # Reference: direct backprop through the torch solver at tight tolerance.
    f = VanDerPol(10.0)
    y0 = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ref = torch.autograd.grad(pdb.odeint(f, y0, t, rtol=1e-10, atol=1e-12)[-1].sum(),
                              (y0, f.mu))
    sol = pdb.solve(f, y0, t, backend="scipy", method="BDF", rtol=1e-8, atol=1e-10,
                    gradient="checkpointed", adjoint_options={"checkpoints": 32})
    got = torch.autograd.grad(sol.ys[-1].sum(), (y0, f.mu))
    for r, g in zip(ref, got, strict=True):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)


def test_stats_count_every_rhs_call():
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return lv_torch(t, y)

    sol = pdb.solve(f, torch.tensor(Y0, dtype=F64), torch.tensor(T_OUT), backend="scipy",
                    method="RK45", rtol=1e-6, atol=1e-8)
    assert sol.stats.nfe == calls[0]
    assert sol.stats.steps == sol.stats.accepted + sol.stats.rejected
    # RK45 (FSAL): 6 evaluations per attempted step, plus f(t0) and one for the first step
    assert sol.stats.nfe == 6 * sol.stats.steps + 2


def test_decreasing_time_matches_closed_form():
    t = torch.linspace(2.0, 0.0, 5, dtype=F64)
    ys = pdb.odeint(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0],
                    dtype=F64), t, backend="scipy", method="DOP853", rtol=1e-11, atol=1e-13)
    assert torch.allclose(ys[:, 0], torch.cos(t - 2.0), atol=1e-9)


def test_max_num_steps_status_and_exception():
    t = torch.linspace(0, 10, 3, dtype=F64)
    y0 = torch.tensor(Y0, dtype=F64)
    sol = pdb.solve(lv_torch, y0, t, backend="scipy", options={"max_num_steps": 4})
    assert sol.status == Status.MAX_STEPS and "max_num_steps=4" in sol.message
    assert sol.stats.steps == 4
    assert torch.isnan(sol.ys[-1]).all() and torch.equal(sol.ys[0], y0)
    with pytest.raises(MaxStepsExceededError, match="max_num_steps"):
        pdb.odeint(lv_torch, y0, t, backend="scipy", options={"max_num_steps": 4})


def test_blow_up_maps_to_a_failure_status():
    # y' = y^2, y(0) = 1 blows up at t = 1
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    sol = pdb.solve(lambda t, y: y * y, torch.ones(1, dtype=F64), t, backend="scipy",
                    rtol=1e-8, atol=1e-10)
    assert sol.status in (Status.STEP_UNDERFLOW, Status.NONFINITE)
    assert abs(float(sol.ys[1, 0]) - 2.0) < 1e-6  # y(0.5) = 1 / (1 - 0.5)
    with pytest.raises(SolverError):
        pdb.odeint(lambda t, y: y * y, torch.ones(1, dtype=F64), t, backend="scipy")


def test_nan_rhs_maps_to_nonfinite():
    def f(t, y):
        return y * (float("nan") if float(t) > 0.3 else 1.0)

    sol = pdb.solve(f, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                    backend="scipy")
    assert sol.status == Status.NONFINITE


def test_jump_t_restarts_at_discontinuities():
    # y' = 1 for t < 1.3, 0 after: y(2) = 1.3
    def f(t, y):
        return torch.ones_like(y) * (t < 1.3).to(y.dtype)

    t = torch.tensor([0.0, 2.0], dtype=F64)
    ys = pdb.odeint(f, torch.zeros(1, dtype=F64), t, backend="scipy",
                    options={"jump_t": [1.3]})
    assert abs(float(ys[-1, 0]) - 1.3) < 1e-12


def test_terminal_event_time():
    def f(t, y):
        return torch.stack([y[1], -y[0]])

    y0 = torch.tensor([0.0, 1.0], dtype=F64)  # y = sin t: first zero of y - 0.5 at pi/6
    event_t, ys = pdb.odeint_event(f, y0, torch.tensor(0.0, dtype=F64),
                                   event_fn=lambda t, y: y[0] - 0.5, backend="scipy",
                                   method="DOP853", rtol=1e-11, atol=1e-13)
    assert abs(float(event_t) - math.pi / 6) < 1e-9
    assert abs(float(ys[-1, 0]) - 0.5) < 1e-9
    sol = pdb.solve(f, y0, torch.tensor([0.0, 1.0], dtype=F64), backend="scipy",
                    event_fn=lambda t, y: y[0] - 5.0)
    assert sol.status == Status.FAILED and "never crossed" in sol.message


def test_options_pass_through_and_validation():
    y0 = torch.tensor(Y0, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    sol = pdb.solve(lv_torch, y0, t, backend="scipy", options={"max_step": 0.01})
    assert sol.stats.accepted >= 200
    sol = pdb.solve(lv_torch, y0, t, backend="scipy", method="LSODA",
                    options={"min_step": 1e-6, "first_step": 1e-3})
    assert sol.success
    with pytest.raises(UnknownOptionError, match="only for LSODA"):
        pdb.solve(lv_torch, y0, t, backend="scipy", method="RK45", options={"min_step": 1e-6})
    with pytest.raises(UnknownOptionError, match="bogus"):
        pdb.solve(lv_torch, y0, t, backend="scipy", options={"bogus": 1})


def test_per_component_tolerances_and_float32():
    y0 = torch.tensor(Y0, dtype=torch.float32)
    t = torch.tensor(T_OUT, dtype=torch.float32)
    ys = pdb.odeint(lv_torch, y0, t, backend="scipy", method="DOP853", rtol=1e-8,
                    atol=torch.tensor([1e-9, 1e-10]))
    assert ys.dtype == torch.float32
    ref = solve_ivp(lv_np, (0.0, 4.0), Y0, method="DOP853", t_eval=T_OUT, rtol=1e-12,
                    atol=1e-14)
    assert np.allclose(ys.numpy(), ref.y.T, atol=1e-5)


class Oscillator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))

    def forward(self, t, y):
        return torch.stack([y[1], -self.w * self.w * y[0]])


def test_event_time_gradient_through_the_bridge():
    # y = sin(w t) / w reaches 0.5 at t* = asin(w / 2) / w; dt*/dw in closed form at w = 1
    f = Oscillator()
    event_t, _ = pdb.odeint_event(f, torch.tensor([0.0, 1.0], dtype=F64),
                                  torch.tensor(0.0, dtype=F64),
                                  event_fn=lambda t, y: y[0] - 0.5, backend="scipy",
                                  method="DOP853", rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(event_t, f.w)
    assert abs(float(event_t) - math.asin(0.5)) < 1e-8
    assert abs(float(g) - (0.5 / math.sqrt(0.75) - math.asin(0.5))) < 1e-6


def test_boundary_benchmark_reports_consistent_rows():
    from pydiffbridge.bench.boundary import make_problem, measure, to_markdown

    res = measure(["scipy", "torch"], methods={"scipy": ["RK45"], "torch": ["dopri5"]},
                  dim=3, hidden=4, t_end=1.0, repeats=1)
    assert [(r["backend"], r["method"]) for r in res["rows"]] == [("scipy", "RK45"),
                                                                   ("torch", "dopri5")]
    func, y0 = make_problem(3, 4)
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    with torch.no_grad():
        ref = pdb.solve(func, y0, t, backend="scipy", method="RK45", rtol=1e-6, atol=1e-8)
    row = res["rows"][0]
    assert row["nfe"] == ref.stats.nfe and row["steps"] == ref.stats.steps
    per_call = 1e-6 * res["func_call_us"]
    assert row["overhead_per_call_us"] == pytest.approx(
        1e6 * (row["time_s"] - row["nfe"] * per_call) / row["nfe"])
    assert "| scipy | RK45 | SUCCESS |" in to_markdown(res)


def test_scipy_internal_nonfinite_error_becomes_a_status():
    # BDF's linear algebra raises its own ValueError on Inf: it must come back as NONFINITE
    from pydiffbridge.solution import Status

    def f(t, y):
        return torch.where(t < 0.5, -y, torch.full_like(y, math.inf))

    sol = pdb.solve(f, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                    backend="scipy", method="BDF")
    assert sol.status == Status.NONFINITE and "t=" in sol.message
    with pytest.raises(pdb.errors.NonFiniteError):
        pdb.odeint(f, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                   backend="scipy", method="BDF")
