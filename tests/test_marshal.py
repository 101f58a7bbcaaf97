"""torch <-> numpy marshalling (pydiffbridge.backends._marshal) and its use by the SciPy
backend: zero-copy views, dtype/device restore, tuple and non-contiguous states."""

import math

import numpy as np
import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge.backends._marshal import NumpyRHS, to_numpy, to_torch, tol_to_numpy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_numpy_is_a_view_of_cpu_tensors(dtype):
    x = torch.randn(5, dtype=dtype)
    a = to_numpy(x)
    assert np.shares_memory(a, x.numpy())
    x[2] = 7.0  # writes through
    assert a[2] == 7.0
    assert a.dtype == x.numpy().dtype


def test_to_numpy_keeps_non_contiguous_tensors_as_views():
    base = torch.randn(4, 6, dtype=torch.float64)
    for x in (base[:, ::2], base.t(), base[1:, 3]):
        assert not x.is_contiguous()
        a = to_numpy(x)
        assert np.shares_memory(a, base.numpy())
        np.testing.assert_array_equal(a, x.tolist())


def test_to_numpy_converts_when_asked_and_for_bfloat16():
    x = torch.tensor([1.5, -2.25], dtype=torch.float32)
    a = to_numpy(x, np.dtype(np.float64))
    assert a.dtype == np.float64 and not np.shares_memory(a, x.numpy())
    np.testing.assert_array_equal(a, [1.5, -2.25])
    b = to_numpy(torch.tensor([1.0, 3.0], dtype=torch.bfloat16))
    np.testing.assert_array_equal(b, [1.0, 3.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
def test_round_trip_restores_dtype_and_values(dtype):
    x = torch.randn(7, dtype=dtype)
    y = to_torch(to_numpy(x), dtype, "cpu")
    assert y.dtype == dtype and torch.equal(x, y)
    # through the engine's float64 and back
    z = to_torch(to_numpy(x, np.dtype(np.complex128 if dtype.is_complex else np.float64)),
                 dtype, "cpu")
    assert z.dtype == dtype and torch.equal(x, z)


def test_to_torch_shares_memory_when_dtype_matches():
    a = np.arange(6, dtype=np.float64)
    t = to_torch(a, torch.float64, "cpu")
    assert np.shares_memory(a, t.numpy())
    t32 = to_torch(a, torch.float32, "cpu")
    assert t32.dtype == torch.float32 and not np.shares_memory(a, t32.numpy())
    ro = np.arange(3, dtype=np.float64)
    ro.flags.writeable = False
    assert torch.equal(to_torch(ro, torch.float64, "cpu"), torch.tensor([0.0, 1.0, 2.0],
                                                                       dtype=torch.float64))


def test_tolerances_as_numpy():
    assert tol_to_numpy(1e-6) == 1e-6
    assert tol_to_numpy(torch.tensor(1e-3)) == pytest.approx(1e-3)
    v = tol_to_numpy(torch.tensor([1e-3, 1e-4], dtype=torch.float32))
    assert isinstance(v, np.ndarray) and v.dtype == np.float64
    np.testing.assert_allclose(v, [1e-3, 1e-4], rtol=1e-6)


def test_numpy_rhs_calls_func_without_grad_and_counts():
    seen = {}
    w = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float32))

    def func(t, y):
        seen["grad"] = torch.is_grad_enabled()
        seen["t"] = t
        seen["dtype"] = y.dtype
        return w * y

    rhs = NumpyRHS(func, torch.float32, torch.device("cpu"), torch.float64)
    out = rhs(0.5, np.array([1.0, 2.0]))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [2.0, 4.0])
    assert seen["grad"] is False and seen["dtype"] == torch.float32
    assert seen["t"].dtype == torch.float64 and float(seen["t"]) == 0.5
    assert rhs.calls == 1 and not rhs.nonfinite
    rhs(0.0, np.array([math.inf, 0.0]))
    assert rhs.nonfinite


def test_numpy_rhs_input_is_zero_copy_for_float64():
    captured = []
    rhs = NumpyRHS(lambda t, y: captured.append(y) or y, torch.float64, torch.device("cpu"),
                   torch.float64)
    a = np.array([1.0, 2.0, 3.0])
    rhs(0.0, a)
    assert np.shares_memory(captured[0].numpy(), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scipy_backend_tuple_state_round_trip(dtype):
    # x' = -x (shape [2]), v' = 2 v (shape [1, 2]); closed form
    def f(t, state):
        x, v = state
        return -x, 2 * v

    x0 = torch.tensor([1.0, 2.0], dtype=dtype)
    v0 = torch.tensor([[0.5, -1.0]], dtype=dtype)
    t = torch.linspace(0, 1, 5, dtype=dtype)
    xs, vs = pdb.odeint(f, (x0, v0), t, backend="scipy", method="DOP853", rtol=1e-9, atol=1e-11)
    assert xs.dtype == dtype and vs.dtype == dtype
    assert xs.shape == (5, 2) and vs.shape == (5, 1, 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-8
    e = torch.exp(-t)[:, None] * x0
    g = torch.exp(2 * t)[:, None, None] * v0
    assert torch.allclose(xs, e, atol=tol, rtol=tol)
    assert torch.allclose(vs, g, atol=tol, rtol=tol)


def test_scipy_backend_non_contiguous_y0():
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4) / 10
    y0 = base.t()  # non-contiguous [4, 3]
    t = torch.tensor([0.0, 0.7], dtype=torch.float64)
    ys = pdb.odeint(lambda t, y: -0.5 * y, y0, t, backend="scipy", method="RK45", rtol=1e-10,
                    atol=1e-12)
    assert ys.shape == (2, 4, 3)
    assert torch.allclose(ys[-1], y0 * math.exp(-0.35), atol=1e-9)
    assert torch.equal(base, torch.arange(12, dtype=torch.float64).reshape(3, 4) / 10)
