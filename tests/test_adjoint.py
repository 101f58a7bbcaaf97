"""Adjoint bridge: gradients against finite differences (gradcheck), closed forms and direct
backprop; the checkpointed variant on a dissipative problem; the seminorm; tuple states; events.
"""

from __future__ import annotations

import math

import pytest
import torch
from _models import MLP, Linear
from _models import rotated as _rotated
from _models import vanloan as _vanloan

import pydiffbridge as pdb
from pydiffbridge import errors as E

DT = torch.float64
ADAPTIVE = ["dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"]


# ------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("method", ADAPTIVE)
def test_gradcheck_every_adaptive_method(method):
    W = torch.tensor([[-0.3, 0.8], [-0.7, -0.2]], dtype=DT, requires_grad=True)
    b = torch.tensor([0.2, -0.1], dtype=DT, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DT, requires_grad=True)
    t = torch.tensor([0.1, 0.3, 0.45], dtype=DT, requires_grad=True)
    low_order = method in ("bosh3", "fehlberg2", "adaptive_heun")
    tol = {"adaptive_heun": 1e-6, "fehlberg2": 1e-7, "bosh3": 1e-8}.get(method, 1e-10)

    def func(tt, y):  # plain function: its tensors are declared through adjoint_params
        return W @ torch.tanh(y) + b * torch.cos(3 * tt)

    def fn(y0, t, W_, b_):
        return pdb.odeint_adjoint(func, y0, t, rtol=tol, atol=tol, method=method,
                                  adjoint_params=(W_, b_))

    # full Jacobian check for high-order methods; one random projection for low-order ones
    assert torch.autograd.gradcheck(fn, (y0, t, W, b), eps=1e-6, atol=2e-5, rtol=1e-4,
                                    fast_mode=low_order)


# ---------------------------------------------------------------------- closed forms, direct
@pytest.mark.parametrize("gradient", ["adjoint", "checkpointed"])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_system_closed_form(gradient, reverse):
    A = torch.tensor([[-0.2, 1.0], [-0.8, -0.1]], dtype=DT)
    f = Linear(A)
    y0 = torch.tensor([1.0, -0.5], dtype=DT, requires_grad=True)
    tv = [0.2, 0.7, 1.1, 1.5]
    if reverse:
        tv = tv[::-1]
    t = torch.tensor(tv, dtype=DT, requires_grad=True)
    cs = torch.tensor([[0.0, 0.0], [1.0, 0.5], [0.0, 0.0], [-0.3, 2.0]], dtype=DT)
    sol = pdb.solve(f, y0, t, rtol=1e-10, atol=1e-12, gradient=gradient)
    (sol.ys * cs).sum().backward()

    t0, y0d = tv[0], y0.detach()
    ref_A = sum(_vanloan(A, c, y0d, ti - t0) for c, ti in zip(cs, tv, strict=True))
    ref_y0 = sum(torch.linalg.matrix_exp(A.T * (ti - t0)) @ c for c, ti in zip(cs, tv, strict=True))
    ys = [torch.linalg.matrix_exp(A * (ti - t0)) @ y0d for ti in tv]
    ref_t = torch.stack([c @ (A @ y) for c, y in zip(cs, ys, strict=True)])
    ref_t[0] = -sum(c @ torch.linalg.matrix_exp(A * (ti - t0)) @ (A @ y0d)
                    for c, ti in zip(cs, tv, strict=True))
    torch.testing.assert_close(f.A.grad, ref_A, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(y0.grad, ref_y0, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(t.grad, ref_t, rtol=1e-7, atol=1e-8)
    assert sol.stats.nfe_backward > 0 and sol.stats.steps_backward > 0


def test_adjoint_matches_direct_backprop():
    f = MLP()
    y0 = torch.tensor([0.4, -0.2], dtype=DT, requires_grad=True)
    t = torch.linspace(0, 1.5, 4, dtype=DT)
    target = torch.tensor([0.1, 0.3], dtype=DT)
    grads = []
    for solver in (pdb.odeint, pdb.odeint_adjoint):
        ys = solver(f, y0, t, rtol=1e-11, atol=1e-12)
        loss = ((ys - target) ** 2).sum()
        grads.append(torch.autograd.grad(loss, (y0, *f.parameters())))
    for gd, ga in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gd, rtol=1e-7, atol=1e-9)


def test_backward_nfe_counts_the_calls_made_in_backward():
    f = MLP()
    y0 = torch.tensor([0.4, -0.2], dtype=DT, requires_grad=True)
    sol = pdb.solve(f, y0, torch.tensor([0.0, 1.0], dtype=DT), gradient="adjoint")
    assert sol.stats.nfe == f.calls and sol.stats.nfe_backward == 0
    before = f.calls
    sol.ys[-1].sum().backward()
    assert sol.stats.nfe_backward == f.calls - before > 0


# ------------------------------------------------------------------- dissipative, checkpointed
def test_checkpointed_recovers_accuracy_on_dissipative_problem():
    # eigenvalues -1 and -25: back-solving z from t=1 amplifies errors in the fast direction by
    # ~e^25, which corrupts dL/dA; re-solving forward from checkpoints does not.
    A = _rotated(25.0)
    c = torch.tensor([1.0, 0.3], dtype=DT)
    y0v = torch.tensor([1.0, 2.0], dtype=DT)
    ref = _vanloan(A, c, y0v, 1.0)
    errs = {}
    for gradient in ("adjoint", "checkpointed"):
        f = Linear(A)
        sol = pdb.solve(f, y0v.clone(), torch.tensor([0.0, 1.0], dtype=DT), rtol=1e-8,
                        atol=1e-12, gradient=gradient)
        (sol.ys[-1] @ c).backward()
        errs[gradient] = float((f.A.grad - ref).norm() / ref.norm())
    assert errs["adjoint"] > 1e-2, errs
    assert errs["checkpointed"] < 1e-6, errs


def test_checkpoint_option_validated():
    f = Linear(_rotated(2.0))
    y0 = torch.ones(2, dtype=DT, requires_grad=True)
    with pytest.raises(E.InputError, match="checkpoints"):
        pdb.solve(f, y0, torch.tensor([0.0, 1.0], dtype=DT), gradient="checkpointed",
                  adjoint_options={"checkpoints": -1})


# -------------------------------------------------------------------------------- seminorm
def test_seminorm_same_gradient_fewer_backward_evaluations():
    y0 = torch.tensor([0.4, -0.2], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=DT)
    out = {}
    for norm in (None, "seminorm"):
        f = MLP(hidden=32, seed=1)
        sol = pdb.solve(f, y0, t, rtol=1e-6, atol=1e-8, gradient="adjoint",
                        adjoint_options={"norm": norm} if norm else None)
        g = torch.autograd.grad(sol.ys[-1].sum(), (y0, *f.parameters()))
        out[norm] = (torch.cat([v.reshape(-1) for v in g]), sol.stats.nfe_backward)
    g_full, nfe_full = out[None]
    g_semi, nfe_semi = out["seminorm"]
    assert nfe_semi < nfe_full, (nfe_semi, nfe_full)
    assert float((g_semi - g_full).norm() / g_full.norm()) < 1e-4


def test_bad_adjoint_norm_raises():
    f = MLP()
    y0 = torch.ones(2, dtype=DT, requires_grad=True)
    with pytest.raises(E.UnknownOptionError, match="seminorm"):
        pdb.odeint_adjoint(f, y0, torch.tensor([0.0, 1.0], dtype=DT),
                           adjoint_options={"norm": "l2"})


# ------------------------------------------------------------------------ structure, inputs
class Oscillator(torch.nn.Module):
    def __init__(self, omega: float):
        super().__init__()
        self.omega = torch.nn.Parameter(torch.tensor(omega, dtype=DT))

    def forward(self, t, state):
        x, v = state
        return v, -self.omega ** 2 * x


def test_tuple_state_closed_form():
    f = Oscillator(1.3)
    x0 = torch.tensor([[0.7]], dtype=DT, requires_grad=True)
    v0 = torch.tensor([[-0.4]], dtype=DT, requires_grad=True)
    T = 2.0
    xs, vs = pdb.odeint_adjoint(f, (x0, v0), torch.tensor([0.0, T], dtype=DT), rtol=1e-10,
                                atol=1e-12)
    assert xs.shape == (2, 1, 1) and vs.shape == (2, 1, 1)
    xs[-1].sum().backward()
    w, a, b = 1.3, 0.7, -0.4  # x(T) = a cos(wT) + b/w sin(wT)
    torch.testing.assert_close(float(x0.grad), math.cos(w * T), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(float(v0.grad), math.sin(w * T) / w, rtol=1e-8, atol=1e-9)
    dw = -a * T * math.sin(w * T) - b / w ** 2 * math.sin(w * T) + b * T / w * math.cos(w * T)
    torch.testing.assert_close(float(f.omega.grad), dw, rtol=1e-8, atol=1e-9)


def test_plain_function_needs_adjoint_params():
    k = torch.tensor(0.5, dtype=DT, requires_grad=True)
    y0 = torch.ones(1, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.raises(E.InputError, match="adjoint_params"):
        pdb.odeint_adjoint(lambda tt, y: -k * y, y0, t)
    ys = pdb.odeint_adjoint(lambda tt, y: -k * y, y0, t, rtol=1e-10, atol=1e-12,
                            adjoint_params=(k,))
    ys[-1].sum().backward()  # y(1) = y0 e^{-k}
    torch.testing.assert_close(float(k.grad), -math.exp(-0.5), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(float(y0.grad), math.exp(-0.5), rtol=1e-8, atol=1e-10)


def test_adjoint_params_must_be_tensors():
    y0 = torch.ones(1, dtype=DT, requires_grad=True)
    with pytest.raises(E.InputError, match="adjoint_params"):
        pdb.odeint_adjoint(lambda tt, y: -y, y0, torch.tensor([0.0, 1.0], dtype=DT),
                           adjoint_params=(0.5,))


# ----------------------------------------------------------------------------------- events
class Ball(torch.nn.Module):
    def __init__(self, g: float):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(g, dtype=DT))

    def forward(self, t, y):
        return torch.stack([y[1], -self.g])


@pytest.mark.parametrize("gradient", ["adjoint", "checkpointed"])
def test_event_time_gradient_closed_form(gradient):
    f = Ball(9.0)
    y0 = torch.tensor([2.0, 1.5], dtype=DT, requires_grad=True)
    t0 = torch.tensor([0.25], dtype=DT, requires_grad=True)
    sol = pdb.solve(f, y0, t0, rtol=1e-10, atol=1e-12, gradient=gradient,
                    event_fn=lambda t, y: y[0], options={"t_max": 10.0})
    loss = sol.event_t + 0.5 * sol.ys[-1, 1]
    loss.backward()
    h, v, g = 2.0, 1.5, 9.0
    root = math.sqrt(v * v + 2 * g * h)
    tstar = 0.25 + (v + root) / g  # impact time; impact velocity is -root
    torch.testing.assert_close(float(sol.event_t.detach()), tstar, rtol=1e-9, atol=1e-9)
    # d/dθ [t* + v(t*)/2] with dt*/dh = 1/root, dt*/dv = (1 + v/root)/g,
    # dt*/dg = -(v + root)/g² + h/(g root); dv(t*)/dh = -g/root, dv(t*)/dv = -v/root,
    # dv(t*)/dg = -h/root; dt*/dt0 = 1
    d_h = 1 / root - 0.5 * g / root
    d_v = (1 + v / root) / g - 0.5 * v / root
    d_g = -(v + root) / g ** 2 + h / (g * root) - 0.5 * h / root
    torch.testing.assert_close(y0.grad, torch.tensor([d_h, d_v], dtype=DT), rtol=1e-7,
                               atol=1e-8)
    torch.testing.assert_close(float(f.g.grad), d_g, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(float(t0.grad), 1.0, rtol=1e-7, atol=1e-8)


# -------------------------------------------------------------- a backend without autograd
class OpaqueBackend:
    """The torch engine behind the backend protocol, declared unable to backprop directly: the
    bridge must then use only ``solve`` calls (as for SciPy or Julia)."""

    name = "opaque"
    supports_direct_grad = False

    def __init__(self):
        from pydiffbridge.backends.torch import TorchBackend

        self.inner = TorchBackend()
        self.grad_mode_calls = 0

    def methods(self):
        return self.inner.methods()

    def resolve_method(self, method):
        return self.inner.resolve_method(method)

    def solve(self, func, y0, t, spec, event_fn=None):
        self.grad_mode_calls += torch.is_grad_enabled()
        with torch.no_grad():
            sol = self.inner.solve(func, y0, t, spec, event_fn)
        sol.backend = self.name
        return sol


@pytest.mark.parametrize("gradient", ["adjoint", "checkpointed"])
def test_backend_without_direct_grad(gradient):
    A = torch.tensor([[-0.2, 1.0], [-0.8, -0.1]], dtype=DT)
    f = Linear(A)
    backend = OpaqueBackend()
    y0 = torch.tensor([1.0, -0.5], dtype=DT, requires_grad=True)
    c = torch.tensor([0.4, -1.0], dtype=DT)
    sol = pdb.solve(f, y0, torch.tensor([0.0, 1.2], dtype=DT), rtol=1e-10, atol=1e-12,
                    gradient=gradient, backend=backend)
    (sol.ys[-1] @ c).backward()
    torch.testing.assert_close(f.A.grad, _vanloan(A, c, y0.detach(), 1.2), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(y0.grad, torch.linalg.matrix_exp(A.T * 1.2) @ c, rtol=1e-7,
                               atol=1e-8)


def test_complex_state_matches_direct_backprop():
    lam = torch.tensor(-0.3 + 1.2j, dtype=torch.complex128, requires_grad=True)
    k = torch.tensor(0.2, dtype=DT, requires_grad=True)  # a real parameter of a complex state
    y0 = torch.tensor([1.0 + 0.5j, 0.2 - 0.1j], dtype=torch.complex128, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)

    def func(tt, y):  # not holomorphic: conj(y) enters
        return lam * y + 0.1 * y.conj() - k * y

    grads = {}
    for gradient in ("direct", "adjoint", "checkpointed"):
        sol = pdb.solve(func, y0, t, rtol=1e-10, atol=1e-12, gradient=gradient,
                        adjoint_params=(lam, k))
        grads[gradient] = torch.autograd.grad((sol.ys.abs() ** 2).sum(), (y0, lam, k))
    for gradient in ("adjoint", "checkpointed"):
        for g, ref in zip(grads[gradient], grads["direct"], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gradient", ["adjoint", "checkpointed"])
def test_cuda_linear_closed_form(gradient):
    A = torch.tensor([[-0.2, 1.0], [-0.8, -0.1]], dtype=DT)
    f = Linear(A).cuda()
    y0 = torch.tensor([1.0, -0.5], dtype=DT, device="cuda", requires_grad=True)
    c = torch.tensor([0.4, -1.0], dtype=DT)
    sol = pdb.solve(f, y0, torch.tensor([0.0, 1.2], dtype=DT, device="cuda"), rtol=1e-10,
                    atol=1e-12, gradient=gradient)
    (sol.ys[-1] @ c.cuda()).backward()
    torch.testing.assert_close(f.A.grad.cpu(), _vanloan(A, c, y0.detach().cpu(), 1.2),
                               rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("gradient", ["adjoint", "checkpointed"])
def test_jump_t_reaches_the_backward_solve(gradient):
    k1 = torch.tensor(0.7, dtype=DT, requires_grad=True)
    k2 = torch.tensor(2.0, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.5], dtype=DT, requires_grad=True)

    def func(tt, y):  # the rate jumps at t = 0.5
        return torch.where(tt < 0.5, -k1 * y, -k2 * y)

    sol = pdb.solve(func, y0, torch.tensor([0.0, 1.0], dtype=DT), rtol=1e-9, atol=1e-12,
                    gradient=gradient, adjoint_params=(k1, k2), options={"jump_t": [0.5]})
    sol.ys[-1].sum().backward()
    yT = 1.5 * math.exp(-0.5 * 0.7 - 0.5 * 2.0)
    torch.testing.assert_close(float(y0.grad), yT / 1.5, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(float(k1.grad), -0.5 * yT, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(float(k2.grad), -0.5 * yT, rtol=1e-8, atol=1e-10)


def test_fixed_step_forward_with_adaptive_adjoint_method():
    A = torch.tensor([[-0.2, 1.0], [-0.8, -0.1]], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=DT, requires_grad=True)
    c = torch.tensor([1.0, 1.0], dtype=DT)
    # the forward's step_size is not an option of dopri5: it must not reach the backward solve
    sol = pdb.solve(lambda tt, y: A @ y, y0, torch.tensor([0.0, 1.0], dtype=DT), method="rk4",
                    options={"step_size": 0.01}, gradient="adjoint", adjoint_params=(A,),
                    adjoint_method="dopri5", adjoint_rtol=1e-10, adjoint_atol=1e-12)
    (sol.ys[-1] @ c).backward()
    torch.testing.assert_close(A.grad, _vanloan(A.detach(), c, y0.detach(), 1.0), rtol=1e-7,
                               atol=1e-8)


@pytest.mark.parametrize("method", ["RK45", "Radau"])
def test_scipy_backend_through_the_bridge(method):
    pytest.importorskip("scipy")
    from pydiffbridge.backends.base import available_backends

    reason = available_backends().get("scipy", "not registered")
    if reason:
        pytest.skip(f"scipy backend unavailable: {reason}")
    A = torch.tensor([[-0.2, 1.0], [-0.8, -0.1]], dtype=DT)
    f = Linear(A)
    y0 = torch.tensor([1.0, -0.5], dtype=DT, requires_grad=True)
    c = torch.tensor([0.4, -1.0], dtype=DT)
    sol = pdb.solve(f, y0, torch.tensor([0.0, 1.2], dtype=DT), rtol=1e-10, atol=1e-12,
                    gradient="adjoint", backend="scipy", method=method)
    (sol.ys[-1] @ c).backward()
    assert sol.stats.nfe_backward > 0
    torch.testing.assert_close(f.A.grad, _vanloan(A, c, y0.detach(), 1.2), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(y0.grad, torch.linalg.matrix_exp(A.T * 1.2) @ c, rtol=1e-7,
                               atol=1e-8)
