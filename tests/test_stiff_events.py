"""Terminal events and gradients w.r.t. the output times ``t`` with the adaptive stiff methods
(one implementation: the shared loop of solvers/stiff_loop.py), against closed forms.

Tolerances: a located event time is as accurate as the solution there (``dt* = -dy / y'``,
here ``|y'| = 0.5``); a ``t`` gradient, and the slope in an event-time gradient, is the
*derivative* of the step's dense output, which is one order less accurate than the solution
(third-order cubic Hermite for kvaerno5).  Measured at the tolerances used below (rtol = atol):
event times within 7e-7 (rosenbrock23, the second-order method, at 1e-9; the others within
1e-7), event-time gradients within 6e-6 relative, ``t`` gradients at 1e-10 within 2.5e-6
relative (kvaerno5; the Rosenbrock methods within 3e-7).
"""

import math

import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge.errors import SolverError
from pydiffbridge.solution import Status

D = torch.float64
METHODS = ["rosenbrock23", "rodas4", "rodas5", "kvaerno5", "auto"]

# a stiff linear system (eigenvalues -1 and -1000), not diagonal
A_T = torch.tensor([[-1.0, 0.5], [0.0, -1000.0]], dtype=D)
# the slow component y1 = y1(0) e^{-t} alone, the fast one driven by it
A_EV = torch.tensor([[-1.0, 0.0], [0.3, -1000.0]], dtype=D)


class Linear(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = A

    def forward(self, t, y):
        return self.A @ y


def _linear_t_grads(A, y0, t, w):
    """d/dt_j of L = sum_j w . y(t_j) for y' = A y: w . A y(t_j) for j >= 1, and
    d/dt_0 = -sum_j w . Phi(t_j - t_0) A y0 (y(t_0) = y0 does not move)."""
    t = t.detach()
    ref = torch.zeros_like(t)
    for j in range(1, len(t)):
        phi = torch.linalg.matrix_exp(A * (t[j] - t[0]))
        ref[j] = w @ (A @ (phi @ y0))
        ref[0] -= w @ (phi @ (A @ y0))
    return ref


@pytest.mark.parametrize("method", METHODS)
def test_t_gradients_of_a_stiff_linear_system(method):
    y0 = torch.tensor([1.0, 1.0], dtype=D)
    w = torch.tensor([1.0, -2.0], dtype=D)
    t = torch.tensor([0.1, 0.3, 0.7, 1.2], dtype=D, requires_grad=True)
    ys = pdb.odeint(Linear(A_T), y0, t, method=method, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad((ys @ w).sum(), t)
    ref = _linear_t_grads(A_T, y0, t, w)
    assert torch.allclose(g, ref, rtol=1e-5, atol=0.0), (g - ref) / ref


def _cos_problem(t, y):
    return -1000.0 * (y - torch.cos(t)) - torch.sin(t)


@pytest.mark.parametrize("method", METHODS)
def test_t_gradients_of_a_non_autonomous_problem(method):
    # y = cos t + (y0 - cos t0) e^{-1000 (t - t0)}: y(t_j) depends on t0 through f's time too
    # (d/dt0 = sum_j (sin t0 + 1000 (y0 - cos t0)) e^{-1000 (t_j - t0)}; without the time
    # argument it would be -sum_j f(t_j, y_j), off by sum_j sin t_j)
    y00 = 2.0
    t = torch.tensor([0.3, 0.302, 0.36, 0.45], dtype=D, requires_grad=True)
    ys = pdb.odeint(_cos_problem, torch.tensor([y00], dtype=D), t, method=method, rtol=1e-10,
                    atol=1e-10)
    (g,) = torch.autograd.grad(ys.sum(), t)
    tt = t.detach()
    decay = torch.exp(-1000.0 * (tt - tt[0]))
    yj = torch.cos(tt) + (y00 - torch.cos(tt[0])) * decay
    ref = -1000.0 * (yj - torch.cos(tt)) - torch.sin(tt)
    ref[0] = ((torch.sin(tt[0]) + 1000.0 * (y00 - torch.cos(tt[0]))) * decay[1:]).sum()
    assert torch.allclose(g, ref, rtol=1e-5, atol=0.0), (g - ref) / ref


def test_t_gradients_through_the_adjoint_match_the_closed_form():
    # (the bridge's own dL/dt_j = a_j . f(t_j, y_j); milder stiffness: the adjoint's backward
    # solve of z is unstable on strongly stiff problems and needs tiny steps there)
    A = torch.tensor([[-1.0, 0.5], [0.0, -50.0]], dtype=D)
    y0 = torch.tensor([1.0, 1.0], dtype=D)
    w = torch.tensor([1.0, -2.0], dtype=D)
    t = torch.tensor([0.1, 0.3, 0.5], dtype=D, requires_grad=True)
    ref = _linear_t_grads(A, y0, t, w)
    for method in ("rodas5", "kvaerno5"):
        ys = pdb.odeint_adjoint(Linear(A), y0, t, method=method, adjoint_method=method,
                                rtol=1e-8, atol=1e-8)
        (g,) = torch.autograd.grad((ys @ w).sum(), t)
        assert torch.allclose(g, ref, rtol=1e-5, atol=0.0), (method, (g - ref) / ref)


def _tol(method):
    # rosenbrock23 is second order: its global error at rtol 1e-8 is 1e-6 here, the event
    # time's 2e-6
    return 1e-9 if method == "rosenbrock23" else 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_event_time_of_a_stiff_decay(method):
    y0 = torch.tensor([1.0, 2.0], dtype=D)
    tol = _tol(method)
    et, ys = pdb.odeint(Linear(A_EV), y0, torch.tensor([0.0], dtype=D), method=method,
                        rtol=tol, atol=tol, event_fn=lambda t, y: y[0] - 0.5)
    assert abs(float(et) - math.log(2.0)) < 1e-6
    assert ys.shape == (2, 2) and torch.equal(ys[0], y0)
    # the state at the event: on the interpolant at t*, and the closed form there
    assert abs(float(ys[1, 0]) - 0.5) < 1e-12
    exact = torch.linalg.matrix_exp(A_EV * math.log(2.0)) @ y0
    assert float((ys[1] - exact).abs().max()) < 1e-6
    # torchdiffeq's call: t0 a 0-d tensor, the event searched without an end
    et2, ys2 = pdb.odeint_event(Linear(A_EV), y0, torch.tensor(0.0, dtype=D),
                                event_fn=lambda t, y: y[0] - 0.5, method=method, rtol=tol,
                                atol=tol)
    assert abs(float(et2) - math.log(2.0)) < 1e-6 and ys2.shape == (2, 2)
    # backwards in time: y1 = e^{t} (growing forwards, decaying backwards) is 0.5 at -ln 2
    et3, _ = pdb.odeint_event(Linear(-A_EV), y0, torch.tensor(0.0, dtype=D), reverse_time=True,
                              event_fn=lambda t, y: y[0] - 0.5, method=method, rtol=tol,
                              atol=tol)
    assert abs(float(et3) + math.log(2.0)) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_event_time_gradients(method):
    # y1(0) e^{-t*} = c: t* = ln(y1(0) / c), dt*/dy1(0) = 1/y1(0), dt*/dy2(0) = 0, dt*/dc = -1/c,
    # dt*/dt0 = 1
    tol = 1e-9
    y0 = torch.tensor([1.5, 2.0], dtype=D, requires_grad=True)
    et, ys = pdb.odeint(Linear(A_EV), y0, torch.tensor([0.0], dtype=D), method=method,
                        rtol=tol, atol=tol, event_fn=lambda t, y: y[0] - 0.5)
    (g,) = torch.autograd.grad(et, y0)
    assert abs(float(g[0]) * 1.5 - 1.0) < 2e-5 and abs(float(g[1])) < 1e-9
    # a parameter of event_fn only (the loop itself then runs without autograd)
    c = torch.tensor(0.5, dtype=D, requires_grad=True)
    et, _ = pdb.odeint(Linear(A_EV), y0.detach(), torch.tensor([0.0], dtype=D), method=method,
                       rtol=tol, atol=tol, event_fn=lambda t, y: y[0] - c)
    (gc,) = torch.autograd.grad(et, c)
    assert abs(float(gc) * 0.5 + 1.0) < 2e-5
    t0 = torch.tensor(0.25, dtype=D, requires_grad=True)
    et, _ = pdb.odeint_event(Linear(A_EV), y0.detach(), t0, event_fn=lambda t, y: y[0] - 0.5,
                             method=method, rtol=tol, atol=tol)
    (gt,) = torch.autograd.grad(et, t0)
    assert abs(float(et.detach()) - 0.25 - math.log(3.0)) < 1e-6
    assert abs(float(gt) - 1.0) < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_no_event_before_the_end(method):
    f, y0 = Linear(A_EV), torch.tensor([1.0, 2.0], dtype=D)
    never = lambda t, y: y[0] + 5.0  # noqa: E731
    sol = pdb.solve(f, y0, torch.tensor([0.0, 1.0], dtype=D), method=method, event_fn=never)
    assert sol.status == Status.FAILED and "never crossed zero up to t=1" in sol.message
    assert sol.event_t is None
    sol = pdb.solve(f, y0, torch.tensor([0.0], dtype=D), method=method, event_fn=never,
                    options={"t_max": 2.0})
    assert sol.status == Status.FAILED and "up to t=2" in sol.message
    with pytest.raises(SolverError, match="never crossed"):
        pdb.odeint(f, y0, torch.tensor([0.0], dtype=D), method=method, event_fn=never,
                   options={"t_max": 2.0})
