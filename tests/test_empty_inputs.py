"""Empty inputs: a state without elements returns an empty result at once (no step, no call
of func, status SUCCESS, gradients of zeros), a tuple state with some empty parts integrates
its other parts, and empty time grids are a TimeGridError."""

from __future__ import annotations

import math

import pytest
import torch
from _models import Decay as Counted

import pydiffbridge as pdb
from pydiffbridge import errors as E
from pydiffbridge.solution import Status

D = torch.float64
T = torch.linspace(0.0, 1.0, 5, dtype=D)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0), (2, 0, 5)])
@pytest.mark.parametrize("method,backend,options", [
    ("dopri5", "torch", None), ("tsit5", "torch", {"loop": "device"}), ("dopri8", "torch", None),
    ("rk4", "torch", {"step_size": 1e-3}), ("explicit_adams", "torch", None),
    ("RK45", "scipy", None), ("LSODA", "scipy", None)])
def test_empty_state_returns_empty_result_at_once(shape, method, backend, options):
    if backend == "scipy":
        pytest.importorskip("scipy")
    f = Counted()
    y0 = torch.ones(shape, dtype=D)
    sol = pdb.solve(f, y0, T, method=method, backend=backend, options=options)
    assert sol.ys.shape == (len(T), *shape) and sol.ys.dtype == D
    assert sol.success and sol.status == Status.SUCCESS and sol.message == ""
    assert sol.stats.nfe == 0 and sol.stats.steps == 0 and f.calls == 0
    assert sol.ts is not None and sol.ts.shape == T.shape
    out = pdb.odeint(f, y0, T, method=method, backend=backend, options=options)
    assert out.shape == (len(T), *shape) and f.calls == 0


def test_empty_state_with_many_output_times_and_backwards_time():
    t = torch.linspace(3.0, -2.0, 1000, dtype=D)
    out = pdb.odeint(Counted(), torch.ones(7, 0, dtype=torch.float32), t)
    assert out.shape == (1000, 7, 0) and out.dtype == torch.float32


@pytest.mark.parametrize("how", ["odeint", "odeint_adjoint", "checkpointed", "interpolated",
                                 "scipy"])
def test_empty_state_gradients_are_zeros_of_the_inputs_shapes(how):
    f = Counted()
    y0 = torch.ones(3, 0, dtype=D, requires_grad=True)
    t = T.clone().requires_grad_(True)
    if how == "odeint":
        out = pdb.odeint(f, y0, t)
    elif how == "odeint_adjoint":
        out = pdb.odeint_adjoint(f, y0, t)
    elif how == "scipy":
        pytest.importorskip("scipy")
        out = pdb.odeint(f, y0, t, backend="scipy")
    else:
        out = pdb.solve(f, y0, t, gradient=how).ys
    assert out.shape == (len(T), 3, 0) and out.requires_grad
    (out.sum() + 0.0 * t.sum()).backward() if how == "odeint" else out.sum().backward()
    assert y0.grad is not None and y0.grad.shape == y0.shape
    if how != "odeint":
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
        assert f.k.grad is not None and float(f.k.grad) == 0.0
    assert f.calls == 0


def test_empty_tuple_state():
    f = Counted()
    y0 = (torch.ones(0, dtype=D), torch.ones(2, 0, dtype=D, requires_grad=True))
    out = pdb.odeint(f, y0, T)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(5, 0), (5, 2, 0)]
    out = pdb.odeint_adjoint(f, y0, T)
    out[1].sum().backward()
    assert y0[1].grad.shape == (2, 0) and f.calls == 0


@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_tuple_state_with_some_empty_parts_integrates_the_rest(backend):
    if backend == "scipy":
        pytest.importorskip("scipy")
    f = Counted()
    y0 = (torch.ones(0, 4, dtype=D), torch.ones(2, dtype=D), torch.ones(0, dtype=D))
    out = pdb.odeint(f, y0, T, rtol=1e-10, atol=1e-12, backend=backend)
    assert [o.shape for o in out] == [(5, 0, 4), (5, 2), (5, 0)]
    torch.testing.assert_close(out[1], torch.exp(-T)[:, None].expand(5, 2), rtol=1e-8,
                               atol=1e-10)
    sol = pdb.solve(f, tuple(v[None] for v in y0), T, rtol=1e-10, atol=1e-12, batch_dims=1) \
        if backend == "torch" else None
    if sol is not None:
        assert sol.success
        torch.testing.assert_close(sol.ys[1][:, 0], torch.exp(-T)[:, None].expand(5, 2),
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(0, 2), (3, 0), (0, 0), (2, 3, 0)])
@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_batched_empty(shape, gradient):
    f = Counted()
    y0 = torch.ones(shape, dtype=D, requires_grad=gradient == "adjoint")
    sol = pdb.solve(f, y0, T, batch_dims=1, gradient=gradient)
    assert sol.ys.shape == (len(T), *shape) and sol.success
    assert sol.status.shape == shape[:1] and sol.stats.nfe.shape == shape[:1]
    assert int(sol.stats.steps.sum()) == 0 and f.calls == 0
    assert sol.ts.shape == T.shape
    if gradient == "adjoint":
        sol.ys.sum().backward()
        assert y0.grad.shape == y0.shape


def test_batched_empty_per_sample_times_and_tuple():
    y0 = (torch.ones(3, 0, dtype=D), torch.ones(3, 0, 2, dtype=D))
    t = torch.stack([T, T + 1, T * 2])
    sol = pdb.solve(Counted(), y0, t, batch_dims=1)
    assert [v.shape for v in sol.ys] == [(5, 3, 0), (5, 3, 0, 2)] and sol.ts.shape == (3, 5)
    sol = pdb.solve(Counted(), torch.ones(0, 2, dtype=D), T, batch_dims=1)
    assert sol.ys.shape == (5, 0, 2) and sol.status.shape == (0,)


def test_empty_state_still_validates_inputs():
    y0 = torch.ones(0, 3, dtype=D)
    with pytest.raises(E.InputError, match="rtol is nan"):
        pdb.odeint(Counted(), y0, T, rtol=math.nan)
    with pytest.raises(E.RHSError, match=r"func\(t, y\)"):
        pdb.odeint(lambda y: y, y0, T)
    with pytest.raises(E.InputError, match="max_order"):
        pdb.odeint(Counted(), y0, T, method="explicit_adams", options={"max_order": 0})
    with pytest.raises(E.InputError, match="event_fn"):
        pdb.odeint(Counted(), y0, T[:1], event_fn=lambda t, y: t - 0.5)
    with pytest.raises(E.InputError, match="rtol is nan"):
        pdb.solve(Counted(), y0, T, rtol=math.nan, batch_dims=1)


@pytest.mark.parametrize("y0", [torch.ones(2, dtype=D), torch.ones(0, 2, dtype=D)])
def test_empty_t_is_a_time_grid_error(y0):
    empty = torch.tensor([], dtype=D)
    with pytest.raises(E.TimeGridError, match=r"\bt\b.*empty|at least"):
        pdb.odeint(Counted(), y0, empty)
    with pytest.raises(E.TimeGridError):
        pdb.odeint(Counted(), y0, [])
    with pytest.raises(E.TimeGridError):
        pdb.odeint_adjoint(Counted(), y0, empty)
    with pytest.raises(E.TimeGridError, match="at least 2"):
        pdb.solve(Counted(), y0[None], empty, batch_dims=1)
    with pytest.raises(E.TimeGridError):
        pdb.odeint(Counted(), y0, empty, backend="scipy")
