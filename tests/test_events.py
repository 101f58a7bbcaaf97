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
