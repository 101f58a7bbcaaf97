"""Per-sample adaptive stepping (``solve(..., batch_dims=k)``).

References: sample-by-sample solves with the ordinary (shared-step) solver, SciPy's DOP853 at
tight tolerance, and closed forms.
"""

from __future__ import annotations

import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge import errors as E
from pydiffbridge.solution import Status

scipy_integrate = pytest.importorskip("scipy.integrate")

DT = torch.float64


class VdP(torch.nn.Module):
    """Van der Pol oscillators with one μ per sample (μ is a scalar for a single sample)."""

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.mu = mu

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


def _vdp_batch(b=4):
    mu = torch.linspace(0.5, 6.0, b, dtype=DT)
    y0 = torch.stack([torch.linspace(1.0, 2.0, b, dtype=DT), torch.zeros(b, dtype=DT)], -1)
    return mu, y0


@pytest.mark.parametrize("method,tol", [("dopri5", 1e-8), ("tsit5", 1e-8), ("bosh3", 1e-6),
                                        ("dopri8", 1e-9)])
def test_matches_sample_by_sample_and_scipy(method, tol):
    mu, y0 = _vdp_batch()
    t = torch.linspace(0.0, 2.0, 5, dtype=DT)
    sol = pdb.solve(VdP(mu), y0, t, rtol=tol, atol=tol * 1e-2, method=method, batch_dims=1)
    assert sol.ys.shape == (5, 4, 2)
    assert sol.success and sol.status.shape == (4,)
    for b in range(4):
        single = pdb.solve(VdP(mu[b]), y0[b], t, rtol=tol, atol=tol * 1e-2, method=method)
        torch.testing.assert_close(sol.ys[:, b], single.ys, rtol=100 * tol, atol=10 * tol)
        ref = scipy_integrate.solve_ivp(
            lambda tt, yy, m=float(mu[b]): [yy[1], m * (1 - yy[0] ** 2) * yy[1] - yy[0]],
            (0.0, 2.0), y0[b].numpy(), method="DOP853", rtol=1e-13, atol=1e-13,
            t_eval=t.numpy())
        torch.testing.assert_close(sol.ys[:, b], torch.from_numpy(ref.y.T), rtol=1000 * tol,
                                   atol=100 * tol)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("method", ["dopri5", "dopri8"])
def test_stats_per_sample_add_up_and_equal_single_solves(grad, method):
    mu, y0 = _vdp_batch()
    t = torch.tensor([0.0, 4.0], dtype=DT)
    with torch.set_grad_enabled(grad):
        sol = pdb.solve(VdP(mu), y0, t, rtol=1e-6, atol=1e-8, batch_dims=1, method=method)
    st = sol.stats
    assert torch.equal(st.steps, st.accepted + st.rejected)
    assert int(st.rejected.sum()) > 0  # the comparison below covers rejected steps too
    for b in range(4):
        single = pdb.solve(VdP(mu[b]), y0[b], t, rtol=1e-6, atol=1e-8, method=method)
        assert int(st.steps[b]) == single.stats.steps
        assert int(st.accepted[b]) == single.stats.accepted
        assert int(st.nfe[b]) == single.stats.nfe
    # different dynamics give different work: the stiffest sample takes the most steps
    assert int(st.steps[-1]) > int(st.steps[0])


def test_per_sample_output_times_closed_form():
    k = torch.tensor([0.5, 1.0, 3.0], dtype=DT)
    y0 = torch.tensor([[1.0], [2.0], [-1.0]], dtype=DT)
    t = torch.stack([torch.linspace(0, 1, 5), torch.linspace(0, 2, 5),
                     torch.linspace(1, -1, 5)]).to(DT)  # the last runs backwards
    sol = pdb.solve(lambda tt, y: -k[:, None] * y, y0, t, rtol=1e-9, atol=1e-11, batch_dims=1)
    assert sol.ts.shape == (3, 5) and sol.ys.shape == (5, 3, 1)
    exact = y0[:, 0, None] * torch.exp(-k[:, None] * (t - t[:, :1]))  # (3, 5)
    torch.testing.assert_close(sol.ys[:, :, 0].T, exact, rtol=1e-7, atol=1e-9)


def test_time_dependent_rhs_gets_each_samples_time():
    # dy/dt = cos(t) from different start times: y(t) = y0 + sin(t) - sin(t0)
    t = torch.stack([torch.linspace(0, 2, 4), torch.linspace(3, 7, 4)]).to(DT)
    y0 = torch.zeros(2, 1, dtype=DT)
    seen = []

    def f(tt, y):
        seen.append(tt.shape)
        return torch.cos(tt)[:, None].expand_as(y)

    sol = pdb.solve(f, y0, t, rtol=1e-9, atol=1e-12, batch_dims=1)
    assert seen[0] == (2,)
    torch.testing.assert_close(sol.ys[:, :, 0].T, torch.sin(t) - torch.sin(t[:, :1]),
                               rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("sync_every", [1, 3])  # 3: the branch-free (CUDA-style) path
def test_dense_outputs_many_per_step(sync_every):
    # 41 outputs on a smooth problem: steps are long, so most steps cover several outputs
    k = torch.tensor([0.1, 2.0], dtype=DT)
    y0 = torch.ones(2, 3, dtype=DT)
    t = torch.linspace(0, 4, 41, dtype=DT)
    sol = pdb.solve(lambda tt, y: -k[:, None] * y, y0, t, rtol=1e-8, atol=1e-10, batch_dims=1,
                    options={"sync_every": sync_every})
    exact = torch.exp(-k[None, :, None] * t[:, None, None]).expand(41, 2, 3)
    torch.testing.assert_close(sol.ys, exact, rtol=1e-6, atol=1e-8)
    assert int(sol.stats.steps[0]) < 40


@pytest.mark.parametrize("method", ["tsit5", "dopri8"])
def test_cpu_bookkeeping_matches_device_path(method):
    # on the CPU the per-sample bookkeeping runs in NumPy (sync_every=1); sync_every=2 takes
    # the branch-free torch path used on CUDA: both must make the same decisions
    mu, y0 = _vdp_batch(6)
    t = torch.linspace(0.0, 3.0, 7, dtype=DT)
    kw = dict(rtol=1e-6, atol=1e-8, method=method, batch_dims=1)
    a = pdb.solve(VdP(mu), y0, t, options={"sync_every": 1}, **kw)
    b = pdb.solve(VdP(mu), y0, t, options={"sync_every": 2}, **kw)
    # Not bit-identical: the step-size factor ratio**(-1/k) is NumPy's pow (libm) on one path
    # and torch's vectorised pow (SLEEF, picked per CPU: AVX2, AVX-512, ...) on the other.
    # Both are faithfully rounded, so they differ by at most 1 ulp, on a few percent of the
    # inputs.  Once one step size differs by an ulp, every later rounding differs: a step
    # y + h * sum(b_i k_i) over s stages rounds by at most about (s + 1) eps max|y|, and over
    # N attempted steps these add up to at most N (s + 1) eps max|y| (the step sizes differ by
    # a relative N eps, which moves the solution only by N eps times the local error, far
    # less).  That is the bound used here: about 6e-13 for tsit5 on this problem (observed
    # differences: up to 5e-14).
    from pydiffbridge.solvers.tableaus import TABLEAUS

    n_steps = int(a.stats.steps.max())
    bound = n_steps * (TABLEAUS[method].stages + 1) * torch.finfo(DT).eps
    torch.testing.assert_close(a.ys, b.ys, rtol=bound, atol=bound * float(a.ys.abs().max()))
    for k in ("nfe", "steps", "accepted", "rejected"):
        assert torch.equal(getattr(a.stats, k), getattr(b.stats, k)), k
    assert torch.equal(a.status, b.status) and int(a.stats.rejected.sum()) > 0


def _poisoned_decay():
    """dy/dt = -k y for four samples; sample 2's func turns NaN after t = 0.7."""
    k = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=DT)
    y0 = torch.ones(4, 2, dtype=DT)
    t = torch.linspace(0, 2, 5, dtype=DT)

    def f(tt, y):
        dy = -k[:, None] * y
        poison = torch.zeros_like(dy)
        poison[2] = torch.where(tt[2] > 0.7, float("nan"), 0.0)
        return dy + poison

    return k, y0, t, f


def test_nan_sample_is_isolated_and_raises_naming_it():
    k, y0, t, f = _poisoned_decay()

    sol = pdb.solve(f, y0, t, rtol=1e-8, atol=1e-10, batch_dims=1)
    assert int(sol.status[2]) == Status.NONFINITE
    ok = [0, 1, 3]
    assert all(int(sol.status[b]) == Status.SUCCESS for b in ok)
    exact = torch.exp(-k[None, :, None] * t[:, None, None]).expand(5, 4, 2)
    torch.testing.assert_close(sol.ys[:, ok], exact[:, ok], rtol=1e-6, atol=1e-8)
    assert torch.isnan(sol.ys[-1, 2]).all()  # never reached
    assert "sample 2" in sol.message and not sol.success
    with pytest.raises(E.NonFiniteError, match="sample 2"):
        pdb.solve(f, y0, t, rtol=1e-8, atol=1e-10, batch_dims=1, raise_on_failure=True)
    with pytest.raises(E.NonFiniteError, match="sample 2"):
        pdb.odeint(f, y0, t, rtol=1e-8, atol=1e-10, batch_dims=1)


def test_max_steps_is_per_sample():
    mu = torch.tensor([0.5, 30.0], dtype=DT)
    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=DT)
    t = torch.tensor([0.0, 20.0], dtype=DT)
    single = pdb.solve(VdP(mu[0]), y0[0], t, rtol=1e-6, atol=1e-8)
    sol = pdb.solve(VdP(mu), y0, t, rtol=1e-6, atol=1e-8, batch_dims=1,
                    options={"max_num_steps": single.stats.steps + 5})
    assert int(sol.status[0]) == Status.SUCCESS
    assert int(sol.status[1]) == Status.MAX_STEPS
    torch.testing.assert_close(sol.ys[-1, 0], single.ys[-1], rtol=1e-6, atol=1e-8)
    with pytest.raises(E.MaxStepsExceededError, match="sample 1"):
        pdb.solve(VdP(mu), y0, t, rtol=1e-6, atol=1e-8, batch_dims=1, raise_on_failure=True,
                  options={"max_num_steps": single.stats.steps + 5})


def test_direct_gradient_closed_form():
    # y' = -k_b y  =>  y(T) = y0 exp(-k_b T), d y(T) / d k_b = -T y0 exp(-k_b T)
    k = torch.tensor([0.3, 1.0, 2.5], dtype=DT, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0], [0.5]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 1.5], dtype=DT)
    sol = pdb.solve(lambda tt, y: -k[:, None] * y, y0, t, rtol=1e-10, atol=1e-12,
                    batch_dims=1)
    sol.ys[-1].sum().backward()
    T = 1.5
    kd, y0d = k.detach(), y0.detach()[:, 0]
    torch.testing.assert_close(k.grad, -T * y0d * torch.exp(-kd * T), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(y0.grad[:, 0], torch.exp(-kd * T), rtol=1e-6, atol=1e-9)


def test_two_batch_dims_and_tuple_state():
    # harmonic oscillators x'' = -w^2 x as a tuple (x, v), batch shape (2, 3)
    w = torch.linspace(0.5, 3.0, 6, dtype=DT).reshape(2, 3)
    x0 = torch.ones(2, 3, 1, dtype=DT)
    v0 = torch.zeros(2, 3, 1, dtype=DT)

    def f(tt, state):
        assert tt.shape == (2, 3)
        x, v = state
        return v, -(w[..., None] ** 2) * x

    t = torch.linspace(0, 2, 3, dtype=DT)
    sol = pdb.solve(f, (x0, v0), t, rtol=1e-9, atol=1e-11, batch_dims=2)
    xs, vs = sol.ys
    assert xs.shape == (3, 2, 3, 1) and sol.stats.steps.shape == (2, 3)
    exact_x = torch.cos(w[None] * t[:, None, None])[..., None]
    exact_v = (-w[None] * torch.sin(w[None] * t[:, None, None]))[..., None]
    torch.testing.assert_close(xs, exact_x, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(vs, exact_v, rtol=1e-7, atol=1e-8)


def test_per_component_tolerances_and_first_step():
    k = torch.tensor([1.0, 4.0], dtype=DT)
    y0 = torch.ones(2, 2, dtype=DT)
    atol = torch.tensor([1e-12, 1e-3], dtype=DT)  # broadcast over the batch
    t = torch.tensor([0.0, 1.0], dtype=DT)
    sol = pdb.solve(lambda tt, y: -k[:, None] * y, y0, t, rtol=1e-9, atol=atol,
                    batch_dims=1, options={"first_step": 1e-3})
    torch.testing.assert_close(sol.ys[-1], torch.exp(-k)[:, None].expand(2, 2), rtol=1e-6,
                               atol=1e-7)


def test_bad_inputs_raise():
    y0 = torch.ones(3, 2, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    f = lambda tt, y: -y  # noqa: E731
    with pytest.raises(E.InputError, match="batch_dims"):
        pdb.solve(f, y0, t, batch_dims=0)
    with pytest.raises(E.InputError, match="torch backend"):
        pdb.solve(f, y0, t, batch_dims=1, backend="scipy")
    with pytest.raises(E.InputError, match="fixed-step"):
        pdb.solve(f, y0, t, batch_dims=1, method="rk4")
    with pytest.raises(E.UnknownOptionError, match="jump_t"):
        pdb.solve(f, y0, t, batch_dims=1, options={"jump_t": [0.5]})
    with pytest.raises(E.TimeGridError, match="shape"):
        pdb.solve(f, y0, torch.zeros(2, 2, dtype=DT), batch_dims=1)
    with pytest.raises(E.TimeGridError, match="sample 1"):
        pdb.solve(f, y0, torch.tensor([[0.0, 1.0], [0.0, 0.0], [0, 1]], dtype=DT),
                  batch_dims=1)
    with pytest.raises(E.RHSError):
        pdb.solve(lambda tt, y: y[:, :1], y0, t, batch_dims=1)



# -- the no-autograd CPU path: stage inputs, times and step sizes on reused buffers ----------

def _grad_vs_nograd(f, y0, t, **kw):
    a = pdb.solve(f, y0, t, batch_dims=1, **kw)  # autograd on: stages stacked afresh
    with torch.no_grad():
        b = pdb.solve(f, y0, t, batch_dims=1, **kw)
    for k in ("nfe", "steps", "accepted", "rejected"):
        assert torch.equal(getattr(a.stats, k), getattr(b.stats, k)), k
    assert torch.equal(a.status, b.status)
    return a, b


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_buffered_path_matches_autograd_path_and_scipy(method):
    mu, y0 = _vdp_batch(6)
    t = torch.linspace(0.0, 3.0, 7, dtype=DT)
    a, b = _grad_vs_nograd(VdP(mu), y0, t, rtol=1e-7, atol=1e-9, method=method)
    assert int(b.stats.rejected.sum()) > 0  # masked (partly rejected) steps ran
    torch.testing.assert_close(b.ys, a.ys.detach(), rtol=1e-13, atol=1e-13)
    for i in (0, 5):
        ref = scipy_integrate.solve_ivp(
            lambda tt, yy, m=float(mu[i]): [yy[1], m * (1 - yy[0] ** 2) * yy[1] - yy[0]],
            (0.0, 3.0), y0[i].numpy(), method="DOP853", rtol=1e-13, atol=1e-13,
            t_eval=t.numpy())
        torch.testing.assert_close(b.ys[:, i], torch.from_numpy(ref.y.T), rtol=1e-4, atol=1e-5)


def test_buffered_path_time_dependent_float32_and_outputs_kept():
    # each sample's own time reaches func (t buffers are rewritten every step: the outputs
    # must not alias them), float32 state and times (cast buffers)
    w = torch.tensor([1.0, 2.0, 3.0])
    y0 = torch.zeros(3, 1)
    t = torch.linspace(0, 2, 9)
    f = lambda tt, y: torch.cos(w * tt)[:, None]  # noqa: E731
    a, b = _grad_vs_nograd(f, y0, t, rtol=1e-6, atol=1e-7)
    exact = (torch.sin(w[None, :] * t[:, None]) / w)[..., None]
    torch.testing.assert_close(b.ys, exact, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.ys, a.ys, rtol=1e-6, atol=1e-7)


def test_buffered_path_nan_sample_and_max_steps():
    k, y0, t, f = _poisoned_decay()

    a, b = _grad_vs_nograd(f, y0, t, rtol=1e-8, atol=1e-10)
    assert int(b.status[2]) == Status.NONFINITE and torch.isnan(b.ys[-1, 2]).all()
    exact = torch.exp(-k[None, :, None] * t[:, None, None]).expand(5, 4, 2)
    torch.testing.assert_close(b.ys[:, [0, 1, 3]], exact[:, [0, 1, 3]], rtol=1e-6, atol=1e-8)
    mu = torch.tensor([0.5, 30.0], dtype=DT)
    yv = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=DT)
    a, b = _grad_vs_nograd(VdP(mu), yv, torch.tensor([0.0, 20.0], dtype=DT), rtol=1e-6,
                           atol=1e-8, options={"max_num_steps": 300})
    assert [int(v) for v in b.status] == [Status.SUCCESS, Status.MAX_STEPS]


def test_buffered_path_state_overflow_is_caught():
    # dy/dt = 1e308 for sample 1: a zero error estimate (every step accepted) while its state
    # overflows to inf; the sum-based finiteness check must catch it, sample 0 unaffected
    y0 = torch.zeros(2, 2, dtype=DT)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    rate = torch.tensor([[1.0], [1e308]], dtype=DT)
    a, b = _grad_vs_nograd(lambda tt, y: rate.expand(2, 2), y0, t)
    assert [int(v) for v in b.status] == [Status.SUCCESS, Status.NONFINITE]
    torch.testing.assert_close(b.ys[:, 0], torch.tensor([[0.0] * 2, [1.0] * 2, [2.0] * 2],
                                                        dtype=DT))
    assert not torch.isinf(b.ys).any()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_compiled_step_matches_plain_loop():
    # options={"compile": True}: the step through torch.compile takes the same decisions
    # (slow to compile: one small problem)
    mu, y0 = _vdp_batch(3)
    t = torch.linspace(0.0, 1.0, 3, dtype=DT)
    kw = dict(rtol=1e-6, atol=1e-8, batch_dims=1)
    with torch.no_grad():
        a = pdb.solve(VdP(mu), y0, t, **kw)
        b = pdb.solve(VdP(mu), y0, t, options={"compile": True}, **kw)
    torch.testing.assert_close(a.ys, b.ys, rtol=1e-12, atol=1e-12)
    assert torch.equal(a.stats.steps, b.stats.steps) and torch.equal(a.stats.nfe, b.stats.nfe)


@pytest.mark.parametrize("grad", [True, False])
def test_func_output_shape_checked_on_every_call(grad):
    # after its first (checked) call the loop calls func bare: a later wrong shape that would
    # broadcast silently must still raise
    y0 = torch.ones(3, 2, dtype=DT)
    calls = [0]

    def f(tt, y):
        calls[0] += 1
        return -y if calls[0] < 5 else -y[0]  # (2,) broadcasts against (3, 2)

    with torch.set_grad_enabled(grad), pytest.raises(E.RHSError, match="shape"):
        pdb.solve(f, y0, torch.tensor([0.0, 1.0], dtype=DT), batch_dims=1)
