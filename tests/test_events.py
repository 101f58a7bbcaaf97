"""Terminal events: bouncing-ball style, located on the dense output, differentiable."""

import math

import pytest
import torch

from pydiffbridge import odeint, odeint_event, solve
from pydiffbridge.solution import Status

D = torch.float64


def _ball(g):
    def f(t, s):
        x, v = s
        return v, -g * torch.ones_like(v)

    return f


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_ball_hits_ground(method):
    g = 9.81
    h0, v0 = 10.0, 2.0
    y0 = (torch.tensor(h0, dtype=D), torch.tensor(v0, dtype=D))
    t_hit = (v0 + math.sqrt(v0 * v0 + 2 * g * h0)) / g
    event_t, (xs, vs) = odeint(_ball(g), y0, torch.tensor([0.0], dtype=D),
                               event_fn=lambda t, s: s[0], method=method, rtol=1e-10, atol=1e-12)
    assert abs(float(event_t) - t_hit) < 1e-8
    assert xs.shape == (2,) and abs(float(xs[-1])) < 1e-8
    assert abs(float(vs[-1]) - (v0 - g * t_hit)) < 1e-7


def test_bounces_by_restarting():
    # three bounces with restitution 0.8, each restarted from the event state
    g, e = 9.81, 0.8
    t0 = torch.tensor([0.0], dtype=D)
    state = (torch.tensor(1.0, dtype=D), torch.tensor(0.0, dtype=D))
    times = []
    for _ in range(3):
        et, (xs, vs) = odeint_event(_ball(g), state, t0, event_fn=lambda t, s: s[0],
                                    rtol=1e-10, atol=1e-12)
        times.append(float(et))
        t0 = et.reshape(1)
        # restart a hair above the ground so the new solve does not start on the root
        state = (torch.tensor(1e-12, dtype=D), -e * vs[-1])
    t1 = math.sqrt(2 / g)
    v1 = g * t1
    expect = [t1, t1 + 2 * e * v1 / g, t1 + 2 * e * v1 / g + 2 * e * e * v1 / g]
    for got, want in zip(times, expect, strict=True):
        assert abs(got - want) < 1e-6


def test_event_time_is_differentiable():
    g = torch.tensor(9.81, dtype=D, requires_grad=True)
    h0 = torch.tensor(2.0, dtype=D, requires_grad=True)
    y0 = (h0, torch.tensor(0.0, dtype=D))
    et, _ = odeint(_ball(g), y0, torch.tensor([0.0], dtype=D), event_fn=lambda t, s: s[0],
                   rtol=1e-10, atol=1e-12)
    dg, dh = torch.autograd.grad(et, (g, h0))
    # t* = sqrt(2 h / g)
    assert abs(float(dg) - (-0.5 * math.sqrt(2 * 2.0) * 9.81**-1.5)) < 1e-7
    assert abs(float(dh) - 0.5 * math.sqrt(2 / 9.81) / math.sqrt(2.0)) < 1e-7


def test_no_event_before_end_is_reported():
    sol = solve(lambda t, y: -y, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                event_fn=lambda t, y: y[0] + 5.0)
    assert sol.status == Status.FAILED and "never crossed" in sol.message


def test_event_with_fixed_grid_method_needs_step_size():
    # as torchdiffeq (fixed-grid events with step_size: tests/test_fixed_events.py)
    from pydiffbridge.errors import InputError

    with pytest.raises(InputError, match="step_size"):
        odeint(lambda t, y: -y, torch.ones(1, dtype=D), torch.tensor([0.0], dtype=D),
               method="rk4", event_fn=lambda t, y: y[0] - 0.5)


def _oscillator(t, s):
    x, v = s
    return v, -x


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_event_time_on_a_curved_solution(method):
    # x = sin t crosses 0.9 at asin(0.9); the steps are long at the default tolerances, so the
    # root is only as good as the method's dense output (dopri8: its own 7th-order one; the
    # cubic Hermite through the step's ends was off by ~1e-3 here)
    y0 = (torch.tensor(0.0, dtype=D), torch.tensor(1.0, dtype=D))
    event_t, (xs, _) = odeint(_oscillator, y0, torch.tensor([0.0], dtype=D), method=method,
                              event_fn=lambda t, s: s[0] - 0.9)
    assert abs(float(event_t) - math.asin(0.9)) < 1e-6
    assert abs(float(xs[-1]) - 0.9) < 1e-9


def test_dop853_dense_output_is_seventh_order():
    # one DOP853 step of the oscillator from 0: the interpolant's error at interior points falls
    # like h^8 (local error of a 7th-order interpolant); the cubic Hermite's like h^4
    from pydiffbridge.solvers import interp
    from pydiffbridge.solvers.tableaus import DOPRI8

    def f(t, y):
        return torch.stack([y[1], -y[0]])

    def worst(h):
        y0 = torch.tensor([0.0, 1.0], dtype=D)
        ks = [f(0.0, y0)]
        for i in range(1, 12):
            ks.append(f(0.0, y0 + h * sum(a * ks[j] for j, a in enumerate(DOPRI8.a[i]))))
        y1 = y0 + h * sum(b * k for b, k in zip(DOPRI8.b, ks, strict=True))
        K = torch.stack(ks + [f(h, y1)])
        Kx = torch.cat([K, interp.dop853_extra_stages(f, 0.0, y0, K, h)])
        th = torch.linspace(0.05, 0.95, 19, dtype=D)
        y = y0 + h * (interp.dop853_weights(th) @ Kx)
        exact = torch.stack([torch.sin(th * h), torch.cos(th * h)], 1)
        return float((y - exact).abs().max())

    e1, e2 = worst(0.4), worst(0.2)
    assert e1 < 1e-8
    assert 7.5 < math.log2(e1 / e2) < 8.5


def test_fixed_grid_float32_event_time_rounding():
    # y' = 0.2 from y(1) = 3.2 to the event y = 3.7 at t = 3.5 with rk4, h = 0.01, in float32.
    # rk4 is exact here, so only rounding is left: summing each step's increment first and
    # adding it to y once rounds at most ulp(y)/2 per step, i.e. N * ulp(4)/2 / 0.2 in t after
    # N = 250 steps (plus the root's own rounding).  Adding the four stage terms to y one by
    # one rounds four times per step, which could exceed this.
    f32 = torch.float32
    y0 = torch.tensor([3.2], dtype=f32)
    t = torch.tensor([1.0, 10.0], dtype=f32)
    event_t, ys = odeint(lambda t, y: torch.full_like(y, 0.2), y0, t, method="rk4",
                         options={"step_size": 0.01}, event_fn=lambda t, y: y[0] - 3.7)
    ulp = torch.finfo(f32).eps * 2  # the spacing of float32 numbers in [2, 4)
    bound = 250 * ulp / 2 / 0.2 + 4 * torch.finfo(f32).eps * 3.5
    assert abs(float(event_t) - 3.5) < bound
