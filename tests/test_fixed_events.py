"""Terminal events with fixed-grid methods and odeint_event's keywords (torchdiffeq's
behaviours), against closed forms: the ball x(t) = h0 + v0 t - g t^2 / 2."""

import math

import pytest
import torch

from pydiffbridge import odeint, odeint_adjoint, odeint_event, solve
from pydiffbridge.errors import InputError, MaxStepsExceededError, SolverError, TimeGridError
from pydiffbridge.solution import Status

D = torch.float64
G, H0, V0 = 9.81, 10.0, 2.0
T_HIT = (V0 + math.sqrt(V0 * V0 + 2 * G * H0)) / G
T_PAST = (V0 - math.sqrt(V0 * V0 + 2 * G * H0)) / G  # the root at negative time

# methods of order >= 2 reproduce the quadratic x(t) exactly on the grid
EXACT = ["midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams",
         "implicit_midpoint", "trapezoid", "radauIIA3", "radauIIA5", "gl4", "gl6", "sdirk2",
         "trbdf2"]


def ball(g=G):
    def f(t, s):
        x, v = s
        return v, -g * torch.ones_like(v)

    return f


def state(h0=H0, v0=V0):
    return (torch.tensor(h0, dtype=D), torch.tensor(v0, dtype=D))


def hit_ground(t, s):
    return s[0]


def _linear_root(h, t0=0.0):
    """Where the linear interpolant of the exact grid values t0 + k h crosses zero."""
    k = math.floor((T_HIT - t0) / h)
    ta, tb = t0 + k * h, t0 + (k + 1) * h
    xa, xb = (H0 + V0 * s - G * s * s / 2 for s in (ta, tb))
    return ta + h * xa / (xa - xb)


@pytest.mark.parametrize("method", EXACT)
def test_event_on_the_cubic_interpolant_is_exact(method):
    et, (xs, vs) = odeint_event(ball(), state(), torch.tensor(0.0, dtype=D), event_fn=hit_ground,
                                method=method, options={"step_size": 0.05, "interp": "cubic"})
    assert abs(float(et) - T_HIT) < 1e-11
    assert xs.shape == (2,) and abs(float(xs[-1])) < 1e-11 and float(xs[0]) == H0
    assert abs(float(vs[-1]) - (V0 - G * T_HIT)) < 1e-9


@pytest.mark.parametrize("method", ["rk4", "gl4", "implicit_adams"])
def test_event_on_the_linear_interpolant(method):
    h = 0.05
    et, (xs, vs) = odeint(ball(), state(), torch.tensor([0.0], dtype=D), event_fn=hit_ground,
                          method=method, options={"step_size": h})
    assert abs(float(et) - _linear_root(h)) < 1e-12
    assert abs(float(xs[-1])) < 1e-12


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_euler_event_against_the_scheme(interp):
    # the Euler recurrence x += h v, v -= h g, then the root of the step's interpolant
    h = 0.1
    x, v, t = H0, V0, 0.0
    while True:
        x1, v1 = x + h * v, v - h * G
        if x1 < 0:
            break
        x, v, t = x1, v1, t + h
    if interp == "linear":
        want = t + h * x / (x - x1)
    else:  # Hermite cubic with the slopes v, v1: bisection on the closed-form polynomial
        def p(s):
            return ((2 * s**3 - 3 * s**2 + 1) * x + (s**3 - 2 * s**2 + s) * h * v
                    + (-2 * s**3 + 3 * s**2) * x1 + (s**3 - s**2) * h * v1)
        lo, hi = 0.0, 1.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if p(mid) > 0 else (lo, mid)
        want = t + h * lo
    et, _ = odeint_event(ball(), state(), 0.0, event_fn=hit_ground, method="euler",
                         options={"step_size": h, "interp": interp})
    assert abs(float(et) - want) < 1e-12


def test_fixed_grid_event_needs_step_size():
    with pytest.raises(InputError, match="step_size"):
        odeint_event(ball(), state(), 0.0, event_fn=hit_ground, method="rk4")


def test_grid_constructor_with_a_finite_search():
    def grid(func, y0, t):
        return torch.linspace(float(t[0]), float(t[-1]), 61, dtype=t.dtype)

    et, _ = odeint_event(ball(), state(), 0.0, event_fn=hit_ground, method="rk4",
                         options={"grid_constructor": grid, "t_max": 3.0, "interp": "cubic"})
    assert abs(float(et) - T_HIT) < 1e-11
    with pytest.raises(InputError, match="finite"):
        odeint_event(ball(), state(), 0.0, event_fn=hit_ground, method="rk4",
                     options={"grid_constructor": grid})


def test_no_event_before_the_end_and_max_num_steps():
    sol = solve(ball(), state(), torch.tensor([0.0, 1.0], dtype=D), event_fn=hit_ground,
                method="rk4", options={"step_size": 0.1})
    assert sol.status == Status.FAILED and "never crossed" in sol.message
    with pytest.raises(SolverError, match="never crossed"):
        odeint_event(ball(), state(), 0.0, event_fn=hit_ground, method="rk4",
                     options={"step_size": 0.1, "t_max": 1.0})
    with pytest.raises(MaxStepsExceededError, match="max_num_steps=20"):
        odeint_event(ball(), state(), 0.0, event_fn=hit_ground, method="rk4",
                     options={"step_size": 0.01, "max_num_steps": 20})


@pytest.mark.parametrize("method,opts", [("dopri5", None), ("rk4", {"step_size": 0.05,
                                                                      "interp": "cubic"})])
@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
def test_reverse_time(method, opts, interface):
    # from t0 = 0 backwards: when was the ball (thrown up at 2 m/s from 10 m) on the ground?
    h0 = torch.tensor(H0, dtype=D, requires_grad=True)
    kw = {"adjoint_params": (h0,)} if interface is odeint_adjoint else {}
    et, (xs, vs) = odeint_event(ball(), (h0, torch.tensor(V0, dtype=D)), 0.0, event_fn=hit_ground,
                                reverse_time=True, odeint_interface=interface, method=method,
                                options=opts, rtol=1e-10, atol=1e-12, **kw)
    assert abs(float(et.detach()) - T_PAST) < 1e-9
    assert abs(float(vs[-1].detach()) - (V0 - G * T_PAST)) < 1e-8
    (dh,) = torch.autograd.grad(et, h0)
    # t = (v0 - sqrt(v0^2 + 2 g h0)) / g: dt/dh0 = -1 / sqrt(v0^2 + 2 g h0)
    assert abs(float(dh) + 1 / math.sqrt(V0 * V0 + 2 * G * H0)) < 1e-7


def test_reverse_time_with_a_search_length():
    with pytest.raises(SolverError, match="never crossed"):
        odeint_event(ball(), state(), 0.0, event_fn=hit_ground, reverse_time=True,
                     options={"t_max": 0.5})
    et, _ = odeint_event(ball(), state(), 0.0, event_fn=hit_ground, reverse_time=True,
                         options={"t_max": 2.0}, rtol=1e-10, atol=1e-12)
    assert abs(float(et) - T_PAST) < 1e-9


@pytest.mark.parametrize("t0", [0.5, 1, torch.tensor(0.5, dtype=D), torch.tensor([0.5], dtype=D),
                                torch.tensor([[0.5]], dtype=D)])
def test_t0_forms(t0):
    t_start = float(torch.as_tensor(t0))
    et, (xs, vs) = odeint_event(ball(), state(), t0, event_fn=hit_ground, rtol=1e-10,
                                atol=1e-12)
    assert et.dtype == D and et.numel() == 1
    assert abs(float(et) - (t_start + T_HIT)) < 1e-9


def test_t0_of_several_times_is_refused():
    with pytest.raises(TimeGridError, match="one"):
        odeint_event(ball(), state(), torch.tensor([0.0, 1.0], dtype=D), event_fn=hit_ground)


def test_float32_state_and_float_t0():
    s = (torch.tensor(H0), torch.tensor(V0))
    et, (xs, _) = odeint_event(ball(), s, 0.0, event_fn=hit_ground, method="rk4",
                               options={"step_size": 0.05, "interp": "cubic"})
    assert et.dtype == torch.float32 and xs.dtype == torch.float32
    assert abs(float(et) - T_HIT) < 1e-5


def test_first_component_to_cross_ends_the_solve():
    def ev(t, s):  # hits 8 m at t_a and the ground later
        return torch.stack([s[0], s[0] - 8.0])

    et, _ = odeint_event(ball(), state(), 0.0, event_fn=ev, method="rk4",
                         options={"step_size": 0.05, "interp": "cubic"})
    t_a = (V0 + math.sqrt(V0 * V0 + 2 * G * (H0 - 8.0))) / G
    assert abs(float(et) - t_a) < 1e-11


def test_callback_step_during_the_event_search():
    class Ball(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.starts = []

        def forward(self, t, s):
            return s[1], -G * torch.ones_like(s[1])

        def callback_step(self, t0, y0, dt):
            self.starts.append(float(t0))

    f = Ball()
    sol = solve(f, state(), torch.tensor([0.0], dtype=D), event_fn=hit_ground, method="rk4",
                options={"step_size": 0.25})
    assert len(f.starts) == sol.stats.steps == math.ceil(T_HIT / 0.25)
    assert f.starts[:3] == [0.0, 0.25, 0.5]


@pytest.mark.parametrize("method", ["rk4", "gl4", "dopri5"])
@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
def test_event_gradients_closed_form(method, interface):
    # t* = (v0 + sqrt(v0^2 + 2 g h0)) / g; the state at t*: x = 0, v = v0 - g t*
    g = torch.tensor(G, dtype=D, requires_grad=True)
    h0 = torch.tensor(H0, dtype=D, requires_grad=True)
    v0 = torch.tensor(V0, dtype=D, requires_grad=True)
    opts = {"step_size": 0.05, "interp": "cubic"} if method != "dopri5" else None
    kw = {"adjoint_params": (g,)} if interface is odeint_adjoint else {}
    et, (xs, vs) = odeint_event(ball(g), (h0, v0), 0.0, event_fn=hit_ground, method=method,
                                options=opts, odeint_interface=interface, rtol=1e-10,
                                atol=1e-12, **kw)
    grads = torch.autograd.grad(et + 0.3 * vs[-1] + 5.0 * xs[-1], (g, h0, v0))
    gr, hr, vr = (torch.tensor(v, dtype=D, requires_grad=True) for v in (G, H0, V0))
    tr = (vr + torch.sqrt(vr * vr + 2 * gr * hr)) / gr
    ref = torch.autograd.grad(tr + 0.3 * (vr - gr * tr), (gr, hr, vr))
    for got, want in zip(grads, ref, strict=True):
        assert abs(float(got) - float(want)) < 1e-7


@pytest.mark.parametrize("method,opts", [("dopri5", None), ("rk4", {"step_size": 0.05,
                                                                      "interp": "cubic"})])
def test_event_fn_may_use_autograd_and_floats_of_its_inputs(method, opts):
    # d/dx of the potential x^2 / 2 by autograd inside event_fn (the state requires grad in
    # every call, as torchdiffeq's vjp hands it), and float(t) without warnings
    import warnings

    def ev(t, s):
        assert float(t) >= 0.0
        x = s[0]
        with torch.enable_grad():
            (dphi,) = torch.autograd.grad(0.5 * x * x, x, create_graph=True)
        return dphi

    h0 = torch.tensor(H0, dtype=D, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        et, _ = odeint_event(ball(), (h0, torch.tensor(V0, dtype=D)), 0.0, event_fn=ev,
                             method=method, options=opts, rtol=1e-10, atol=1e-12)
    assert abs(float(et.detach()) - T_HIT) < 1e-9
    (dh,) = torch.autograd.grad(et, h0)
    assert abs(float(dh) - 1 / math.sqrt(V0 * V0 + 2 * G * H0)) < 1e-7
