"""solve(..., gradient=GradientSettings(...)): the adjoint_* keywords grouped in one object."""

import pytest
import torch
from _models import Decay

import pydiffbridge as pdb
from pydiffbridge import GradientSettings
from pydiffbridge import errors as E

D = torch.float64


def _grads(**kw):
    f = Decay(0.7)
    y0 = torch.tensor([1.5], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=D)
    sol = pdb.solve(f, y0, t, rtol=1e-10, atol=1e-12, **kw)
    sol.ys[-1].sum().backward()
    return float(f.k.grad), float(y0.grad), sol.stats


@pytest.mark.parametrize("mode", ["adjoint", "checkpointed", "interpolated"])
def test_settings_object_matches_keywords_and_closed_form(mode):
    # y(T) = y0 exp(-kT): d/dk = -T y0 exp(-kT), d/dy0 = exp(-kT)
    import math
    exact_k, exact_y0 = -2.0 * 1.5 * math.exp(-1.4), math.exp(-1.4)
    kw = _grads(gradient=mode, adjoint_rtol=1e-11, adjoint_atol=1e-13, adjoint_method="dopri8")
    obj = _grads(gradient=GradientSettings(mode, rtol=1e-11, atol=1e-13, method="dopri8"))
    assert kw[:2] == obj[:2]  # the same settings: the same arithmetic
    assert kw[2].nfe_backward == obj[2].nfe_backward > 0
    assert abs(obj[0] - exact_k) < 1e-8 and abs(obj[1] - exact_y0) < 1e-8


def test_checkpoints_field_is_the_adjoint_option():
    a = _grads(gradient=GradientSettings("checkpointed", checkpoints=3))
    b = _grads(gradient="checkpointed", adjoint_options={"checkpoints": 3})
    assert a[:2] == b[:2] and a[2].nfe_backward == b[2].nfe_backward


def test_settings_and_keywords_together_are_refused():
    with pytest.raises(E.InputError, match="not both"):
        _grads(gradient=GradientSettings("adjoint"), adjoint_method="rk4")


def test_settings_are_checked_when_made():
    with pytest.raises(E.InputError, match="gradient must be one of"):
        GradientSettings("backprop")
    with pytest.raises(E.InputError):
        GradientSettings("adjoint", rtol=-1.0)
    with pytest.raises(E.InputError, match="GradientSettings"):
        _grads(gradient=3)
