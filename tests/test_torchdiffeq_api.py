"""torchdiffeq's documented API, exercised with pydiffbridge imported under the name
``torchdiffeq`` (what a user who swaps the import gets).  References are closed forms, never
our own output."""

import math
import sys
import types
import warnings

import pytest
import torch

import pydiffbridge
from pydiffbridge.solvers.hooks import Perturb

D = torch.float64


@pytest.fixture
def tdq():
    """``import torchdiffeq`` resolving to pydiffbridge, restored afterwards."""
    shim = types.ModuleType("torchdiffeq")
    for name in ("odeint", "odeint_adjoint", "odeint_event", "odeint_dense"):
        setattr(shim, name, getattr(pydiffbridge, name))
    saved = sys.modules.get("torchdiffeq")
    sys.modules["torchdiffeq"] = shim
    try:
        import torchdiffeq

        yield torchdiffeq
    finally:
        if saved is None:
            sys.modules.pop("torchdiffeq", None)
        else:
            sys.modules["torchdiffeq"] = saved


class Decay(torch.nn.Module):
    """dy/dt = -k y, y(t) = y0 exp(-k (t - t0))."""

    def __init__(self, k=0.7, dtype=D):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=dtype))

    def forward(self, t, y):
        return -self.k * y


METHODS = ["dopri5", "bosh3", "adaptive_heun", "fehlberg2", "dopri8", "tsit5", "euler",
           "midpoint", "rk4", "explicit_adams", "implicit_adams"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("adjoint", [False, True])
def test_one_output_time_returns_y0_with_its_gradient(tdq, method, adjoint):
    f = Decay()
    y0 = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    t = torch.tensor([3.0], dtype=D)
    solver = tdq.odeint_adjoint if adjoint else tdq.odeint
    ys = solver(f, y0, t, method=method)
    assert ys.shape == (1, 2)
    assert torch.equal(ys[0], y0.detach())
    ys.sum().backward()
    assert torch.equal(y0.grad, torch.ones(2, dtype=D))


def test_one_output_time_tuple_state(tdq):
    y0 = (torch.ones(2, dtype=D), torch.zeros(3, 1, dtype=D))
    ys = tdq.odeint(lambda t, y: (-y[0], y[1]), y0, torch.tensor([0.5], dtype=D))
    assert ys[0].shape == (1, 2) and ys[1].shape == (1, 3, 1)
    assert torch.equal(ys[0][0], y0[0]) and torch.equal(ys[1][0], y0[1])


@pytest.mark.parametrize("method", ["dopri5", "rk4", "euler"])
def test_float32_state_with_float64_func_output(tdq, method):
    """A float32 state whose func returns float64: the result stays float32, no error."""
    y0 = torch.tensor([1.0, 2.0])
    t = torch.linspace(0, 1, 5, dtype=torch.float32)
    ys = tdq.odeint(lambda t, y: (-y).double(), y0, t, method=method,
                    options={"step_size": 0.01} if method in ("rk4", "euler") else None)
    assert ys.dtype == torch.float32
    exact = y0 * torch.exp(-t)[:, None]
    tol = 2e-2 if method == "euler" else 1e-5  # euler: O(h) = 0.01 global error
    assert (ys - exact).abs().max() < tol


@pytest.mark.parametrize("method", ["dopri5", "rk4", "implicit_adams"])
@pytest.mark.parametrize("grad", [False, True])
def test_func_receives_t_in_the_state_dtype(tdq, method, grad):
    """torchdiffeq hands func t in the state's dtype: a float32 func that concatenates t to
    its input works with a float64 time grid (and the output is float32)."""
    lin = torch.nn.Linear(3, 2)
    seen = set()

    def f(t, y):
        seen.add(t.dtype)
        return lin(torch.cat([y, t.expand(y.shape[0], 1)], 1))

    y0 = torch.randn(4, 2)
    t = torch.linspace(0, 0.5, 3, dtype=torch.float64)
    opts = {"step_size": 0.05} if method != "dopri5" else None
    with torch.set_grad_enabled(grad):
        ys = tdq.odeint(f, y0, t, method=method, options=opts)
    assert ys.dtype == torch.float32 and seen == {torch.float32}


class Counting(torch.nn.Module):
    """y' = -y with torchdiffeq's callbacks counted (only some of them defined)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=D))
        self.calls = {}

    def forward(self, t, y):
        return -self.w * y * (1 + 50 * (t > 2.0))  # a kink at t=2: forces rejected steps

    def _count(self, name, t0, y0, dt):
        assert t0.ndim == 0 and dt.ndim == 0 and y0.shape == (3,)
        self.calls[name] = self.calls.get(name, 0) + 1

    def callback_step(self, t0, y0, dt):
        self._count("step", t0, y0, dt)

    def callback_accept_step(self, t0, y0, dt):
        self._count("accept", t0, y0, dt)

    def callback_reject_step(self, t0, y0, dt):
        self._count("reject", t0, y0, dt)

    def callback_step_adjoint(self, t0, y0, dt):
        self.calls["step_adjoint"] = self.calls.get("step_adjoint", 0) + 1

    def callback_reject_step_adjoint(self, t0, y0, dt):
        self.calls["reject_adjoint"] = self.calls.get("reject_adjoint", 0) + 1


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "tsit5", "dopri8"])
def test_callbacks_counted_against_stats(method):
    f = Counting()
    sol = pydiffbridge.solve(f, torch.ones(3, dtype=D), torch.tensor([0.0, 4.0], dtype=D),
                             method=method, rtol=1e-6, atol=1e-8, gradient="adjoint")
    st = sol.stats
    assert st.rejected > 0
    assert f.calls["step"] == st.steps
    assert f.calls["accept"] == st.accepted and f.calls["reject"] == st.rejected
    assert "step_adjoint" not in f.calls  # the backward pass has not run yet
    sol.ys[-1].sum().backward()
    assert f.calls["step_adjoint"] == sol.stats.steps_backward
    assert f.calls.get("reject_adjoint", 0) <= sol.stats.steps_backward
    assert f.calls["step"] == st.steps  # the forward callbacks are not called in backward


def test_func_without_callbacks_is_fine(tdq):
    ys = tdq.odeint(lambda t, y: -y, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D))
    assert abs(float(ys[-1, 0]) - math.exp(-1)) < 1e-7


def test_perturb_keyword_at_jump_t(tdq):
    """A func naming ``perturb`` gets PREV just before a jump_t and NEXT just after it; the
    other calls get NONE or nothing; the jump at 0.5 is resolved exactly."""
    flags = []

    def f(t, y, perturb=Perturb.NONE):
        flags.append((float(t), perturb))
        return -y if t < 0.5 else 2 * y

    y0 = torch.ones(1, dtype=D)
    ys = tdq.odeint(f, y0, torch.tensor([0.0, 1.0], dtype=D), rtol=1e-10, atol=1e-12,
                    options={"jump_t": torch.tensor([0.5])})
    exact = math.exp(-0.5) * math.exp(2 * 0.5)
    assert abs(float(ys[-1, 0]) - exact) < 1e-8
    prev = [t for t, p in flags if p is Perturb.PREV]
    nxt = [t for t, p in flags if p is Perturb.NEXT]
    assert prev and all(t < 0.5 and 0.5 - t < 1e-15 for t in prev)
    assert len(nxt) == 1 and 0.5 < nxt[0] < 0.5 + 1e-15
    assert all(t != 0.5 for t, _ in flags)


def test_errors_are_the_exceptions_torchdiffeq_raises(tdq):
    """torchdiffeq raises AssertionError for too many steps and for underflow, ValueError for an
    unknown method: code that catches those catches ours."""
    t = torch.tensor([0.0, 50.0], dtype=D)
    with pytest.raises(AssertionError, match="max_num_steps"):
        tdq.odeint(lambda t, y: torch.cos(10 * t) * y, torch.ones(1, dtype=D), t,
                   options={"max_num_steps": 10})
    with pytest.raises(AssertionError, match="underflow"):  # blows up at t = 1
        tdq.odeint(lambda t, y: y * y, torch.ones(1, dtype=D), torch.tensor([0.0, 2.0], dtype=D))
    with pytest.raises(ValueError, match="method"):
        tdq.odeint(lambda t, y: -y, torch.ones(1, dtype=D), t, method="no_such_method")
    with pytest.raises(TypeError):
        tdq.odeint(lambda t, y: -y, torch.ones(1, dtype=torch.int64), t)


def test_adjoint_options_not_mutated(tdq):
    f = Decay()
    y0 = torch.ones(2, dtype=D, requires_grad=True)
    opts = {"norm": "seminorm"}
    fopts = {"first_step": 0.1}
    ys = tdq.odeint_adjoint(f, y0, torch.tensor([0.0, 1.0], dtype=D), options=fopts,
                            adjoint_options=opts)
    ys.sum().backward()
    assert opts == {"norm": "seminorm"} and fopts == {"first_step": 0.1}


def test_documented_signatures(tdq):
    """Every keyword of torchdiffeq's documented odeint/odeint_adjoint works, and gradients
    match the closed form d/dk [y0 exp(-k t)] = -t y0 exp(-k t)."""
    f = Decay(0.5)
    y0 = torch.tensor([2.0], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.5], dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = tdq.odeint(f, y0, t, rtol=1e-9, atol=1e-11, method="dopri5",
                        options={"first_step": 0.01})
        ya = tdq.odeint_adjoint(f, y0, t, rtol=1e-9, atol=1e-11, method="dopri5", options=None,
                                adjoint_rtol=1e-9, adjoint_atol=1e-11, adjoint_method="dopri5",
                                adjoint_options=None, adjoint_params=tuple(f.parameters()))
    exact = 2.0 * math.exp(-0.75)
    assert abs(ys[-1, 0].item() - exact) < 1e-8 and abs(ya[-1, 0].item() - exact) < 1e-8
    (gk,) = torch.autograd.grad(ya[-1, 0], f.k)
    assert abs(float(gk) - (-1.5 * exact)) < 1e-7


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_odeint_dense_matches_closed_form_and_differentiates(tdq, method):
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=D)
    dense = tdq.odeint_dense(lambda t, y: -k * y, y0, torch.tensor(0.0, dtype=D),
                             torch.tensor(3.0, dtype=D), rtol=1e-10, atol=1e-12, method=method)
    te = torch.linspace(0, 3, 17, dtype=D)
    ys = dense(te)
    exact = y0 * torch.exp(-0.7 * te)[:, None]
    assert ys.shape == (17, 2) and (ys - exact.detach()).abs().max() < 1e-7
    assert dense(torch.tensor(1.3, dtype=D)).shape == (2,)
    (gk,) = torch.autograd.grad(ys[5, 0], k)  # d/dk exp(-k t) = -t exp(-k t)
    assert abs(gk.item() + te[5].item() * math.exp(-0.7 * te[5].item())) < 1e-6
    with pytest.raises(ValueError, match="outside"):
        dense(torch.tensor(3.5, dtype=D))


def test_odeint_dense_empty_state_returns_at_once():
    dense = pydiffbridge.odeint_dense(lambda t, y: y, torch.ones(0, 2, dtype=D), 0.0, 1.0)
    assert dense(torch.linspace(0, 1, 3, dtype=D)).shape == (3, 0, 2)


def test_callback_dt_is_positive_in_reverse_time():
    """torchdiffeq integrates reversed time as negated time: callbacks see dt > 0."""
    dts = []

    class F(torch.nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            dts.append(float(dt))

    pydiffbridge.odeint(F(), torch.ones(1, dtype=D), torch.tensor([1.0, 0.0], dtype=D))
    assert dts and all(d > 0 for d in dts)


@pytest.mark.parametrize("method,opts", [("dopri5", None), ("rk4", {"step_size": 0.01})])
def test_event_search_goes_beyond_t1_as_in_torchdiffeq(tdq, method, opts):
    """odeint(f, y0, [t0, t1], event_fn=...) uses t1 for the direction only: y' = 1 from 0
    crosses y = 3 at t = 3, beyond t1 = 1 (and at t = -3 when t1 < t0)."""
    y0 = torch.zeros(1, dtype=D)
    for t1, t_ev in ((1.0, 3.0), (-1.0, -3.0)):
        ev_t, ys = tdq.odeint(lambda t, y: torch.ones_like(y), y0,
                              torch.tensor([0.0, t1], dtype=D), method=method, options=opts,
                              event_fn=lambda t, y: y.abs().sum() - 3.0)
        assert abs(float(ev_t) - t_ev) < 1e-6 and abs(float(ys[-1, 0]) - t_ev) < 1e-6
