"""The joint adjoint over a batch stepped per sample (``solve(..., batch_dims=k,
gradient="adjoint")``): against direct backprop, single-sample adjoints, gradcheck and closed
forms."""

from __future__ import annotations

import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge import errors as E

DT = torch.float64


class _TimeNet(torch.nn.Module):
    """A small time-dependent MLP; ``t`` is the batch's times (shape ``(B,)``) or a scalar."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.l1 = torch.nn.Linear(2, 6).to(DT)
        self.l2 = torch.nn.Linear(6, 2).to(DT)
        with torch.no_grad():
            for q in self.parameters():
                q.copy_(0.7 * torch.randn(q.shape, generator=g, dtype=DT))

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.3 * torch.sin(t))[..., None]


def _grads(net, y0, loss):
    return torch.autograd.grad(loss, (y0, *net.parameters()))


@pytest.mark.parametrize("gradient", ["adjoint", "checkpointed"])
def test_adjoint_matches_direct_and_single_sample_adjoint(gradient):
    net = _TimeNet()
    y0 = torch.tensor([[1.0, -0.5], [0.2, 0.8], [-1.2, 0.3]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=DT)[:, None, None]  # weights the output times
    kw = dict(rtol=1e-11, atol=1e-12, batch_dims=1)
    adj = pdb.solve(net, y0, t, gradient=gradient, adjoint_rtol=1e-11, adjoint_atol=1e-12, **kw)
    assert adj.stats.nfe.shape == (3,)  # the forward is per-sample
    g_adj = _grads(net, y0, (w * adj.ys ** 2).sum())
    g_dir = _grads(net, y0, (w * pdb.solve(net, y0, t, **kw).ys ** 2).sum())
    # reference: one plain (non-batched) odeint_adjoint per sample, parameter grads summed
    g_ref = [torch.zeros_like(g) for g in g_adj]
    for b in range(3 if gradient == "adjoint" else 0):
        yb = y0.detach()[b].clone().requires_grad_(True)
        ys = pdb.odeint_adjoint(net, yb, t, rtol=1e-11, atol=1e-12, adjoint_rtol=1e-11,
                                adjoint_atol=1e-12)
        gb = _grads(net, yb, (w[:, 0] * ys ** 2).sum())
        g_ref[0][b] = gb[0]
        for r, x in zip(g_ref[1:], gb[1:], strict=True):
            r += x
    for a, d, r in zip(g_adj, g_dir, g_ref, strict=True):
        torch.testing.assert_close(a, d, rtol=1e-7, atol=1e-9)
        if gradient == "adjoint":
            torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)


def test_adjoint_gradcheck_tiny_batch():
    t = torch.tensor([0.0, 0.3, 0.6], dtype=DT)

    def fn(y0, W, b):
        f = lambda tt, y: torch.tanh(y @ W.T + b)  # noqa: E731
        return pdb.solve(f, y0, t, rtol=1e-12, atol=1e-12, batch_dims=1, gradient="adjoint",
                         adjoint_params=(W, b)).ys

    g = torch.Generator().manual_seed(3)
    y0 = torch.randn(2, 2, generator=g, dtype=DT, requires_grad=True)
    W = torch.randn(2, 2, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (y0, W, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("per_sample_t", [False, True])
def test_adjoint_time_dependent_closed_form(per_sample_t):
    # y' = -k_b cos(t) y  =>  y(T) = y0 exp(-k_b (sin T - sin t0)),
    # dy(T)/dk_b = -(sin T - sin t0) y(T), dy(T)/dy0 = y(T) / y0
    k = torch.tensor([0.5, 1.0, 2.0], dtype=DT, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0], [-0.5]], dtype=DT, requires_grad=True)
    seen = []

    def f(tt, y):
        seen.append(tuple(tt.shape))
        return -k[:, None] * torch.cos(tt)[:, None] * y

    if per_sample_t:  # the last sample runs backwards in time
        t = torch.stack([torch.linspace(0, 1, 4), torch.linspace(0.5, 3, 4),
                         torch.linspace(2, -1, 4)]).to(DT)
    else:
        t = torch.linspace(0.2, 2.0, 4, dtype=DT).expand(3, 4)
    sol = pdb.solve(f, y0, t if per_sample_t else t[0], rtol=1e-11, atol=1e-12, batch_dims=1,
                    gradient="adjoint", adjoint_params=(k,), adjoint_rtol=1e-11,
                    adjoint_atol=1e-12)
    sol.ys[-1].sum().backward()
    assert set(seen) == {(3,)}  # forward and backward both give func the batch's times
    kd, y0d = k.detach(), y0.detach()[:, 0]
    s = torch.sin(t[:, -1]) - torch.sin(t[:, 0])
    yT = y0d * torch.exp(-kd * s)
    torch.testing.assert_close(sol.ys[-1, :, 0].detach(), yT, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(k.grad, -s * yT, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(y0.grad[:, 0], yT / y0d, rtol=1e-7, atol=1e-9)
    assert sol.stats.nfe_backward > 0 and sol.stats.steps_backward > 0


def test_adjoint_shared_time_gradients_closed_form():
    # y' = -k_b y: d sum_b y_b(T) / dT = -sum_b k_b y_b(T), d/dt0 = +sum_b k_b y_b(T)
    k = torch.tensor([0.5, 1.5], dtype=DT)
    y0 = torch.tensor([[1.0], [3.0]], dtype=DT)
    t = torch.tensor([0.1, 0.6, 1.3], dtype=DT, requires_grad=True)
    sol = pdb.solve(lambda tt, y: -k[:, None] * y, y0, t, rtol=1e-11, atol=1e-12,
                    batch_dims=1, gradient="adjoint")
    sol.ys[-1].sum().backward()
    yT = y0[:, 0] * torch.exp(-k * 1.2)
    exact = torch.stack([(k * yT).sum(), torch.zeros((), dtype=DT), -(k * yT).sum()])
    torch.testing.assert_close(t.grad, exact, rtol=1e-7, atol=1e-9)


def test_adjoint_stats_and_tuple_state_two_batch_dims():
    # x'' = -w^2 x as (x, v), batch shape (2, 2): x(T) = cos(wT), dx(T)/dw = -T sin(wT)
    w = torch.tensor([[0.5, 1.0], [1.5, 2.0]], dtype=DT, requires_grad=True)
    x0, v0 = torch.ones(2, 2, 1, dtype=DT), torch.zeros(2, 2, 1, dtype=DT)
    T = 1.2

    def f(tt, state):
        assert tt.shape == (2, 2)
        x, v = state
        return v, -(w[..., None] ** 2) * x

    t = torch.tensor([0.0, T], dtype=DT)
    kw = dict(rtol=1e-10, atol=1e-12, batch_dims=2)
    sol = pdb.solve(f, (x0, v0), t, gradient="adjoint", adjoint_params=(w,), **kw)
    direct = pdb.solve(f, (x0, v0), t, **kw)
    assert torch.equal(sol.stats.nfe, direct.stats.nfe)  # the same per-sample forward
    assert sol.stats.nfe_backward == 0
    sol.ys[0][-1].sum().backward()
    assert sol.stats.nfe_backward > 0 and sol.stats.steps_backward > 0
    wd = w.detach()
    torch.testing.assert_close(w.grad, -T * torch.sin(wd * T), rtol=1e-7, atol=1e-8)
    with torch.no_grad():  # nothing to differentiate: no backward work is set up
        plain = pdb.solve(f, (x0, v0), t, gradient="adjoint", **kw)
    torch.testing.assert_close(plain.ys[0], direct.ys[0].detach(), rtol=0, atol=0)


def test_adjoint_bad_inputs_raise():
    y0 = torch.ones(2, 1, dtype=DT, requires_grad=True)
    f = lambda tt, y: -y  # noqa: E731
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=DT, requires_grad=True)
    with pytest.raises(E.InputError, match="per-sample output times"):
        pdb.solve(f, y0, t, batch_dims=1, gradient="adjoint")
