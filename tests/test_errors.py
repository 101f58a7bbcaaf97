"""Every documented failure raises a pydiffbridge error that says what, where and what to try."""

import math

import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge import errors as E
from pydiffbridge import odeint, solve
from pydiffbridge.solution import Status

D = torch.float64
T2 = torch.tensor([0.0, 1.0], dtype=D)


def decay(t, y):
    return -y


def test_all_errors_share_the_base_class():
    for name in E.__all__:
        if not name.endswith("Warning"):
            assert issubclass(getattr(E, name), E.PyDiffBridgeError)
    assert issubclass(E.InputError, ValueError)
    assert issubclass(E.SolverError, RuntimeError)
    assert issubclass(E.BackendUnavailableError, ImportError)


def test_nan_in_y0():
    with pytest.raises(E.NonFiniteError, match="y0 contains NaN"):
        odeint(decay, torch.tensor([1.0, math.nan], dtype=D), T2)


def test_nan_from_func_names_the_time():
    def f(t, y):  # finite until t = 0.5, then NaN
        return torch.where(t < 0.5, -y, torch.full_like(y, math.nan))

    with pytest.raises(E.NonFiniteError, match=r"t=0\.5"):
        odeint(f, torch.ones(2, dtype=D), T2)
    sol = solve(f, torch.ones(2, dtype=D), torch.tensor([0.0, 0.25, 1.0], dtype=D))
    assert sol.status == Status.NONFINITE and not sol.success
    assert torch.isfinite(sol.ys[1]).all() and torch.isnan(sol.ys[2]).all()


def test_nan_from_func_at_start():
    with pytest.raises(E.NonFiniteError, match="initial state"):
        odeint(lambda t, y: y * math.nan, torch.ones(1, dtype=D), T2)


def test_step_size_underflow_names_t_and_dt():
    # y' = y^2, y(0) = 1 blows up at t = 1: the step size must collapse before t = 2
    with pytest.raises(E.StepSizeUnderflowError) as info:
        odeint(lambda t, y: y * y, torch.ones(1, dtype=D), torch.tensor([0.0, 2.0], dtype=D),
               rtol=1e-8, atol=1e-8)
    msg = str(info.value)
    assert "t=" in msg and "dt=" in msg and "min_step" in msg and "stiff" in msg
    t_fail = float(msg.split("t=")[1].split(":")[0])
    assert abs(t_fail - 1.0) < 1e-3


def test_max_num_steps():
    with pytest.raises(E.MaxStepsExceededError, match=r"max_num_steps=20.*partial result"):
        odeint(lambda t, y: torch.cos(10 * t) * y, torch.ones(1, dtype=D),
               torch.tensor([0.0, 50.0], dtype=D), options={"max_num_steps": 20})
    sol = solve(lambda t, y: torch.cos(10 * t) * y, torch.ones(1, dtype=D),
                torch.tensor([0.0, 0.001, 50.0], dtype=D), options={"max_num_steps": 20})
    assert sol.status == Status.MAX_STEPS and sol.stats.steps == 20
    assert torch.isfinite(sol.ys[1]).all() and torch.isnan(sol.ys[2]).all()


@pytest.mark.parametrize("t, match", [
    (torch.tensor([0.0, 1.0, 0.5], dtype=D), "strictly increasing or strictly decreasing"),
    (torch.tensor([0.0, 1.0, 1.0], dtype=D), "index 2"),
    (torch.zeros(2, 2, dtype=D), "one-dimensional"),
    (torch.tensor([], dtype=D), "is empty"),
    (torch.tensor([0.0, math.inf], dtype=D), "NaN or Inf"),
])
def test_bad_time_grids(t, match):
    with pytest.raises(E.TimeGridError, match=match):
        odeint(decay, torch.ones(1, dtype=D), t)


def test_func_wrong_shape_and_dtype():
    with pytest.raises(E.RHSError, match=r"shape \(3,\).*state has shape \(2,\)"):
        odeint(lambda t, y: torch.ones(3, dtype=D), torch.ones(2, dtype=D), T2)
    with pytest.raises(E.RHSError, match="dtype torch.int64.*floating-point"):
        odeint(lambda t, y: y.long(), torch.ones(2, dtype=D), T2)
    with pytest.raises(E.RHSError, match="must return a torch.Tensor"):
        odeint(lambda t, y: 1.0, torch.ones(2, dtype=D), T2)
    with pytest.raises(E.RHSError, match="tuple"):
        odeint(lambda t, y: y[0], (torch.ones(2, dtype=D), torch.ones(1, dtype=D)), T2)


def test_unknown_method_option_backend():
    with pytest.raises(E.UnknownMethodError, match="dopri5.*Radau"):
        odeint(decay, torch.ones(1, dtype=D), T2, method="rk45x")
    with pytest.raises(E.UnknownOptionError, match="step_size"):
        solve(decay, torch.ones(1, dtype=D), T2, method="dopri5", options={"step_size": 0.1})
    with pytest.raises(E.UnknownOptionError, match="first_step"):
        solve(decay, torch.ones(1, dtype=D), T2, method="rk4", options={"first_step": 0.1})
    # odeint is torchdiffeq's interface: it warns, ignores the option and solves as without it
    with pytest.warns(E.UnknownOptionWarning, match="step_size"):
        ys = odeint(decay, torch.ones(1, dtype=D), T2, method="dopri5", options={"step_size": 0.1})
    assert float(ys[-1]) == float(odeint(decay, torch.ones(1, dtype=D), T2, method="dopri5")[-1])
    with pytest.raises(E.UnknownBackendError, match="available"):
        odeint(decay, torch.ones(1, dtype=D), T2, backend="matlab")


def test_bad_y0_and_tolerances():
    with pytest.raises(E.InputError, match="floating point"):
        odeint(decay, torch.ones(2, dtype=torch.int64), T2)
    with pytest.raises(E.InputError, match="must be a torch.Tensor"):
        odeint(decay, [1.0, 2.0], T2)
    with pytest.raises(E.InputError, match="one dtype"):
        odeint(lambda t, y: y, (torch.ones(1), torch.ones(1, dtype=D)), T2)
    with pytest.raises(E.InputError, match="does not broadcast"):
        odeint(decay, torch.ones(3, dtype=D), T2, rtol=torch.ones(2, dtype=D))
    with pytest.raises(E.InputError, match="gradient must be one of"):
        solve(decay, torch.ones(1, dtype=D), T2, gradient="magic")


def test_min_step_accepts_instead_of_underflow():
    sol = solve(lambda t, y: y * y, torch.ones(1, dtype=D), torch.tensor([0.0, 0.999], dtype=D),
                rtol=1e-12, atol=1e-12, options={"min_step": 1e-3})
    assert sol.status == Status.SUCCESS


def test_public_names():
    for name in ("odeint", "odeint_adjoint", "odeint_event", "solve", "Solution", "Stats",
                 "Status", "PyDiffBridgeError"):
        assert hasattr(pdb, name)
