"""The adaptive stiff methods on the torch backend through the public API: registration,
options, tuple states, dtypes, block-diagonal batches, convergence orders and gradients
(direct backprop, adjoint and interpolated adjoint with a stiff ``adjoint_method``)."""

import math

import numpy as np
import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge.backends.torch import METHODS, STIFF_ADAPTIVE_METHODS, TorchBackend
from pydiffbridge.errors import InputError, UnknownOptionError
from pydiffbridge.solution import Status

D = torch.float64
ALL = ["rosenbrock23", "rodas4", "rodas5", "kvaerno5", "auto"]


def test_registered():
    assert set(ALL) <= set(METHODS) and set(ALL) == set(STIFF_ADAPTIVE_METHODS)
    be = TorchBackend()
    assert be.resolve_method("Rodas5") == "rodas5" and be.resolve_method("ode23s") == \
        "rosenbrock23" and be.resolve_method("Kvaerno5") == "kvaerno5"


def _prothero(lam):
    def f(t, y):  # exact solution (cos t, sin t); nonlinear coupling, non-autonomous
        return torch.stack([-lam * (y[0] - torch.cos(t)) - torch.sin(t)
                            + (y[1] - torch.sin(t)) ** 2, -2.0 * (y[1] - torch.sin(t))
                            + torch.cos(t)])
    return f


@pytest.mark.parametrize("method,order", [("rosenbrock23", 2), ("rodas4", 4), ("rodas5", 5),
                                          ("kvaerno5", 5)])
def test_convergence_order(method, order):
    # mildly stiff (lambda = 10, h lambda up to 1) so that every method shows its classical
    # order; fixed_step takes exactly T/N steps; kvaerno5's Newton converged to ~1e-16
    T, Ns, errs = 1.0, [10, 20, 40], []
    ex = torch.tensor([math.cos(T), math.sin(T)], dtype=D)
    for N in Ns:
        sol = pdb.solve(_prothero(10.0), torch.tensor([1.0, 0.0], dtype=D),
                        torch.tensor([0.0, T], dtype=D), method=method, rtol=1e-6, atol=1e-6,
                        options={"fixed_step": T / N, **({"newton_tol": 1e-8}
                                                         if method == "kvaerno5" else {})})
        errs.append(float((sol.ys[-1] - ex).abs().max()))
    slope = -np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (errs, slope)


@pytest.mark.parametrize("method", ALL)
def test_odeint_tuple_state_and_float32(method):
    def f(t, y):
        a, b = y
        return -1000.0 * (a - torch.cos(t)), -b

    y0 = (torch.tensor([1.0], dtype=D), torch.ones(2, dtype=D))
    t = torch.linspace(0.0, 1.0, 3, dtype=D)
    ya, yb = pdb.odeint(f, y0, t, method=method, rtol=1e-7, atol=1e-9)
    assert ya.shape == (3, 1) and yb.shape == (3, 2)
    assert abs(float(yb[-1, 0]) - math.exp(-1.0)) < 1e-5
    # the slow manifold a = cos t - a' / 1000 = cos t + sin t / 1000 + O(1e-6)
    assert abs(float(ya[-1, 0]) - (math.cos(1.0) + math.sin(1.0) / 1000)) < 2e-6
    ys = pdb.odeint(lambda t, y: -50.0 * (y - torch.sin(t)), torch.ones(3),
                    torch.linspace(0, 1, 3), method=method, rtol=1e-4, atol=1e-6)
    assert ys.dtype == torch.float32 and bool(torch.isfinite(ys).all())
    ex = 50 * (50 * math.sin(1) - math.cos(1)) / 2501 + (1 + 50 / 2501) * math.exp(-50)
    assert abs(float(ys[-1, 0]) - ex) < 1e-3


def test_options_and_errors():
    f, y0, t = _prothero(50.0), torch.tensor([1.0, 0.0], dtype=D), torch.tensor([0.0, 1.0],
                                                                                 dtype=D)
    with pytest.raises(UnknownOptionError):
        pdb.solve(f, y0, t, method="rodas5", options={"step_size": 0.1})
    with pytest.raises(UnknownOptionError):
        pdb.solve(f, y0, t, method="rodas5", options={"newton_tol": 1e-3})  # kvaerno5 only
    with pytest.raises(InputError, match="jacobian"):
        pdb.solve(f, y0, t, method="kvaerno5", options={"jacobian": "magic"})
    with pytest.raises(InputError, match="stiff_method"):
        pdb.solve(f, y0, t, method="auto", options={"stiff_method": "dopri5"})
    s = pdb.solve(f, y0, t, method="kvaerno5", options={"max_num_steps": 3})
    assert s.status == Status.MAX_STEPS and torch.isnan(s.ys[-1]).all()
    with pytest.raises(pdb.errors.MaxStepsExceededError):
        pdb.odeint(f, y0, t, method="rodas5", options={"max_num_steps": 3})
    # a user Jacobian, and one of the wrong shape
    def jac(tt, y):
        return torch.tensor([[-50.0, 2 * (float(y[1]) - math.sin(float(tt)))], [0.0, -2.0]],
                            dtype=D)
    for m in ("rodas5", "kvaerno5"):
        ys = pdb.odeint(f, y0, t, method=m, options={"jac": jac}, rtol=1e-8, atol=1e-10)
        assert abs(float(ys[-1, 0]) - math.cos(1.0)) < 1e-7
    with pytest.raises(InputError, match="must return"):
        pdb.solve(f, y0, t, method="rodas5", options={"jac": lambda tt, y: torch.eye(3)})


def test_kvaerno5_newton_failures_reject_and_recover(monkeypatch):
    # Robertson from a too-large first step with 3 Newton iterations allowed: stages fail to
    # converge, the step is rejected (not an exception) and retried with half the step
    from pydiffbridge.bench.stiff_problems import STIFF_PROBLEMS
    from pydiffbridge.solvers import esdirk

    made = []
    init = esdirk.EsdirkScheme.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        made.append(self)
    monkeypatch.setattr(esdirk.EsdirkScheme, "__init__", spy)
    p = STIFF_PROBLEMS["robertson"]
    s = pdb.solve(p.rhs, torch.tensor(p.y0, dtype=D), p.times(4), method="kvaerno5",
                  rtol=1e-6, atol=1e-10, options={"max_iters": 3, "first_step": 1e-2})
    assert s.success and s.stats.rejected >= made[0].newton_failures > 10
    ref = torch.tensor([1.7865921142300248e-02, 7.27475146851954e-08, 0.9821340061101856],
                       dtype=D)  # SciPy Radau, rtol 1e-11 (tests/test_stiff.py)
    assert float(((s.ys[-1] - ref).abs() / (1e-6 * ref + 1e-10)).max()) < 100


def test_block_diagonal_batch_matches_dense():
    from pydiffbridge.bench.stiff_problems import STIFF_PROBLEMS, ensemble

    p = STIFF_PROBLEMS["robertson"]
    y0, t = ensemble(p, 8), p.times(4)
    for m in ("rodas5", "kvaerno5"):
        dense = pdb.solve(p.rhs, y0, t, method=m, rtol=1e-6, atol=1e-10)
        for kind in ("autograd", "fd"):
            blk = pdb.solve(p.rhs, y0, t, method=m, rtol=1e-6, atol=1e-10,
                            options={"jac_blocks": 8, "jacobian": kind})
            if kind == "autograd":  # the same Jacobian, factorised block by block
                assert blk.stats.steps == dense.stats.steps
                assert float((blk.ys - dense.ys).abs().max()) < 1e-12
            else:  # a difference Jacobian: another (rodas: not W-) method, within tolerance
                assert float((blk.ys - dense.ys).abs().max()) < 1e-6
    with pytest.raises(InputError, match="jac_blocks"):
        pdb.solve(p.rhs, y0, t, method="rodas5", options={"jac_blocks": 5})


class Model(torch.nn.Module):
    def __init__(self, k0=100.0):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([k0, 2.0], dtype=D))

    def forward(self, t, y):
        return torch.stack([-self.k[0] * y[0] + self.k[1] * y[1] ** 2 + torch.sin(t),
                            self.k[0] * y[0] - 3.0 * y[1]])


@pytest.mark.parametrize("method", ALL)
def test_gradcheck_direct(method):
    # on a fixed grid (fixed_step): the exact derivative of the discrete scheme; adaptive
    # (rodas5, auto) at rtol 1e-9: the step sizes (Python floats, no gradient) move the result
    # by ~1e-9 under gradcheck's perturbations, far below its atol.  auto: k0 = 1e4 makes
    # tsit5 stability-limited, so the solve switches to rodas5 after 3 steps
    t = torch.tensor([0.0, 0.3, 1.0], dtype=D)
    k0 = 1e4 if method == "auto" else 100.0

    def rhs(k):
        return lambda tt, y: torch.stack([-k[0] * y[0] + k[1] * y[1] ** 2 + torch.sin(tt),
                                          k[0] * y[0] - 3.0 * y[1]])

    def run(y0, k, opts):
        return pdb.solve(rhs(k), y0, t, method=method, rtol=1e-9, atol=1e-11, options=opts)

    fixed = {"fixed_step": 0.05, **({"newton_tol": 1e-10} if method == "kvaerno5" else {})}
    cases = [fixed] + ([{}] if method == "rodas5" else [])
    if method == "auto":
        cases = [{"stiff_detect": 3}]
    y0 = torch.tensor([1.0, 0.5], dtype=D, requires_grad=True)
    k = torch.tensor([k0, 2.0], dtype=D, requires_grad=True)
    for opts in cases:
        assert torch.autograd.gradcheck(lambda a, b, o=opts: run(a, b, o).ys[1:], (y0, k),
                                        atol=1e-5, rtol=1e-4)
    if method == "auto":
        assert run(y0, k, cases[0]).stats.switches >= 1


@pytest.mark.parametrize("adjoint_method", ["rodas5", "kvaerno5", "rosenbrock23"])
def test_adjoint_with_stiff_adjoint_method(adjoint_method):
    # mildly stiff (k0 = 10): the plain adjoint's backward z-solve is stable enough
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    f = Model(10.0)
    y0 = torch.tensor([1.0, 0.5], dtype=D, requires_grad=True)
    ys = pdb.odeint_adjoint(f, y0, t, method="rodas5", adjoint_method=adjoint_method,
                            rtol=1e-9, atol=1e-11)
    ga = torch.autograd.grad(ys.sum(), (y0, f.k))
    ys = pdb.odeint(f, y0, t, method="rodas5", rtol=1e-11, atol=1e-13)
    gd = torch.autograd.grad(ys.sum(), (y0, f.k))
    tol = 1e-4 if adjoint_method == "rosenbrock23" else 1e-6
    for a, d in zip(ga, gd, strict=True):
        assert float((a - d).abs().max() / d.abs().max()) < tol

    def fn(y0_):
        return pdb.odeint_adjoint(f, y0_, t, method="rodas5", adjoint_method="rodas5",
                                  rtol=1e-10, atol=1e-12)
    if adjoint_method == "rodas5":
        assert torch.autograd.gradcheck(fn, (y0,), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("adjoint_method", ["rodas5", "kvaerno5", "auto"])
def test_interpolated_adjoint_stiff(adjoint_method):
    # k0 = 100: the backward z-solve of the plain adjoint is unstable; the interpolated adjoint
    # back-solves only the adjoint, here with a stiff method
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    f = Model(100.0)
    y0 = torch.tensor([1.0, 0.5], dtype=D, requires_grad=True)
    sol = pdb.solve(f, y0, t, method="rodas5", adjoint_method=adjoint_method, rtol=1e-8,
                    atol=1e-10, gradient="interpolated")
    ga = torch.autograd.grad(sol.ys.sum(), (y0, f.k))
    assert sol.stats.nfe_backward > 0
    ys = pdb.odeint(f, y0, t, method="rodas5", rtol=1e-11, atol=1e-13)
    gd = torch.autograd.grad(ys.sum(), (y0, f.k))
    for a, d in zip(ga, gd, strict=True):
        assert float((a - d).abs().max() / d.abs().max()) < 1e-6

