"""Hostile tolerances: negative, NaN, Inf, per-component tensors with a bad entry, both zero,
tensors requiring grad, wrong types.  Every entry point rejects them up front (before func is
called once) with an InputError that names the tolerance and its value; the legal edge cases
(rtol=0 with atol>0, atol=0 with rtol>0) solve."""

from __future__ import annotations

import math

import pytest
import torch
from _models import Decay

import pydiffbridge as pdb
from pydiffbridge import errors as E

D = torch.float64
NAN, INF = float("nan"), float("inf")


def _t():
    return torch.linspace(0.0, 1.0, 4, dtype=D)


ENTRIES = {
    "odeint": lambda f, y0, **kw: pdb.odeint(f, y0, _t(), **kw),
    "odeint_adjoint": lambda f, y0, **kw: pdb.odeint_adjoint(f, y0, _t(), **kw),
    "solve": lambda f, y0, **kw: pdb.solve(f, y0, _t(), **kw),
    "solve_batched": lambda f, y0, **kw: pdb.solve(f, y0[None], _t(), batch_dims=1, **kw),
    "scipy": lambda f, y0, **kw: pdb.odeint(f, y0, _t(), backend="scipy", **kw),
    "fixed": lambda f, y0, **kw: pdb.odeint(f, y0, _t(), method="implicit_adams",
                                            options={"step_size": 0.1}, **kw),
}

BAD = [
    (-1e-6, "-1e-06", "negative"),
    (NAN, "nan", None),
    (INF, "inf", None),
    (-INF, "-inf", "negative"),
    (torch.tensor([1e-6, NAN, 1e-6], dtype=D), "nan", "index 1"),
    (torch.tensor([1e-6, 1e-6, -1.0], dtype=D), "-1.0", "index 2"),
    (torch.tensor(INF, dtype=D), "inf", None),
    ("1e-6", "str", None),
    (None, "None", None),
    (True, "bool", None),
]


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("which", ["rtol", "atol"])
@pytest.mark.parametrize("value,shown,where", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_tolerance_rejected_before_any_step(entry, which, value, shown, where):
    if entry == "scipy":
        pytest.importorskip("scipy")
    f = Decay()
    y0 = torch.ones(3, dtype=D)
    with pytest.raises(E.InputError, match=which) as info:
        ENTRIES[entry](f, y0, **{which: value})
    msg = str(info.value)
    assert shown in msg and "finite number >= 0" in msg and f"{which}=1e-" in msg
    if where:
        assert where in msg
    assert f.calls == 0  # checked up front: func never ran


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_tolerance_requiring_grad_is_rejected(entry):
    f = Decay()
    rtol = torch.tensor(1e-6, dtype=D, requires_grad=True)
    with pytest.raises(E.InputError, match=r"rtol requires grad.*detach"):
        ENTRIES[entry](f, torch.ones(3, dtype=D), rtol=rtol)
    assert f.calls == 0


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_rtol_and_atol_both_zero_rejected(entry):
    f = Decay()
    with pytest.raises(E.InputError, match=r"rtol=0 and atol=0.*atol > 0"):
        ENTRIES[entry](f, torch.ones(3, dtype=D), rtol=0.0, atol=0)
    assert f.calls == 0


def test_both_zero_for_one_component_names_it():
    rtol = torch.tensor([1e-6, 0.0, 0.0], dtype=D)
    atol = torch.tensor([0.0, 1e-9, 0.0], dtype=D)
    with pytest.raises(E.InputError, match=r"both 0 for component 2"):
        pdb.odeint(Decay(), torch.ones(3, dtype=D), _t(), rtol=rtol, atol=atol)
    with pytest.raises(E.InputError, match=r"both 0 for component 2"):
        pdb.solve(Decay(), torch.ones(1, 3, dtype=D), _t(), rtol=rtol, atol=atol, batch_dims=1)
    # a zero tensor against a zero number
    with pytest.raises(E.InputError, match=r"both 0 for component 0"):
        pdb.odeint(Decay(), torch.ones(3, dtype=D), _t(), rtol=torch.zeros(3, dtype=D), atol=0.0)


@pytest.mark.filterwarnings("ignore:At least one element of `rtol` is too small")
@pytest.mark.parametrize("entry", ["odeint", "solve_batched", "scipy", "fixed"])
@pytest.mark.parametrize("rtol,atol", [(0.0, 1e-10), (1e-8, 0.0), (0, 1e-10),
                                       (torch.tensor([0.0, 1e-8, 1e-8], dtype=D), 1e-10)])
def test_one_zero_tolerance_is_legal(entry, rtol, atol):
    if entry == "scipy":
        pytest.importorskip("scipy")
    y = ENTRIES[entry](Decay(), torch.ones(3, dtype=D), rtol=rtol, atol=atol)
    y = y.ys[:, 0] if isinstance(y, pdb.Solution) else y
    exact = torch.exp(-_t())[:, None].expand(4, 3)
    err = 2e-3 if entry == "fixed" else 1e-6  # fixed: step_size=0.1 (tolerances steer only
    torch.testing.assert_close(y, exact, rtol=0.0, atol=err)  # its corrector iterations)


def test_tuple_state_tolerances_checked_per_part():
    y0 = (torch.ones(2, dtype=D), torch.ones(3, dtype=D))

    def f(t, y):
        return (-y[0], -y[1])

    good = (torch.full((2,), 1e-8, dtype=D), 1e-8)
    out = pdb.odeint(f, y0, _t(), rtol=good, atol=1e-10)
    torch.testing.assert_close(out[1][-1], torch.full((3,), math.exp(-1.0), dtype=D))
    with pytest.raises(E.InputError, match=r"rtol\[1\] is nan"):
        pdb.odeint(f, y0, _t(), rtol=(1e-8, NAN))
    with pytest.raises(E.InputError, match=r"atol\[0\] has the value -1.0"):
        pdb.odeint(f, y0, _t(), atol=(torch.tensor([1e-9, -1.0], dtype=D), 1e-9))


@pytest.mark.parametrize("name", ["adjoint_rtol", "adjoint_atol"])
@pytest.mark.parametrize("value", [NAN, -1.0, INF, torch.tensor([NAN], dtype=D)])
def test_bad_adjoint_tolerance_rejected_even_without_gradients(name, value):
    f = Decay()
    with torch.no_grad():  # no backward pass will run: the value is still wrong
        with pytest.raises(E.InputError, match=rf"{name}.*None to reuse"):
            pdb.odeint_adjoint(f, torch.ones(3, dtype=D), _t(), **{name: value})
    with pytest.raises(E.InputError, match=name):
        pdb.solve(f, torch.ones(3, dtype=D), _t(), gradient="adjoint", **{name: value})
    with pytest.raises(E.InputError, match=name):
        pdb.solve(f, torch.ones(1, 3, dtype=D), _t(), gradient="adjoint", batch_dims=1,
                  **{name: value})
    assert f.calls == 0


def test_adjoint_tolerances_both_zero_rejected():
    f = Decay()
    with pytest.raises(E.InputError, match=r"adjoint_rtol=0 and adjoint_atol=0"):
        pdb.odeint_adjoint(f, torch.ones(3, dtype=D, requires_grad=True), _t(),
                           adjoint_rtol=0.0, adjoint_atol=0.0)
    assert f.calls == 0


def test_adjoint_with_zero_rtol_and_positive_atol_gives_gradients():
    f = Decay()
    y0 = torch.ones(3, dtype=D, requires_grad=True)
    pdb.odeint_adjoint(f, y0, _t(), rtol=1e-9, atol=1e-10, adjoint_rtol=0.0,
                       adjoint_atol=1e-10)[-1].sum().backward()
    torch.testing.assert_close(y0.grad, torch.full((3,), math.exp(-1.0), dtype=D),
                               rtol=1e-6, atol=1e-8)


def test_ensemble_tolerances_checked_before_julia_starts():
    from pydiffbridge.ensemble import solve_ensemble

    src = "f(u, p, t) = SVector(-u[1])"
    y0s, t = torch.ones(3, 1, dtype=D), _t()
    for kw, words in [({"rtol": NAN}, "rtol is nan"), ({"atol": -1.0}, "atol is -1.0"),
                      ({"rtol": 0.0, "atol": 0.0}, "rtol=0 and atol=0"),
                      ({"rtol": torch.tensor([1e-6, 1e-6])}, "rtol must be a number"),
                      ({"max_num_steps": 0}, "max_num_steps must be a positive integer")]:
        with pytest.raises(E.InputError, match=words):
            solve_ensemble(src, y0s, t, **kw)
