"""Per-sample stepping (``batch_dims``) with the Rosenbrock methods and kvaerno5
(pydiffbridge.solvers.batched_stiff, batched_esdirk), against SciPy Radau at rtol 1e-10 per
sample, closed forms, finite differences (gradcheck) and the per-sample loop's invariants.

Error measure as in test_stiff_problems.py: ``max |y - y_ref| / (rtol |y_ref| + atol)``, the
global error in units of the requested tolerance, bounded by 100 (see that module for why).
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pydiffbridge as pdb
from pydiffbridge.bench.stiff_problems import STIFF_PROBLEMS, ensemble
from pydiffbridge.errors import InputError, UnknownOptionError
from pydiffbridge.solution import Status

D = torch.float64
METHODS = [("rosenbrock23", 1e-4), ("rodas4", 1e-6), ("rodas5", 1e-6), ("kvaerno5", 1e-6),
           ("auto", 1e-6)]


def _radau(p, y0, t):
    r = solve_ivp(p.rhs_np, (float(t[0]), float(t[-1])), y0.numpy(), method="Radau",
                  t_eval=t.numpy(), rtol=1e-10, atol=1e-12 * p.atol_scale, jac=p.jac_np)
    assert r.success
    return torch.tensor(r.y.T, dtype=D)


def _err(ys, ref, rtol, atol):
    return float(((ys - ref).abs() / (rtol * ref.abs() + atol)).max())


@pytest.mark.parametrize("name", list(STIFF_PROBLEMS))
@pytest.mark.parametrize("method,rtol", METHODS)
def test_each_sample_against_radau(name, method, rtol):
    p = STIFF_PROBLEMS[name]
    B = 3
    y0 = ensemble(p, B)
    t = p.times(6)
    atol = rtol * p.atol_scale
    sol = pdb.solve(p.rhs, y0, t, method=method, rtol=rtol, atol=atol, batch_dims=1)
    assert sol.ys.shape == (6, B, y0.shape[1])
    assert bool((sol.status == int(Status.SUCCESS)).all()), sol.message
    assert torch.equal(sol.stats.steps, sol.stats.accepted + sol.stats.rejected)
    for b in range(B):
        err = _err(sol.ys[:, b], _radau(p, y0[b], t), rtol, atol)
        assert err < 100, (b, err)


def test_samples_step_independently():
    """Van der Pol with mu = 1000, 10 and 1 in one batch (per-sample mu): each sample takes the
    steps its own problem needs.  Its step count matches a batch of one of that sample alone,
    with the same controller, up to decisions that rounding may flip (the per-sample algebra
    is the same but batched LU/matmul may round differently): within 2 %."""
    mu = torch.tensor([1000.0, 10.0, 1.0], dtype=D)

    def vdp(t, y):
        return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    y0 = torch.tensor([[2.0, 0.0]] * 3, dtype=D)
    t = torch.linspace(0, 30, 4, dtype=D)
    sol = pdb.solve(vdp, y0, t, method="rodas5", rtol=1e-6, atol=1e-6, batch_dims=1)
    steps = sol.stats.steps.tolist()
    # on [0, 30] the mu = 1000 oscillator creeps along its slow manifold (few steps) while the
    # mu = 1 one oscillates (many): shared steps would give every sample the same count
    assert steps[2] > 5 * steps[0]
    for b in range(3):
        def one(t_, y_, b=b):
            return torch.stack([y_[..., 1], mu[b] * (1 - y_[..., 0] ** 2) * y_[..., 1]
                                - y_[..., 0]], -1)
        alone = pdb.solve(one, y0[b:b + 1], t, method="rodas5", rtol=1e-6, atol=1e-6,
                          batch_dims=1)
        assert abs(int(alone.stats.steps[0]) - steps[b]) <= 0.02 * steps[b] + 1
        r = solve_ivp(lambda tt, yy, b=b: [yy[1], float(mu[b]) * (1 - yy[0] ** 2) * yy[1]
                                          - yy[0]], (0, 30), [2.0, 0.0], method="Radau",
                      t_eval=t.numpy(), rtol=1e-10, atol=1e-12)
        assert _err(sol.ys[:, b], torch.tensor(r.y.T), 1e-6, 1e-6) < 100


@pytest.mark.parametrize("method", ["rodas5", "auto"])
def test_per_sample_output_times_and_direction(method):
    """Each sample has its own output times (and sample 1 integrates backwards); linear
    stiff system with a closed form."""
    A = torch.tensor([[-1.0, 0.0], [999.0, -1000.0]], dtype=D)  # eigenvalues -1, -1000

    def f(t, y):
        return y @ A.T

    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=D)
    # (backwards, the stiff mode grows as e^{1000 |dt|}: a short span keeps it representable)
    t = torch.tensor([[0.0, 0.3, 1.0, 2.5], [0.02, 0.015, 0.005, 0.0]], dtype=D)
    sol = pdb.solve(f, y0, t, method=method, rtol=1e-8, atol=1e-10, batch_dims=1)
    assert sol.ts.shape == (2, 4)
    for b in range(2):
        for j in range(4):
            ref = torch.linalg.matrix_exp(A * (t[b, j] - t[b, 0])) @ y0[b]
            assert torch.allclose(sol.ys[j, b], ref, rtol=1e-6, atol=1e-8), (b, j)


@pytest.mark.parametrize("method", ["rosenbrock23", "rodas4", "rodas5", "kvaerno5"])
def test_non_autonomous_closed_form(method):
    """y' = -k (y - cos t) - sin t, y = cos t + (y0 - 1) e^{-k t}, per-sample k: df/dt by
    autograd through the per-sample time."""
    k = torch.tensor([1e3, 1e1, 1e4], dtype=D)

    def f(t, y):
        return -k[:, None] * (y - torch.cos(t)[:, None]) - torch.sin(t)[:, None]

    y0 = torch.tensor([[3.0], [0.0], [-1.0]], dtype=D)
    t = torch.linspace(0, 2, 5, dtype=D)
    rtol = 1e-5 if method == "rosenbrock23" else 1e-8
    sol = pdb.solve(f, y0, t, method=method, rtol=rtol, atol=rtol, batch_dims=1)
    ref = torch.cos(t)[:, None, None] + (y0 - 1)[None] * torch.exp(-k[None, :, None]
                                                                   * t[:, None, None])
    assert _err(sol.ys, ref, rtol, rtol) < 100


@pytest.mark.parametrize("jacobian", ["fd", "user"])
def test_jacobian_options_agree_with_closed_form(jacobian):
    A = torch.tensor([[-2.0, 1.0], [1.0, -2000.0]], dtype=D)
    B = 4
    y0 = torch.randn(B, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    calls = []

    def jac(tt, y):
        calls.append(tuple(tt.shape))
        return A.expand(y.shape[0], 2, 2)

    opts = {"jacobian": "fd"} if jacobian == "fd" else {"jac": jac}
    sol = pdb.solve(lambda tt, y: y @ A.T, y0, t, method="rodas5", rtol=1e-9, atol=1e-12,
                    batch_dims=1, options=opts)
    ref = torch.stack([y0 @ torch.linalg.matrix_exp(A * float(s)).T for s in t])
    assert torch.allclose(sol.ys, ref, rtol=1e-6, atol=1e-9)
    if jacobian == "user":
        assert calls and calls[0] == (B,)  # per-sample times


def test_failures_are_per_sample():
    """A sample whose rhs turns NaN fails with NONFINITE, one that runs out of steps with
    MAX_STEPS; the others finish, and their values are right."""
    lam = torch.tensor([-1.0, -1.0, -1e6], dtype=D)

    def f(t, y):
        out = lam[:, None] * y
        bad = (t > 0.5) & (torch.arange(3) == 0)
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)

    y0 = torch.ones(3, 1, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    sol = pdb.solve(f, y0, t, method="rodas5", rtol=1e-6, atol=1e-9, batch_dims=1)
    assert int(sol.status[0]) == int(Status.NONFINITE)
    assert int(sol.status[1]) == int(Status.SUCCESS)
    assert abs(float(sol.ys[1, 1, 0]) - math.exp(-1.0)) < 1e-5
    assert torch.isnan(sol.ys[1, 0]).all()
    assert "sample 0" in sol.message
    with pytest.raises(pdb.PyDiffBridgeError):
        pdb.solve(f, y0, t, method="rodas5", batch_dims=1, raise_on_failure=True)
    few = pdb.solve(lambda t, y: lam[:, None] * y, y0, torch.tensor([0.0, 1e3], dtype=D),
                    method="rodas5", rtol=1e-10, atol=1e-12, batch_dims=1,
                    options={"max_num_steps": 20})
    assert (few.status == int(Status.MAX_STEPS)).any()
    assert bool((few.stats.steps <= 20).all())


@pytest.mark.parametrize("method,opts", [
    ("rosenbrock23", {"fixed_step": 0.05}), ("rodas4", {"fixed_step": 0.05}),
    ("rodas5", {"fixed_step": 0.05}), ("rodas5", {}),
    ("kvaerno5", {"fixed_step": 0.05, "newton_tol": 1e-10})])
def test_gradcheck_direct(method, opts):
    """On a fixed grid (fixed_step): the exact derivative of the discrete scheme.  Adaptive
    (rodas5) at rtol 1e-9: the step sizes (no gradient) move the result by ~1e-9 under
    gradcheck's perturbations, far below its atol."""
    t = torch.tensor([0.0, 0.2, 0.5], dtype=D)

    def run(y0, kk):
        def g(tt, y):
            return torch.stack([-kk[0] * y[:, 0] + y[:, 1] ** 2,
                                -kk[1] * (y[:, 1] - torch.sin(tt))], 1)
        return pdb.solve(g, y0, t, method=method, rtol=1e-9, atol=1e-11, batch_dims=1,
                         options=opts).ys

    y0 = torch.tensor([[1.0, 0.5], [0.2, -1.0]], dtype=D, requires_grad=True)
    k = torch.tensor([1.5, 300.0], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, k), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,order", [("rosenbrock23", 2), ("rodas4", 4), ("rodas5", 5),
                                          ("kvaerno5", 5)])
def test_convergence_order_per_sample(method, order):
    """Fixed steps T/N on a mildly stiff problem with a closed form (Prothero-Robinson,
    y = sin t; h |lambda| <= 1 as in test_stiff_api's order test, so that every method shows
    its classical order): the fitted order of every sample (lambda = -5, -10) is within 0.3
    of the method's."""
    lam = torch.tensor([-5.0, -10.0], dtype=D)

    def f(t, y):
        return lam[:, None] * (y - torch.sin(t)[:, None]) + torch.cos(t)[:, None]

    y0 = torch.zeros(2, 1, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    Ns, errs = [10, 20, 40], []
    for N in Ns:
        opts = {"fixed_step": 1.0 / N, **({"newton_tol": 1e-8} if method == "kvaerno5" else {})}
        sol = pdb.solve(f, y0, t, method=method, batch_dims=1, options=opts)
        assert sol.stats.steps.tolist() == [N, N]
        errs.append((sol.ys[-1, :, 0] - math.sin(1.0)).abs().tolist())
    for b in range(2):
        slope = -np.polyfit(np.log(Ns), np.log([e[b] for e in errs]), 1)[0]
        assert abs(slope - order) < 0.3, (b, errs, slope)


@pytest.mark.parametrize("mode", ["adjoint", "checkpointed"])
def test_adjoint_matches_direct(mode):
    """gradient='adjoint' (per-sample forward, joint backward with rodas5 on the whole batch)
    against direct backprop: both approximate the same exact gradient within the solves'
    tolerance (1e-8): agreement to 1e-5 relative.  Mildly stiff (k = 5, 20): the plain
    adjoint's backward z-solve grows errors like e^{k t}, and is unstable on stiff problems
    with any method (see the README)."""
    k = torch.tensor([5.0, 20.0], dtype=D, requires_grad=True)

    def f(t, y):
        return torch.stack([-k[0] * y[:, 0] + y[:, 1], -k[1] * (y[:, 1] - torch.sin(t))], 1)

    t = torch.tensor([0.0, 0.3, 1.0], dtype=D)
    y0 = torch.tensor([[1.0, 0.5], [0.2, -1.0], [2.0, 0.0]], dtype=D, requires_grad=True)
    grads = {}
    for how in ("direct", mode):
        sol = pdb.solve(f, y0, t, method="rodas5", rtol=1e-8, atol=1e-10, batch_dims=1,
                        gradient=how, adjoint_params=(k,))
        loss = (sol.ys ** 2).sum()
        grads[how] = torch.autograd.grad(loss, (y0, k))
    for a, b in zip(grads["direct"], grads[mode], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a, b)


@pytest.mark.parametrize("method", ["rodas5", "auto"])
def test_float32_batch(method):
    A = torch.tensor([[-1.0, 0.0], [999.0, -1000.0]])
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    t = torch.tensor([0.0, 1.0])
    sol = pdb.solve(lambda tt, y: y @ A.T, y0, t, method=method, rtol=1e-4, atol=1e-6,
                    batch_dims=1)
    assert sol.ys.dtype == torch.float32
    ref = y0.double() @ torch.linalg.matrix_exp(A.double()).T
    assert torch.allclose(sol.ys[-1].double(), ref, rtol=1e-3, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(2, 3, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(UnknownOptionError, match="kvaerno5"):
        pdb.solve(f, y0, t, method="rodas5", batch_dims=1, options={"newton_tol": 1e-3})
    with pytest.raises(InputError, match="newton_tol"):
        pdb.solve(f, y0, t, method="kvaerno5", batch_dims=1, options={"newton_tol": -1.0})
    with pytest.raises(UnknownOptionError, match="accepted"):
        pdb.solve(f, y0, t, method="rodas5", batch_dims=1, options={"sync_every": 2})
    with pytest.raises(InputError, match="jacobian"):
        pdb.solve(f, y0, t, method="rodas5", batch_dims=1, options={"jacobian": "magic"})
    with pytest.raises(InputError, match=r"\(2, 3, 3\)"):
        pdb.solve(f, y0, t, method="rodas5", batch_dims=1,
                  options={"jac": lambda tt, y: torch.zeros(3, 3, dtype=D)})


@pytest.mark.parametrize("method", ["rodas4", "auto"])
def test_tuple_state_and_two_batch_dims(method):
    """A tuple state with two batch dimensions: shapes come back as given; the values are the
    closed form of two decoupled stiff decays."""
    y0 = (torch.ones(2, 3, 1, dtype=D), torch.full((2, 3, 2), 2.0, dtype=D))

    def f(t, y):
        return (-y[0], -500.0 * y[1])

    t = torch.tensor([0.0, 0.1, 1.0], dtype=D)
    sol = pdb.solve(f, y0, t, method=method, rtol=1e-8, atol=1e-10, batch_dims=2)
    a, b = sol.ys
    assert a.shape == (3, 2, 3, 1) and b.shape == (3, 2, 3, 2)
    assert sol.status.shape == (2, 3)
    assert torch.allclose(a[:, 0, 0, 0], torch.exp(-t), rtol=1e-6)
    assert torch.allclose(b[:, 1, 2, 1], 2 * torch.exp(-500 * t), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(sol.stats.steps.shape, (2, 3))
    if method == "auto":
        assert sol.stats.switches.shape == (2, 3)


@pytest.mark.parametrize("method,rtol", [("rosenbrock23", 1e-9), ("rodas4", 1e-10),
                                         ("rodas5", 1e-10)])
def test_output_time_gradients_closed_form(method, rtol):
    """Per-sample output times that require grad, on y' = -k (y - cos t) - sin t (stiff,
    non-autonomous): y(t) = cos t + (y0 - cos t0) e^{-k (t - t0)}, so
    dy(t_j)/dt_j = -sin t_j - k c e_j and dy(t_j)/dt_0 = (sin t0 + k c) e_j with
    c = y0 - cos t0, e_j = e^{-k (t_j - t0)}.  A t gradient is the derivative of the dense
    output, an order less accurate than the solution: bound 1e-5 relative (or absolute below
    1) at rtol 1e-10, 1e-9 for the second-order rosenbrock23; measured 1e-7 (rodas5),
    3.6e-7 (rodas4), 9.4e-7 (rosenbrock23)."""
    k = torch.tensor([1e3, 30.0], dtype=D)

    def f(t, y):
        return -k[:, None] * (y - torch.cos(t)[:, None]) - torch.sin(t)[:, None]

    y0 = torch.tensor([[3.0], [-1.0]], dtype=D)
    t = torch.tensor([[0.3, 0.35, 0.8, 1.5], [0.1, 0.6, 0.9, 1.2]], dtype=D, requires_grad=True)
    sol = pdb.solve(f, y0, t, method=method, rtol=rtol, atol=rtol, batch_dims=1)
    (gt,) = torch.autograd.grad(sol.ys[1:].sum(), t)
    td = t.detach()
    t0 = td[:, :1]
    c = y0 - torch.cos(t0)
    e = torch.exp(-k[:, None] * (td[:, 1:] - t0))
    d_tj = -torch.sin(td[:, 1:]) - k[:, None] * c * e
    d_t0 = ((torch.sin(t0) + k[:, None] * c) * e).sum(1)
    want = torch.cat([d_t0[:, None], d_tj], 1)
    err = float(((gt - want).abs() / want.abs().clamp(min=1.0)).max())
    assert err < 1e-5, (gt, want)
