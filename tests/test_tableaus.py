"""Tableaux and interpolants checked against the Runge-Kutta order conditions (independent of
the solver loop)."""

import numpy as np
import pytest
import torch

from pydiffbridge import odeint
from pydiffbridge.solvers.interp import interp_weights
from pydiffbridge.solvers.tableaus import DP5_BHAT_DP, TABLEAUS

D = torch.float64


def _arrays(tab, b=None):
    s = tab.stages
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        A[i, : len(row)] = row
    c = np.array(tab.c)
    return A, c, np.array(b if b is not None else tab.b, dtype=float)[:s]


def _order_residuals(A, c, b, order):
    """Residuals of the Butcher order conditions up to order 4 (and the bushy tree of 5)."""
    res = [b.sum() - 1]
    if order >= 2:
        res.append(b @ c - 1 / 2)
    if order >= 3:
        res += [b @ c**2 - 1 / 3, b @ (A @ c) - 1 / 6]
    if order >= 4:
        res += [b @ c**3 - 1 / 4, b @ (c * (A @ c)) - 1 / 8, b @ (A @ c**2) - 1 / 12,
                b @ (A @ (A @ c)) - 1 / 24]
    if order >= 5:
        res += [b @ c**4 - 1 / 5]
    return np.abs(res).max()


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_order_conditions(name):
    tab = TABLEAUS[name]
    A, c, b = _arrays(tab)
    assert np.allclose(A.sum(1), c, atol=1e-14), "row sums must equal the nodes"
    assert _order_residuals(A, c, b, min(tab.order, 5)) < 1e-13
    if tab.e is not None and tab.error_kind == "embedded":
        bhat = np.array(tab.b + (0.0,) * (len(tab.e) - len(tab.b))) - np.array(tab.e)
        assert _order_residuals(A, c, bhat[: tab.stages], tab.order - 1) < 1e-13
        assert abs(bhat[tab.stages:].sum() + bhat[: tab.stages].sum() - 1) < 1e-13


def test_both_dopri5_companions_are_fourth_order():
    A, c, _ = _arrays(TABLEAUS["dopri5"])
    assert _order_residuals(A, c, np.array([float(x) for x in DP5_BHAT_DP]), 4) < 1e-13


@pytest.mark.parametrize("name", ["dopri5", "tsit5", "bosh3", "dopri8", "rk4"])
def test_interpolant_consistency(name):
    tab = TABLEAUS[name]
    theta = torch.linspace(0, 1, 11, dtype=D)
    W = interp_weights(tab, theta)
    # y' = 1 must be interpolated exactly: weights sum to theta
    assert torch.allclose(W.sum(1), theta, atol=1e-14)
    # at theta = 1 the interpolant reproduces the step's own solution y0 + h * sum(b_i k_i)
    w1 = W[-1].clone()
    if tab.fsal:  # f(t1, y1) is the last stage itself
        w1[tab.stages - 1] += w1[tab.stages]
        w1[tab.stages] = 0.0
    b = torch.zeros(tab.stages + 1, dtype=D)
    b[: len(tab.b)] = torch.tensor(tab.b, dtype=D)
    assert torch.allclose(w1, b, atol=1e-13)


@pytest.mark.parametrize("name,degree", [("dopri5", 4), ("tsit5", 4), ("bosh3", 3)])
def test_dense_output_exact_for_polynomials(name, degree):
    # y' = (degree) t^(degree-1): y = t^degree; an interpolant of order >= degree is exact
    t = torch.linspace(0.0, 2.0, 41, dtype=D)
    ys = odeint(lambda t, y: degree * t ** (degree - 1) * torch.ones_like(y),
                torch.zeros(1, dtype=D), t, method=name, rtol=1e-3, atol=1e-3)
    assert torch.allclose(ys[:, 0], t**degree, atol=1e-11)
