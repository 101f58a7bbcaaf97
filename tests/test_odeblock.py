"""Tests of pydiffbridge.nn.odeblock against closed forms, matrix exponentials and SciPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pydiffbridge.errors import InputError
from pydiffbridge.nn.odeblock import (
    ConcatConv2d,
    ConcatLinear,
    ConvODEFunc,
    NFECounter,
    ODEBlock,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)


class Linear(nn.Module):
    """dz/dt = z A^T, solution z(t) = z0 expm(t A)^T."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.a.T


class TanhNet(nn.Module):
    def __init__(self, d: int = 3) -> None:
        super().__init__()
        self.lin = ConcatLinear(d, d)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(t, z))


def _a(d: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
def test_linear_forward_matches_matrix_exponential(gradient: str) -> None:
    a = _a()
    x = torch.randn(5, 3, dtype=torch.float64)
    block = ODEBlock(Linear(a), t=(0.0, 1.5), gradient=gradient, **TIGHT)
    ref = x @ torch.linalg.matrix_exp(1.5 * a).T
    torch.testing.assert_close(block(x), ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
def test_gradients_match_matrix_exponential(gradient: str) -> None:
    a = _a(seed=1)
    w = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    block = ODEBlock(Linear(a), gradient=gradient, **TIGHT)
    (block(x) * w).sum().backward()

    a_ref = a.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ torch.linalg.matrix_exp(a_ref).T * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(block.func.a.grad, a_ref.grad, rtol=1e-7, atol=1e-8)


def test_adjoint_and_direct_gradients_agree_nonlinear() -> None:
    torch.manual_seed(0)
    func = TanhNet().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    grads = {}
    for gradient in ("adjoint", "direct"):
        func.zero_grad()
        xx = x.clone().requires_grad_(True)
        block = ODEBlock(func, t=(0.0, 2.0), gradient=gradient, **TIGHT)
        (block(xx) ** 2).sum().backward()
        grads[gradient] = [xx.grad] + [p.grad.clone() for p in func.parameters()]
    for ga, gd in zip(grads["adjoint"], grads["direct"], strict=True):
        torch.testing.assert_close(ga, gd, rtol=1e-6, atol=1e-8)


def test_forward_matches_scipy_nonlinear() -> None:
    scipy_integrate = pytest.importorskip("scipy.integrate")
    torch.manual_seed(1)
    func = TanhNet().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    block = ODEBlock(func, t=(0.0, 2.0), **TIGHT)
    with torch.no_grad():
        out = block(x)

        def rhs(t: float, z: np.ndarray) -> np.ndarray:
            zt = torch.from_numpy(z).reshape(2, 3)
            return func(torch.tensor(t, dtype=torch.float64), zt).reshape(-1).numpy()

        sol = scipy_integrate.solve_ivp(rhs, (0.0, 2.0), x.reshape(-1).numpy(), method="DOP853",
                                        rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.reshape(-1).numpy(), sol.y[:, -1], rtol=1e-7, atol=1e-9)


def test_time_concatenation_closed_form() -> None:
    # ConcatLinear with weight only on the t column: dz/dt = c * t, so z(1) = z0 + c / 2.
    lin = ConcatLinear(2, 2)
    with torch.no_grad():
        lin.linear.weight.zero_()
        lin.linear.bias.zero_()
        lin.linear.weight[:, 0] = torch.tensor([3.0, -1.0])

    class F(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.lin(t, z)

    block = ODEBlock(F().double(), t=(0.0, 1.0), **TIGHT)
    x = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(block(x), x + torch.tensor([1.5, -0.5], dtype=torch.float64))


def test_concat_conv_depends_on_time() -> None:
    conv = ConcatConv2d(2, 3, 3, 1, 1).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    # shifting t by dt adds dt * (sum of the t-channel kernel), a bias-like term, inside.
    y0 = conv(torch.tensor(0.0, dtype=torch.float64), x)
    y1 = conv(torch.tensor(1.0, dtype=torch.float64), x)
    kt = conv.conv.weight[:, 0]  # (out, 3, 3)
    ones = torch.ones(1, 1, 5, 5, dtype=torch.float64)
    expected = torch.nn.functional.conv2d(ones, kt.unsqueeze(1), padding=1)
    torch.testing.assert_close(y1 - y0, expected.expand_as(y0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
def test_conv_block_shapes_and_nfe(gradient: str) -> None:
    torch.manual_seed(0)
    block = ODEBlock(ConvODEFunc(8), gradient=gradient)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    assert block.nfe_forward > 0 and block.nfe_backward == 0
    y.square().mean().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(p.grad is not None for p in block.parameters())
    if gradient == "adjoint":
        assert block.nfe_backward > 0
    else:  # autograd replays the recorded operations, func is not called again
        assert block.nfe_backward == 0


def test_fixed_step_nfe_is_step_count() -> None:
    # Euler with h = 0.1 on [0, 1]: exactly 10 evaluations.
    block = ODEBlock(Linear(_a()), method="euler", options={"step_size": 0.1})
    with torch.no_grad():
        block(torch.randn(2, 3, dtype=torch.float64))
    assert block.nfe_forward == 10


def test_tolerance_change_changes_nfe_and_accuracy() -> None:
    a = _a(seed=3)
    x = torch.randn(3, 3, dtype=torch.float64)
    ref = x @ torch.linalg.matrix_exp(2.0 * a).T
    block = ODEBlock(Linear(a), t=(0.0, 2.0), rtol=1e-2, atol=1e-2)
    results = {}
    for tol in (1e-2, 1e-8):
        block.rtol = block.atol = tol
        with torch.no_grad():
            err = (block(x) - ref).abs().max().item()
        results[tol] = (block.nfe_forward, err)
    assert results[1e-8][0] > results[1e-2][0]
    assert results[1e-8][1] < results[1e-2][1]
    assert results[1e-8][1] < 1e-6


def test_trajectory_matches_closed_form() -> None:
    a = _a(seed=4)
    x = torch.randn(2, 3, dtype=torch.float64)
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    block = ODEBlock(Linear(a), **TIGHT)
    with torch.no_grad():
        zs = block.trajectory(x, ts)
    ref = torch.stack([x @ torch.linalg.matrix_exp(t * a).T for t in ts])
    # intermediate outputs may come from the solver's dense output, a little less accurate
    torch.testing.assert_close(zs, ref, rtol=1e-7, atol=1e-8)


def test_counter_phases() -> None:
    calls = []

    class F(nn.Module):
        def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            calls.append(t)
            return -z

    c = NFECounter(F())
    c(torch.tensor(0.0), torch.ones(1))
    c.phase = "backward"
    c(torch.tensor(0.0), torch.ones(1))
    c(torch.tensor(0.0), torch.ones(1))
    assert (c.nfe_forward, c.nfe_backward, len(calls)) == (1, 2, 3)
    c.reset()
    assert (c.nfe_forward, c.nfe_backward, c.phase) == (0, 0, "forward")


@pytest.mark.parametrize("kwargs", [dict(gradient="checkpoint"), dict(t=(1.0, 1.0)),
                                    dict(t=(0.0, 1.0, 2.0)), dict(rtol=0.0)])
def test_bad_arguments_raise_input_error(kwargs: dict) -> None:
    with pytest.raises(InputError):
        ODEBlock(Linear(_a()), **kwargs)


def test_non_module_func_raises() -> None:
    with pytest.raises(InputError, match="nn.Module"):
        ODEBlock(lambda t, z: -z)  # type: ignore[arg-type]
