"""The shared-step solve on the branch-free loop (``options={"loop": "device"}``, the default on
CUDA): no value is read back to the host inside a step.

References: closed forms, SciPy's DOP853 at tight tolerance, and the host loop (same
controller and norm, so the same step sequence).
"""

from __future__ import annotations

import math

import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge import errors as E
from pydiffbridge.solution import Status

scipy_integrate = pytest.importorskip("scipy.integrate")

DT = torch.float64


def vdp(t, y):
    return torch.stack([y[1], 2.0 * (1 - y[0] ** 2) * y[1] - y[0]])


@pytest.mark.parametrize("grad", [True, False])  # False: both loops on their reused buffers
@pytest.mark.parametrize("sync_every", [1, 4])  # 1: NumPy bookkeeping (CPU); 4: torch, as on CUDA
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_same_steps_as_host_loop_and_matches_scipy(method, sync_every, grad):
    y0 = torch.tensor([2.0, 0.0], dtype=DT)
    t = torch.linspace(0.0, 6.0, 7, dtype=DT)
    kw = dict(rtol=1e-8, atol=1e-10, method=method)
    with torch.set_grad_enabled(grad):
        dev = pdb.solve(vdp, y0, t, options={"loop": "device", "sync_every": sync_every}, **kw)
        host = pdb.solve(vdp, y0, t, options={"loop": "host"}, **kw)
    assert dev.success and isinstance(dev.stats.nfe, int)
    assert (dev.stats.nfe, dev.stats.steps, dev.stats.accepted) == \
        (host.stats.nfe, host.stats.steps, host.stats.accepted)
    torch.testing.assert_close(dev.ys, host.ys, rtol=1e-9, atol=1e-11)
    ref = scipy_integrate.solve_ivp(lambda s, v: [v[1], 2.0 * (1 - v[0] ** 2) * v[1] - v[0]],
                                    (0.0, 6.0), [2.0, 0.0], method="DOP853", rtol=1e-13,
                                    atol=1e-13, t_eval=t.numpy())
    torch.testing.assert_close(dev.ys, torch.from_numpy(ref.y.T), rtol=1e-5, atol=1e-6)


def test_tuple_state_tolerance_tensors_and_direct_gradients():
    # (x, v)' = (v, -w^2 x): x(T) = cos(wT); dx(T)/dw = -T sin(wT)
    w = torch.tensor(1.3, dtype=DT, requires_grad=True)
    T = 2.0
    state0 = (torch.ones(3, dtype=DT), torch.zeros(3, dtype=DT))
    t = torch.tensor([0.0, T], dtype=DT)
    f = lambda tt, s: (s[1], -(w**2) * s[0])  # noqa: E731
    atol = (torch.full((3,), 1e-12, dtype=DT), 1e-11)
    kw = dict(rtol=1e-10, atol=atol)
    sol = pdb.solve(f, state0, t, options={"loop": "device"}, **kw)
    host = pdb.solve(f, state0, t, options={"loop": "host"}, **kw)
    assert sol.stats.steps == host.stats.steps
    x = sol.ys[0][-1]
    torch.testing.assert_close(x.detach(), torch.full((3,), math.cos(1.3 * T), dtype=DT),
                               rtol=1e-8, atol=1e-9)
    x.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor(-3 * T * math.sin(1.3 * T), dtype=DT),
                               rtol=1e-7, atol=1e-8)


def test_odeint_and_adjoint_run_on_it(monkeypatch):
    from pydiffbridge.backends import torch as tb

    calls = []
    real = tb._solve_device_loop
    monkeypatch.setattr(tb, "_solve_device_loop", lambda *a: calls.append(a[2]) or real(*a))
    k = torch.tensor(0.7, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT)
    t = torch.linspace(0, 1.5, 4, dtype=DT)
    f = lambda tt, y: -k * y  # noqa: E731
    ys = pdb.odeint_adjoint(f, y0, t, rtol=1e-10, atol=1e-12, adjoint_params=(k,),
                            options={"loop": "device"})
    torch.testing.assert_close(ys.detach(), y0 * torch.exp(-0.7 * t)[:, None], rtol=1e-8,
                               atol=1e-10)
    ys[-1].sum().backward()
    torch.testing.assert_close(k.grad, torch.tensor(-1.5 * 3.0 * math.exp(-0.7 * 1.5),
                                                    dtype=DT), rtol=1e-7, atol=1e-9)
    assert len(calls) == 4  # the forward and the backward solve over each of 3 intervals


def test_failures_give_status_and_errors():
    f = lambda tt, y: torch.where(tt > 0.5, float("nan"), 1.0) * y  # noqa: E731
    y0 = torch.ones(2, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    sol = pdb.solve(f, y0, t, options={"loop": "device"})
    assert sol.status == Status.NONFINITE and "NaN" in sol.message
    assert torch.isnan(sol.ys[-1]).all()
    with pytest.raises(E.NonFiniteError):
        pdb.odeint(f, y0, t, options={"loop": "device"})
    sol = pdb.solve(vdp, torch.tensor([2.0, 0.0], dtype=DT), t,
                    options={"loop": "device", "max_num_steps": 3}, rtol=1e-10, atol=1e-12)
    assert sol.status == Status.MAX_STEPS and sol.stats.steps == 3


def test_what_it_cannot_serve_is_refused_clearly():
    y0 = torch.ones(2, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    f = lambda tt, y: -y  # noqa: E731
    with pytest.raises(E.InputError, match="step_t"):
        pdb.solve(f, y0, t, options={"loop": "device", "step_t": [0.5]})
    with pytest.raises(E.InputError, match="custom options"):
        pdb.solve(f, y0, t, options={"loop": "device", "norm": lambda x: x.abs().max()})
    with pytest.raises(E.InputError, match="loop"):
        pdb.solve(f, y0, t, options={"loop": "gpu"})
    # 'auto' on the CPU keeps the host loop, whatever else is asked for
    sol = pdb.solve(f, y0, t, options={"step_t": [0.5]})
    torch.testing.assert_close(sol.ys[-1], y0 * math.exp(-1), rtol=1e-6, atol=1e-8)
