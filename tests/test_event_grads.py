"""Gradients through event times and post-event states (task: bouncing_ball.py's gradient
check): a ball x'' = -g dropped from h0 with velocity v0 bounces on a floor at height r with
restitution e, each bounce a new odeint_event call from the last event (time and state), as
torchdiffeq's examples/bouncing_ball.py does.  Closed form: the first impact after
t1 = (v0 + V) / g with V = sqrt(v0^2 + 2 g (h0 - r)), then flights of 2 e^k V / g."""

import math

import pytest
import torch

from pydiffbridge import odeint, odeint_adjoint, odeint_event

D = torch.float64
P0 = {"h0": 10.0, "v0": 1.5, "g": 9.8, "e": 0.8, "r": 0.2, "t0": 0.3}
EPS = 1e-9  # lift after a bounce so the next search does not start on the root (as the example)
N = 3


class Ball(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.g = p["g"]

    def forward(self, t, s):
        x, v = s
        return v, -self.g * torch.ones_like(v)


def bounces(p, interface, method, opts):
    """Bounce times and the impact velocity of the last bounce."""
    f = Ball(p)
    state = (p["h0"], p["v0"])
    t0 = p["t0"]
    times = []
    for _ in range(N):
        kw = {"adjoint_params": (p["g"],)} if interface is odeint_adjoint else {}
        et, (xs, vs) = odeint_event(f, state, t0, event_fn=lambda t, s: s[0] - p["r"],
                                    odeint_interface=interface, method=method, options=opts,
                                    rtol=1e-11, atol=1e-12, **kw)
        times.append(et)
        v_hit = vs[-1]
        state = (xs[-1] + EPS, -p["e"] * v_hit)
        t0 = et
    return times, v_hit


def closed_form(p):
    V = torch.sqrt(p["v0"] ** 2 + 2 * p["g"] * (p["h0"] - p["r"]))
    times = [p["t0"] + (p["v0"] + V) / p["g"]]
    for k in range(1, N):
        times.append(times[-1] + 2 * p["e"] ** k * V / p["g"])
    return times, -p["e"] ** (N - 1) * V


def _leaves():
    return {k: torch.tensor(v, dtype=D, requires_grad=True) for k, v in P0.items()}


CASES = [(odeint, "dopri5", None), (odeint_adjoint, "dopri5", None),
         (odeint, "rk4", {"step_size": 0.02, "interp": "cubic"}),
         (odeint_adjoint, "rk4", {"step_size": 0.02, "interp": "cubic"})]


@pytest.mark.parametrize("interface,method,opts", CASES,
                         ids=["direct-dopri5", "adjoint-dopri5", "direct-rk4", "adjoint-rk4"])
def test_bounce_gradients_closed_form(interface, method, opts):
    p = _leaves()
    times, v_hit = bounces(p, interface, method, opts)
    q = _leaves()
    times_ref, v_ref = closed_form(q)
    for a, b in zip(times, times_ref, strict=True):
        assert abs(float(a.detach()) - float(b.detach())) < 1e-8
    assert abs(float(v_hit.detach()) - float(v_ref.detach())) < 1e-7
    names = list(P0)
    for out, ref in ((times[-1], times_ref[-1]), (times[0] + 0.5 * v_hit, times_ref[0]
                                                  + 0.5 * v_ref)):
        got = torch.autograd.grad(out, [p[k] for k in names], retain_graph=True,
                                  allow_unused=True)
        want = torch.autograd.grad(ref, [q[k] for k in names], retain_graph=True)
        for k, a, b in zip(names, got, want, strict=True):
            assert a is not None, f"no gradient w.r.t. {k}"
            assert abs(float(a) - float(b)) < 2e-6 * max(1.0, abs(float(b))), (k, a, b)


def test_bounce_gradients_match_finite_differences():
    # the solver's own gradient against central differences of the solver's own output
    def last_time(vals):
        p = {k: torch.tensor(v, dtype=D) for k, v in vals.items()}
        with torch.no_grad():
            return float(bounces(p, odeint, "dopri5", None)[0][-1])

    p = _leaves()
    times, _ = bounces(p, odeint, "dopri5", None)
    grads = torch.autograd.grad(times[-1], list(p.values()))
    for (k, v), gk in zip(P0.items(), grads, strict=True):
        d = 1e-5
        fd = (last_time({**P0, k: v + d}) - last_time({**P0, k: v - d})) / (2 * d)
        assert abs(float(gk) - fd) < 1e-5 * max(1.0, abs(fd)), (k, float(gk), fd)


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
def test_event_function_parameter_in_a_closure(interface):
    # the floor height r is a parameter of event_fn only (not part of the state)
    r = torch.tensor(0.5, dtype=D, requires_grad=True)
    h0, g = 3.0, 9.8
    f = Ball({"g": g})
    kw = {"adjoint_params": ()} if interface is odeint_adjoint else {}
    et, (xs, vs) = odeint_event(f, (torch.tensor(h0, dtype=D), torch.tensor(0.0, dtype=D)), 0.0,
                                event_fn=lambda t, s: s[0] - r ** 2, odeint_interface=interface,
                                rtol=1e-11, atol=1e-12, **kw)
    (d,) = torch.autograd.grad(et + vs[-1], r)
    # t* = sqrt(2 (h0 - r^2) / g): dt*/dr = -2 r / (g t*); v = -g t*: dv/dr = 2 r / t*
    ts = math.sqrt(2 * (h0 - 0.25) / g)
    assert abs(float(d) - (-2 * 0.5 / (g * ts) + 2 * 0.5 / ts)) < 1e-7


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
def test_event_fn_with_time_dependence(interface):
    # a floor rising at speed c: x(t) = h0 - g t^2 / 2 meets c t at t* (closed form)
    c = torch.tensor(2.0, dtype=D, requires_grad=True)
    h0, g = 5.0, 9.8
    kw = {"adjoint_params": ()} if interface is odeint_adjoint else {}
    et, _ = odeint_event(Ball({"g": g}), (torch.tensor(h0, dtype=D), torch.tensor(0.0, dtype=D)),
                         0.0, event_fn=lambda t, s: s[0] - c * t, odeint_interface=interface,
                         rtol=1e-11, atol=1e-12, **kw)
    (dc,) = torch.autograd.grad(et, c)
    cr = torch.tensor(2.0, dtype=D, requires_grad=True)
    tr = (-cr + torch.sqrt(cr * cr + 2 * g * h0)) / g
    (dref,) = torch.autograd.grad(tr, cr)
    assert abs(float(et.detach()) - float(tr.detach())) < 1e-9
    assert abs(float(dc) - float(dref)) < 1e-8

