"""Option values of the wrong type or out of range are rejected before solving, with an
InputError naming the option, its value and an example; fixed grids are held to
``max_num_steps`` before they are built; meta tensors and running out of memory become
library errors that say what was asked for and what to try."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge import _validate as V
from pydiffbridge import errors as E

D = torch.float64
T = torch.linspace(0.0, 1.0, 3, dtype=D)
NAN, INF = float("nan"), float("inf")


class Counted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return -y


# (option, bad value, method, words in the message)
BAD = [
    ("max_num_steps", 0, "dopri5", "positive integer"),
    ("max_num_steps", -5, "rk4", "positive integer"),
    ("max_num_steps", 1.5, "dopri5", "positive integer"),
    ("max_num_steps", INF, "dopri5", "positive integer"),
    ("max_num_steps", None, "dopri5", "positive integer"),
    ("max_num_steps", True, "dopri5", "positive integer"),
    ("max_num_steps", "100", "dopri5", "positive integer"),
    ("step_size", 0.0, "rk4", "finite number > 0"),
    ("step_size", -0.1, "euler", "finite number > 0"),
    ("step_size", NAN, "rk4", "finite number > 0"),
    ("step_size", INF, "rk4", "finite number > 0"),
    ("step_size", "0.1", "rk4", "finite number > 0"),
    ("first_step", 0.0, "dopri5", "finite number > 0"),
    ("first_step", -1e-3, "dopri5", "finite number > 0"),
    ("first_step", NAN, "tsit5", "finite number > 0"),
    ("max_step", 0.0, "dopri5", "number > 0"),
    ("max_step", NAN, "dopri5", "number > 0"),
    ("max_step", -1.0, "dopri5", "number > 0"),
    ("min_step", -1e-9, "dopri5", "finite number >= 0"),
    ("min_step", INF, "dopri5", "finite number >= 0"),
    ("safety", 0.0, "dopri5", "(0, 1]"),
    ("safety", 1.5, "dopri5", "(0, 1]"),
    ("safety", NAN, "dopri5", "(0, 1]"),
    ("ifactor", 0.5, "dopri5", ">= 1"),
    ("ifactor", INF, "dopri5", ">= 1"),
    ("dfactor", 0.0, "dopri5", "(0, 1]"),
    ("dfactor", 2.0, "dopri5", "(0, 1]"),
    ("pcoeff", NAN, "dopri5", "finite number"),
    ("icoeff", INF, "dopri5", "finite number"),
    ("dcoeff", "0", "dopri5", "finite number"),
    ("max_order", 0, "explicit_adams", "[1, 12]"),
    ("max_order", -1, "implicit_adams", "[1, 12]"),
    ("max_order", 13, "explicit_adams", "[1, 12]"),
    ("max_order", 2.5, "explicit_adams", "[1, 12]"),
    ("max_iters", 0, "implicit_adams", "positive integer"),
    ("max_iters", None, "implicit_adams", "positive integer"),
    ("interp", "quadratic", "rk4", "'linear' or 'cubic'"),
    ("perturb", "yes", "rk4", "True or False"),
    ("perturb", 1, "rk4", "True or False"),
    ("dtype", torch.int64, "dopri5", "floating torch dtype"),
    ("dtype", "float64", "rk4", "floating torch dtype"),
    ("step_t", [0.5, NAN], "dopri5", "finite times"),
    ("jump_t", torch.tensor([[0.5]]), "dopri5", "1-D"),
    ("jump_t", [INF], "dopri5", "finite times"),
    ("jump_t", "0.5", "dopri5", "finite times"),
    ("t_max", 0.0, "dopri5", "nonzero number"),
    ("t_max", NAN, "dopri5", "nonzero number"),
    ("sync_every", 0, "dopri5", "positive integer"),
    ("loop", "gpu", "dopri5", "'auto', 'host' or 'device'"),
]


@pytest.mark.parametrize("option,value,method,words", BAD,
                         ids=[f"{o}-{i}" for i, (o, *_) in enumerate(BAD)])
def test_bad_option_value_rejected_up_front(option, value, method, words):
    f = Counted()
    opts = {option: value}
    if method in ("rk4", "euler", "explicit_adams", "implicit_adams") and option != "step_size":
        opts["step_size"] = 0.1
    with pytest.raises(E.InputError) as info:
        pdb.odeint(f, torch.ones(2, dtype=D), T, method=method, options=opts)
    msg = str(info.value)
    assert f"options['{option}']" in msg and words in msg and "e.g. options={" in msg
    assert f.calls == 0


@pytest.mark.parametrize("option,value", [
    ("max_num_steps", 1e5), ("max_num_steps", 50), ("first_step", None), ("first_step", 1e-3),
    ("max_step", INF), ("max_step", 0.05), ("min_step", 0.0), ("safety", 1.0), ("ifactor", 1.0),
    ("dfactor", 1.0), ("pcoeff", 0.2), ("dtype", torch.float32), ("dtype", None),
    ("jump_t", 0.5), ("jump_t", torch.tensor([0.25, 0.5])), ("step_t", []), ("t_max", -INF),
    ("sync_every", 3), ("loop", "host")])
def test_good_adaptive_option_values_solve(option, value):
    out = pdb.odeint(Counted(), torch.ones(2, dtype=D), T, rtol=1e-9, atol=1e-11,
                     options={option: value})
    torch.testing.assert_close(out[-1], torch.full((2,), math.exp(-1.0), dtype=D), rtol=1e-6,
                               atol=1e-8)


@pytest.mark.parametrize("order", [1, 2, 4, 6])
@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_adams_orders_in_range_are_accurate(method, order):
    # max_order <= 0 used to return nonsense (1e32 for exp(-5) here); orders in range converge
    t = torch.linspace(0.0, 5.0, 3, dtype=D)
    out = pdb.odeint(Counted(), torch.ones(2, dtype=D), t, method=method,
                     options={"step_size": 0.01, "max_order": order})
    assert abs(float(out[-1, 0]) - math.exp(-5.0)) < (1e-3 if order == 1 else 1e-5)


def test_min_step_above_max_step_rejected():
    with pytest.raises(E.InputError, match=r"min_step'\]=1.0 exceeds .*max_step'\]=0.1"):
        pdb.odeint(Counted(), torch.ones(2, dtype=D), T,
                   options={"min_step": 1.0, "max_step": 0.1})


def test_options_must_be_a_dict_and_method_a_name():
    with pytest.raises(E.InputError, match="options must be a dict"):
        pdb.odeint(Counted(), torch.ones(2, dtype=D), T, options=[("step_size", 0.1)])
    with pytest.raises(E.UnknownOptionError, match="keys must be option names"):
        pdb.odeint(Counted(), torch.ones(2, dtype=D), T, options={1: 2})
    with pytest.raises(E.UnknownMethodError, match="method must be a method name"):
        pdb.odeint(Counted(), torch.ones(2, dtype=D), T, method=["rk4"])


def test_unknown_options_still_rejected_by_name():
    with pytest.raises(E.UnknownOptionError, match="not understood"):
        pdb.solve(Counted(), torch.ones(2, dtype=D), T, options={"stepsize": 0.1})
    with pytest.warns(E.UnknownOptionWarning, match="stepsize"):  # torchdiffeq's interface
        pdb.odeint(Counted(), torch.ones(2, dtype=D), T, options={"stepsize": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", E.UnknownOptionWarning)
        with pytest.raises(E.UnknownOptionWarning):
            pdb.odeint_adjoint(Counted(), torch.ones(2, dtype=D), T, options={"stepsize": 0.1})


def test_scipy_and_batched_and_adjoint_options_checked_too():
    pytest.importorskip("scipy")
    f = Counted()
    with pytest.raises(E.InputError, match=r"options\['first_step'\].*nan"):
        pdb.odeint(f, torch.ones(2, dtype=D), T, backend="scipy", options={"first_step": NAN})
    with pytest.raises(E.InputError, match=r"options\['max_num_steps'\]"):
        pdb.odeint(f, torch.ones(2, dtype=D), T, backend="scipy", options={"max_num_steps": -1})
    with pytest.raises(E.InputError, match=r"options\['safety'\]"):
        pdb.solve(f, torch.ones(3, 2, dtype=D), T, batch_dims=1, options={"safety": 0})
    with pytest.raises(E.InputError, match=r"options\['max_outputs_per_step'\]"):
        pdb.solve(f, torch.ones(3, 2, dtype=D), T, batch_dims=1,
                  options={"max_outputs_per_step": 0})
    with pytest.raises(E.InputError, match=r"adjoint_options\['max_step'\]"):
        pdb.odeint_adjoint(f, torch.ones(2, dtype=D), T, adjoint_params=(),
                           adjoint_options={"max_step": -1.0})
    with pytest.raises(E.InputError, match="adjoint_options must be a dict"):
        pdb.odeint_adjoint(f, torch.ones(2, dtype=D), T, adjoint_params=(), adjoint_options=3)
    assert f.calls == 0


# -- fixed grids and max_num_steps ----------------------------------------------------------
@pytest.mark.parametrize("method", ["euler", "rk4", "explicit_adams"])
def test_tiny_fixed_step_is_refused_before_the_grid_is_built(method):
    f = Counted()
    with pytest.raises(E.MaxStepsExceededError) as info:
        pdb.odeint(f, torch.ones(2, dtype=D), torch.tensor([0.0, 1e3], dtype=D), method=method,
                   options={"step_size": 1e-12})
    msg = str(info.value)
    assert "1,000,000,000,000,000 steps" in msg and "max_num_steps=100,000" in msg
    assert "larger step_size" in msg and f.calls == 0
    assert isinstance(info.value, E.SolverError)


def test_fixed_grid_honours_max_num_steps():
    f = Counted()
    kw = dict(method="rk4", options={"step_size": 1e-3, "max_num_steps": 999})
    with pytest.raises(E.MaxStepsExceededError, match=r"needs 1,000 steps.*max_num_steps=999"):
        pdb.odeint(f, torch.ones(2, dtype=D), T, **kw)
    kw["options"]["max_num_steps"] = 1000
    out = pdb.odeint(f, torch.ones(2, dtype=D), T, **kw)
    torch.testing.assert_close(out[-1], torch.full((2,), math.exp(-1.0), dtype=D))
    # the grid t itself counts too
    t = torch.linspace(0, 1, 12, dtype=D)
    with pytest.raises(E.MaxStepsExceededError, match=r"needs 11 steps \(t has 12 times\)"):
        pdb.odeint(f, torch.ones(2, dtype=D), t, method="euler", options={"max_num_steps": 10})
    # a grid_constructor's grid is the user's own
    pdb.odeint(f, torch.ones(2, dtype=D), T, method="euler",
               options={"max_num_steps": 1, "grid_constructor": lambda fn, y0, tt: tt})


def test_solve_returns_status_and_raise_on_failure_for_fixed_grid_limit():
    with pytest.raises(E.MaxStepsExceededError):
        pdb.solve(Counted(), torch.ones(2, dtype=D), T, method="rk4",
                  options={"step_size": 1e-9})


# -- meta tensors -------------------------------------------------------------------------
def test_meta_tensors_rejected_up_front():
    meta = torch.ones(2, dtype=D, device="meta")
    with pytest.raises(E.InputError, match=r"y0 is on the meta device.*shape \(2,\)"):
        pdb.odeint(Counted(), meta, T)
    with pytest.raises(E.InputError, match=r"y0\[0\] is on the meta device"):
        pdb.odeint(lambda t, y: y, (torch.ones(2, device="meta"), torch.ones(2, device="meta")),
                   T)
    with pytest.raises(E.InputError, match="t is on the meta device"):
        pdb.odeint(Counted(), torch.ones(2, dtype=D), torch.ones(3, device="meta"))
    with pytest.raises(E.InputError, match="rtol is on the meta device"):
        pdb.odeint(Counted(), torch.ones(2, dtype=D), T, rtol=torch.ones(2, device="meta"))
    with pytest.raises(E.InputError, match="y0 is on the meta device"):
        pdb.solve(Counted(), torch.ones(3, 2, device="meta"), T, batch_dims=1)
    lin = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(E.InputError, match="func's parameters are on the meta device"):
        pdb.odeint(_Wrap(lin), torch.ones(2), T.float())


class _Wrap(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t, y):
        return self.inner(y)


# -- out of memory ------------------------------------------------------------------------
def _raiser(exc):
    def f(t, y):
        raise exc
    return f


OOMS = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough "
                     "memory: you tried to allocate 80000000000 bytes."),
        MemoryError()]


@pytest.mark.parametrize("exc", OOMS, ids=["cuda", "cpu", "python"])
@pytest.mark.parametrize("entry", ["odeint", "batched", "scipy", "adjoint"])
def test_out_of_memory_becomes_a_solver_memory_error(exc, entry):
    y0 = torch.ones(1000, 3, dtype=D)
    with pytest.raises(V.SolverMemoryError) as info:
        if entry == "odeint":
            pdb.odeint(_raiser(exc), y0, T)
        elif entry == "batched":
            pdb.solve(_raiser(exc), y0, T, batch_dims=1)
        elif entry == "scipy":
            pytest.importorskip("scipy")
            pdb.odeint(_raiser(exc), y0, T, backend="scipy")
        else:
            pdb.odeint_adjoint(_raiser(exc), y0.requires_grad_(True), T, adjoint_params=())
    msg = str(info.value)
    assert "out of memory" in msg and "3,000 elements" in msg and "(1000, 3)" in msg
    assert "smaller batch" in msg and "float32" in msg
    if entry == "batched":
        assert "1000 samples" in msg
    err = info.value
    assert isinstance(err, E.SolverError) and isinstance(err, MemoryError)
    assert isinstance(err, torch.OutOfMemoryError) and err.__cause__ is exc


def test_other_runtime_errors_pass_through_unchanged():
    exc = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as info:
        pdb.odeint(_raiser(exc), torch.ones(2, dtype=D), T)
    assert info.value is exc
