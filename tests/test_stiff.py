"""Tests of the native Rosenbrock solvers (pydiffbridge.solvers.rosenbrock), called directly.

References are independent of our code: SciPy Radau at rtol 1e-11 (values stored below,
computed with scipy.integrate.solve_ivp(..., method="Radau", rtol=1e-11, atol=1e-16)).
"""

import math

import numpy as np
import pytest
import torch

import pydiffbridge
from pydiffbridge.errors import UnknownOptionError
from pydiffbridge.solution import Status
from pydiffbridge.solvers.rosenbrock import STIFF_METHODS, solve_stiff

D = torch.float64
ROB_T = [0, 1e-3, 1e-1, 1e1, 1e3, 1e5]
ROB_REF = [[1.0, 0.0, 0.0],
           [0.9999600015632173, 2.9169034944903387e-05, 1.0829401837942886e-05],
           [0.9960777474424544, 3.580437235042156e-05, 0.0038864481851965376],
           [0.8413699238413334, 1.6233909379886242e-05, 0.1586138422492879],
           [0.3368745306603858, 2.0137023182581414e-06, 0.6631234556372967],
           [0.017865921142300248, 7.27475146851954e-08, 0.9821340061101856]]


def rober(t, y):
    return torch.stack([-0.04 * y[0] + 1e4 * y[1] * y[2],
                        0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2])


def _rel_err(ys, ref, rtol, atol):
    return float(((ys.detach() - ref).abs() / (rtol * ref.abs() + atol)).max())


@pytest.mark.parametrize("method,rtol,bound",
                         [("rodas4", 1e-6, 10.0), ("rosenbrock23", 1e-4, 50.0)])
def test_robertson_against_radau(method, rtol, bound):
    t = torch.tensor(ROB_T, dtype=D)
    atol = rtol * 1e-4
    sol = solve_stiff(rober, torch.tensor([1.0, 0, 0], dtype=D), t, method, rtol, atol, None, {})
    assert sol.status == Status.SUCCESS
    assert _rel_err(sol.ys, torch.tensor(ROB_REF, dtype=D), rtol, atol) < bound
    assert sol.stats.steps == sol.stats.accepted + sol.stats.rejected


def test_far_fewer_steps_than_dopri5():
    t = torch.tensor([0.0, 1e3], dtype=D)
    y0 = torch.tensor([1.0, 0, 0], dtype=D)
    ours = solve_stiff(rober, y0, t, "rodas4", 1e-6, 1e-10, None, {})
    exp = pydiffbridge.solve(rober, y0, t, method="dopri5", rtol=1e-6, atol=1e-10,
                             options={"max_num_steps": 3000})
    assert ours.status == Status.SUCCESS
    assert exp.status == Status.MAX_STEPS  # dopri5 needs more than 3000
    assert ours.stats.steps < 0.1 * 3000


def _prothero(lam):
    def f(t, y):  # exact solution (cos t, sin t); nonlinear coupling, non-autonomous
        return torch.stack([-lam * (y[0] - torch.cos(t)) - torch.sin(t)
                            + (y[1] - torch.sin(t)) ** 2,
                            -2.0 * (y[1] - torch.sin(t)) + torch.cos(t)])
    return f


@pytest.mark.parametrize("method,order", [("rosenbrock23", 2), ("rodas4", 4)])
def test_convergence_order(method, order):
    T, Ns, errs = 1.0, [40, 80, 160], []
    ex = torch.tensor([math.cos(T), math.sin(T)], dtype=D)
    for N in Ns:
        sol = solve_stiff(_prothero(10.0), torch.tensor([1.0, 0.0], dtype=D),
                          torch.tensor([0.0, T], dtype=D), method, 1e-3, 1e-3, None,
                          {"fixed_step": T / N})
        errs.append(float((sol.ys[-1] - ex).abs().max()))
    slope = -np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (errs, slope)


@pytest.mark.parametrize("method", STIFF_METHODS)
def test_jacobian_modes_agree(method):
    t = torch.tensor([0.0, 0.5, 2.0], dtype=D)
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    f = _prothero(50.0)
    base = solve_stiff(f, y0, t, method, 1e-6, 1e-8, None, {})
    fd = solve_stiff(f, y0, t, method, 1e-6, 1e-8, None, {"jacobian": "fd"})

    def jac(tt, y):
        return torch.tensor([[-50.0, 2 * (float(y[1]) - math.sin(float(tt)))], [0.0, -2.0]],
                            dtype=D)
    user = solve_stiff(f, y0, t, method, 1e-6, 1e-8, None, {"jac": jac})
    ex = torch.tensor([[math.cos(v), math.sin(v)] for v in t.tolist()], dtype=D)
    for s in (base, fd, user):
        assert s.success and float((s.ys - ex).abs().max()) < 1e-4


@pytest.mark.parametrize("method", STIFF_METHODS)
def test_gradcheck_y0_and_parameter(method):
    def fn(y0, k):
        def f(t, y):
            return torch.stack([-k[0] * y[0] + k[1] * y[1] ** 2 + torch.sin(t),
                                k[0] * y[0] - 3 * y[1]])
        return solve_stiff(f, y0, torch.tensor([0.0, 0.3, 1.0], dtype=D), method, 1e-4, 1e-6,
                           None, {"fixed_step": 0.125}).ys[1:]
    y0 = torch.tensor([1.0, 0.5], dtype=D, requires_grad=True)
    k = torch.tensor([100.0, 2.0], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (y0, k))


def test_no_graph_without_grad_inputs():
    sol = solve_stiff(rober, torch.tensor([1.0, 0, 0], dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                      "rodas4", 1e-5, 1e-9, None, {})
    assert not sol.ys.requires_grad


def test_float32_loose():
    t = torch.tensor(ROB_T[:4], dtype=torch.float32)
    sol = solve_stiff(rober, torch.tensor([1.0, 0, 0]), t, "rodas4", 1e-3, 1e-7, None, {})
    assert sol.success and sol.ys.dtype == torch.float32
    ref = torch.tensor(ROB_REF[:4], dtype=torch.float32)
    assert _rel_err(sol.ys, ref, 1e-3, 1e-7) < 20


def test_status_not_exceptions():
    y0, t = torch.tensor([1.0, 0, 0], dtype=D), torch.tensor([0.0, 1.0, 1e5], dtype=D)
    s = solve_stiff(rober, y0, t, "rodas4", 1e-6, 1e-10, None, {"max_num_steps": 5})
    assert s.status == Status.MAX_STEPS and torch.isnan(s.ys[-1]).all()

    def bad(tt, y):
        return -y * (float("nan") if float(tt) > 0.5 else 1.0)
    s = solve_stiff(bad, torch.ones(2, dtype=D), torch.tensor([0.0, 0.2, 2.0], dtype=D),
                    "rosenbrock23", 1e-6, 1e-8, None, {})
    assert s.status == Status.NONFINITE and torch.isfinite(s.ys[1]).all()
    assert torch.isnan(s.ys[2]).all()
    with pytest.raises(UnknownOptionError):
        solve_stiff(rober, y0, t, "rodas4", 1e-6, 1e-10, None, {"bogus": 1})
