"""Small programs written the way torchdiffeq's examples use its API (bouncing_ball.py,
learn_physics.py, a CNF), each checked against closed forms.  Our own code, the same calls."""

import math

import pytest
import torch
from torch import nn

from pydiffbridge import odeint, odeint_adjoint, odeint_event

D = torch.float64


# ------------------------------------------------------------------ bouncing_ball.py style
class BouncingBall(nn.Module):
    def __init__(self, adjoint=False):
        super().__init__()
        self.gravity = nn.Parameter(torch.tensor([9.8], dtype=D))
        self.log_radius = nn.Parameter(torch.log(torch.tensor([0.2], dtype=D)))
        self.t0 = nn.Parameter(torch.tensor([0.0], dtype=D))
        self.init_pos = nn.Parameter(torch.tensor([10.0], dtype=D))
        self.init_vel = nn.Parameter(torch.tensor([1.0], dtype=D))
        self.absorption = nn.Parameter(torch.tensor([0.2], dtype=D))
        self.odeint = odeint_adjoint if adjoint else odeint

    def forward(self, t, state):
        pos, vel, log_radius = state
        return vel, -self.gravity, torch.zeros_like(log_radius)

    def event_fn(self, t, state):
        pos, _, log_radius = state
        return pos - torch.exp(log_radius)

    def apex_fn(self, t, state):
        return state[1]

    def collisions(self, n):
        t0, state = self.t0, (self.init_pos, self.init_vel, self.log_radius)
        times, states = [], []
        for _ in range(n):
            event_t, solution = odeint_event(self, state, t0, event_fn=self.event_fn,
                                             reverse_time=False, atol=1e-10, rtol=1e-10,
                                             odeint_interface=self.odeint)
            times.append(event_t)
            states.append(tuple(s[-1] for s in solution))
            pos, vel, log_radius = states[-1]
            state = (pos + 1e-9, -vel * (1 - self.absorption), log_radius)
            t0 = event_t
        return times, states

    def apex_before(self, event_t, state):
        """Back in time from an impact to where the velocity was zero (the apex)."""
        return odeint_event(self, state, event_t, event_fn=self.apex_fn, reverse_time=True,
                            atol=1e-10, rtol=1e-10, odeint_interface=self.odeint)


def _ball_closed_form(p, n):
    g, r = p["gravity"], torch.exp(p["log_radius"])
    V = torch.sqrt(p["init_vel"] ** 2 + 2 * g * (p["init_pos"] - r))
    times = [p["t0"] + (p["init_vel"] + V) / g]
    for k in range(1, n):
        times.append(times[-1] + 2 * (1 - p["absorption"]) ** k * V / g)
    # the apex before the last impact: a flight of speed e^(n-1) V, from r upwards
    v_last = (1 - p["absorption"]) ** (n - 1) * V if n > 1 else None
    apex_t = times[-1] - (v_last if n > 1 else V) / g
    return times, apex_t


@pytest.mark.parametrize("adjoint", [False, True])
def test_bouncing_ball_program(adjoint):
    n = 3
    system = BouncingBall(adjoint)
    times, states = system.collisions(n)
    apex_t, apex_sol = system.apex_before(times[-1], states[-1])
    loss = times[-1] + 0.5 * apex_t
    loss.sum().backward()
    p = {k: v.detach().clone().requires_grad_(True) for k, v in system.named_parameters()}
    ref_times, ref_apex = _ball_closed_form(p, n)
    for a, b in zip(times, ref_times, strict=True):
        assert abs(float(a.detach()) - float(b.detach())) < 1e-8
    assert abs(float(apex_t.detach()) - float(ref_apex.detach())) < 1e-8
    assert abs(float(apex_sol[1][-1].detach())) < 1e-8  # the velocity at the apex
    ref_loss = ref_times[-1] + 0.5 * ref_apex
    names = list(p)
    want = torch.autograd.grad(ref_loss.sum(), [p[k] for k in names])
    for k, w in zip(names, want, strict=True):
        got = dict(system.named_parameters())[k].grad
        assert got is not None, f"no gradient for {k} (torchdiffeq returns one)"
        assert abs(float(got) - float(w)) < 1e-6 * max(1.0, abs(float(w))), (k, got, w)


# ------------------------------------------------------------------ learn_physics.py style
class Dynamics(nn.Module):
    """Constant acceleration tanh(b) * scale, the velocity update of learn_physics."""

    def __init__(self):
        super().__init__()
        self.dvel = nn.Linear(1, 1).double()
        with torch.no_grad():
            self.dvel.weight.fill_(0.3)
            self.dvel.bias.fill_(-1.5)
        self.scale = nn.Parameter(torch.tensor(10.0, dtype=D))

    def forward(self, t, state):
        pos, vel, *rest = state
        dvel = torch.tanh(self.dvel(torch.zeros_like(vel))) * self.scale
        return (vel, dvel, *[torch.zeros_like(r) for r in rest])


class Physics(nn.Module):
    def __init__(self):
        super().__init__()
        self.initial_pos = nn.Parameter(torch.tensor([4.0], dtype=D))
        self.initial_vel = nn.Parameter(torch.tensor([0.0], dtype=D))
        self.radius = nn.Parameter(torch.tensor([0.5], dtype=D))
        self.restitution = nn.Parameter(torch.tensor([0.0], dtype=D))  # sigmoid -> 0.5
        self.dynamics_fn = Dynamics()

    def simulate(self, times, interface=odeint, max_events=10):
        t0 = torch.tensor([0.0], dtype=D)

        def event_fn(t, state):  # zero past the observation window: that ends the loop
            if t > times[-1] + 1e-7:
                return torch.zeros_like(t)
            pos, _, *_ = state
            return pos - self.radius.reshape_as(pos) ** 2

        state = (self.initial_pos, self.initial_vel)
        event_times = []
        n_events = 0
        while t0 < times[-1] and n_events < max_events:
            event_t, solution = odeint_event(self.dynamics_fn, state, t0, event_fn=event_fn,
                                             atol=1e-10, rtol=1e-10, method="dopri5",
                                             odeint_interface=interface)
            if event_t < times[-1]:
                state = tuple(s[-1] for s in solution)
                pos, vel = state
                vel = -torch.sigmoid(self.restitution) * vel
                state = (pos + 1e-9 * vel, vel)
            event_times.append(event_t)
            t0 = event_t.reshape(-1)
            n_events += 1
        return event_times


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
def test_learn_physics_program_with_terminal_time(interface):
    model = Physics()
    times = torch.linspace(0.0, 2.0, 21, dtype=D)
    event_times = model.simulate(times, interface)
    # constant acceleration a = tanh(-1.5) * 10 < 0; bounces at height r^2 with restitution 0.5
    a = math.tanh(-1.5) * 10.0
    h = 4.0 - 0.25
    V = math.sqrt(-2 * a * h)
    expect = [V / -a]
    while expect[-1] + 2 * 0.5 ** len(expect) * V / -a < 2.0:
        expect.append(expect[-1] + 2 * 0.5 ** len(expect) * V / -a)
    assert len(expect) == 2
    assert len(event_times) == len(expect) + 1  # the last one is the terminal time
    for got, want in zip(event_times, expect, strict=False):
        assert abs(float(got.detach()) - want) < 1e-8
    # the terminal event sits where the event function switches to zero(s)
    assert 2.0 < float(event_times[-1].detach()) <= 2.0 + 1e-6
    # the terminal event time has no gradient (zeros_like(t) depends on nothing), the others do
    loss = sum(event_times[:-1])
    loss.backward()
    ar = torch.tensor(a, dtype=D, requires_grad=True)
    r = torch.tensor(0.5, dtype=D, requires_grad=True)
    Vr = torch.sqrt(-2 * ar * (4.0 - r ** 2))
    tr = [Vr / -ar]
    for k in range(1, len(expect)):
        tr.append(tr[-1] + 2 * 0.5 ** k * Vr / -ar)
    d_a, d_r = torch.autograd.grad(sum(tr), (ar, r))
    assert abs(float(model.radius.grad) - float(d_r)) < 1e-6
    assert abs(float(model.dynamics_fn.scale.grad) - float(d_a) * math.tanh(-1.5)) < 1e-6


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
@pytest.mark.parametrize("method,opts", [("dopri5", None),
                                         ("rk4", {"step_size": 0.01, "interp": "cubic"})])
def test_event_function_that_differentiates_wrt_t(interface, method, opts):
    # the event "the ball's velocity matches a floor's velocity", the floor's velocity taken by
    # autograd from its position c t^2 / 2 inside event_fn: v0 - g t = c t at t = v0 / (g + c)
    c = torch.tensor(1.5, dtype=D, requires_grad=True)
    f = Dynamics()
    g = -math.tanh(-1.5) * 10.0

    def event_fn(t, state):
        with torch.enable_grad():
            floor = c * t ** 2 / 2
            (floor_vel,) = torch.autograd.grad(floor, t, create_graph=True)
        return state[1] - floor_vel

    v0 = torch.tensor([3.0], dtype=D, requires_grad=True)
    et, sol = odeint_event(f, (torch.tensor([4.0], dtype=D), v0), torch.tensor([0.0], dtype=D),
                           event_fn=event_fn, odeint_interface=interface, method=method,
                           options=opts, rtol=1e-10, atol=1e-12)
    dc, dv = torch.autograd.grad(et.sum(), (c, v0))
    assert abs(float(et.detach()) - 3.0 / (g + 1.5)) < 1e-9
    assert abs(float(dc) + 3.0 / (g + 1.5) ** 2) < 1e-7
    assert abs(float(dv) - 1 / (g + 1.5)) < 1e-7


# ----------------------------------------------------------------- CNF-style float32 func
class CNFFunc(nn.Module):
    """dz/dt = a z + b t from a Linear layer on cat([z, t]); dlogp/dt = -tr(df/dz) = -a."""

    def __init__(self, a=-0.8, b=0.6):
        super().__init__()
        self.net = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.net.weight.copy_(torch.tensor([[a, b]]))
        self.t_dtypes = set()

    def forward(self, t, state):
        z, logp = state
        self.t_dtypes.add(t.dtype)
        dz = self.net(torch.cat([z, t.expand(z.shape[0], 1)], dim=1))
        return dz, -self.net.weight[0, 0] * torch.ones_like(logp)


def _z_exact(z0, t, t0=0.0, a=-0.8, b=0.6):
    c = z0 + b / a ** 2 + b * t0 / a
    return c * math.exp(a * (t - t0)) - b / a ** 2 - b * t / a


@pytest.mark.parametrize("path", ["dopri5", "rk4", "adjoint", "event-rk4", "event-dopri5"])
def test_cnf_float32_func_with_float64_times(path):
    f = CNFFunc()
    z0 = torch.tensor([[1.0], [-0.5], [2.0]])
    logp0 = torch.zeros(3, 1)
    t = torch.linspace(0.0, 1.5, 4, dtype=D)
    if path.startswith("event"):
        method = path.split("-")[1]
        opts = {"step_size": 0.01, "interp": "cubic"} if method == "rk4" else None
        et, (zs, lps) = odeint_event(f, (z0, logp0), t[:1], method=method, options=opts,
                                     event_fn=lambda tt, s: s[0][0] - 0.8, rtol=1e-6,
                                     atol=1e-7)
        lo, hi = 0.0, 0.6  # z(t) = 0.8 for the first sample, by bisection on the closed form
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _z_exact(1.0, mid) > 0.8 else (lo, mid)
        assert et.dtype == D and abs(float(et.detach()) - lo) < 1e-4
        assert abs(float(lps[-1, 0, 0].detach()) - 0.8 * lo) < 1e-4
    else:
        fn = odeint_adjoint if path == "adjoint" else odeint
        method = "rk4" if path == "rk4" else "dopri5"
        opts = {"step_size": 0.01} if method == "rk4" else None
        zs, lps = fn(f, (z0.clone().requires_grad_(path == "adjoint"), logp0), t, method=method,
                     options=opts, rtol=1e-6, atol=1e-7)
        assert zs.dtype == torch.float32
        for j, tj in enumerate(t.tolist()):
            for i, z in enumerate((1.0, -0.5, 2.0)):
                assert abs(float(zs[j, i, 0].detach()) - _z_exact(z, tj)) < 2e-5
            assert abs(float(lps[j, 0, 0].detach()) - 0.8 * tj) < 2e-5
        if path == "adjoint":
            (zs[-1].sum() + lps[-1].sum()).backward()
            assert f.net.weight.grad is not None
    assert f.t_dtypes == {torch.float32}
