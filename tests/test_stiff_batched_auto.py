"""Per-sample stiffness switching (``method="auto"`` with ``batch_dims``,
pydiffbridge.solvers.batched_auto) against SciPy Radau at rtol 1e-10, closed forms, the
single-solve ``auto`` (each sample's switch decisions and step counts), finite differences
(gradcheck) and the direct gradient (adjoint).

Error measure as in test_stiff_problems.py: ``max |y - y_ref| / (rtol |y_ref| + atol)``, the
global error in units of the requested tolerance, bounded by 100.
"""

import math

import pytest
import torch
from scipy.integrate import solve_ivp

import pydiffbridge as pdb
from pydiffbridge.bench.stiff_problems import STIFF_PROBLEMS, ensemble
from pydiffbridge.errors import InputError, UnknownOptionError
from pydiffbridge.solution import Status

D = torch.float64


def _vdp(mu):
    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)
    return f


def test_each_sample_switches_on_its_own():
    """Van der Pol with mu = 1000, 10, 1 and 0.5 in one batch: the stiff sample switches to
    rodas5, the non-stiff ones stay explicit (0 switches), and every sample takes the steps
    and switches of a single ``auto`` solve of that sample alone (the same tests on the same
    numbers; batched arithmetic may round differently, so steps within 2 %).  Each sample
    against Radau at rtol 1e-10."""
    mu = torch.tensor([1000.0, 10.0, 1.0, 0.5], dtype=D)
    y0 = torch.tensor([[2.0, 0.0]] * 4, dtype=D)
    t = torch.linspace(0.0, 20.0, 6, dtype=D)
    rtol = atol = 1e-6
    sol = pdb.solve(_vdp(mu), y0, t, method="auto", rtol=rtol, atol=atol,
                    batch_dims=1)
    assert bool((sol.status == int(Status.SUCCESS)).all()), sol.message
    assert torch.equal(sol.stats.steps, sol.stats.accepted + sol.stats.rejected)
    sw = sol.stats.switches.tolist()
    assert sw[0] >= 1 and sw[2] == 0 and sw[3] == 0, sw
    for b in range(4):
        one = pdb.solve(_vdp(float(mu[b])), y0[b], t, method="auto", rtol=rtol, atol=atol)
        assert one.stats.switches == sw[b], (b, one.stats.switches, sw)
        s_b = int(sol.stats.steps[b])
        assert abs(s_b - one.stats.steps) <= 0.02 * one.stats.steps + 1, (b, s_b, one.stats)
        r = solve_ivp(lambda _, z, m=float(mu[b]): [z[1], m * (1 - z[0] ** 2) * z[1] - z[0]],
                      (0.0, 20.0), [2.0, 0.0], method="Radau", t_eval=t.numpy(), rtol=1e-10,
                      atol=1e-12)
        ref = torch.tensor(r.y.T, dtype=D)
        err = float(((sol.ys[:, b] - ref).abs() / (rtol * ref.abs() + atol)).max())
        assert err < 100, (b, err)


def test_far_fewer_steps_than_explicit_per_sample():
    """The stiff sample (mu = 1000 over [0, 3000], most of a relaxation period) needs far
    fewer steps with auto than with per-sample tsit5, which is held to 8000 steps."""
    p = STIFF_PROBLEMS["vdp"]
    y0 = ensemble(p, 2)
    t = p.times(4)
    kw = dict(rtol=1e-6, atol=1e-6 * p.atol_scale, batch_dims=1)
    ours = pdb.solve(p.rhs, y0, t, method="auto", **kw)
    assert bool((ours.status == int(Status.SUCCESS)).all()), ours.message
    assert bool((ours.stats.switches >= 1).all())
    exp = pdb.solve(p.rhs, y0, t, method="tsit5", options={"max_num_steps": 8000}, **kw)
    assert bool((exp.status == int(Status.MAX_STEPS)).all())
    assert int(ours.stats.steps.max()) < 0.2 * 8000


def test_switches_back_per_sample_on_a_nonstiff_phase():
    """y' = -lam_b(t) (y - sin t) + cos t (exact solution sin t) with lam_b falling from 1e4
    to 1 at t = 3 for sample 0 and at t = 8 for sample 1, and constant 1 for sample 2: the
    first two switch to rodas5 and back (>= 2 switches), the third never switches; all
    within 1e-4 of sin t."""
    tc = torch.tensor([3.0, 8.0, -1e3], dtype=D)

    def f(t, y):
        lam = 1.0 + 1e4 * torch.sigmoid(-10.0 * (t - tc))
        return -lam[:, None] * (y - torch.sin(t)[:, None]) + torch.cos(t)[:, None]

    t = torch.linspace(0.0, 20.0, 11, dtype=D)
    sol = pdb.solve(f, torch.zeros(3, 1, dtype=D), t, method="auto", rtol=1e-6, atol=1e-8,
                    batch_dims=1)
    assert bool((sol.status == int(Status.SUCCESS)).all()), sol.message
    sw = sol.stats.switches.tolist()
    assert sw[0] >= 2 and sw[1] >= 2 and sw[2] == 0, sw
    assert float((sol.ys[..., 0] - torch.sin(t)[:, None]).abs().max()) < 1e-4


@pytest.mark.parametrize("name", ["robertson", "hires"])
def test_stiff_problems_against_radau(name):
    p = STIFF_PROBLEMS[name]
    y0 = ensemble(p, 3)
    t = p.times(5)
    rtol = 1e-6
    atol = rtol * p.atol_scale
    sol = pdb.solve(p.rhs, y0, t, method="auto", rtol=rtol, atol=atol, batch_dims=1,
                    options={"stiff_method": "rodas4"})
    assert bool((sol.status == int(Status.SUCCESS)).all()), sol.message
    assert bool((sol.stats.switches >= 1).all())
    for b in range(3):
        r = solve_ivp(p.rhs_np, (float(t[0]), float(t[-1])), y0[b].numpy(), method="Radau",
                      t_eval=t.numpy(), rtol=1e-10, atol=1e-12 * p.atol_scale, jac=p.jac_np)
        ref = torch.tensor(r.y.T, dtype=D)
        err = float(((sol.ys[:, b] - ref).abs() / (rtol * ref.abs() + atol)).max())
        assert err < 100, (b, err)


def _stiff_rhs(k):
    """k[0] = 1e4 makes tsit5 stability-limited (sample 0 switches after stiff_detect=3
    steps); the second sample's k[1] = 1 keeps it explicit."""
    def g(tt, y):
        return torch.stack([-k[:, 0] * y[:, 0] + k[:, 1] * y[:, 1] ** 2 + torch.sin(tt),
                            k[:, 0] * y[:, 0] - 3.0 * y[:, 1]], 1)
    return g


def test_gradcheck_direct_through_switches():
    """Adaptive at rtol 1e-9 (the step sizes carry no gradient and move the result by ~1e-9
    under gradcheck's perturbations, far below its atol), through a switch in sample 0
    (k[0] = 1e4) and none in sample 1."""
    t = torch.tensor([0.0, 0.02, 0.05], dtype=D)

    def run(y0, k):
        return pdb.solve(_stiff_rhs(k), y0, t, method="auto", rtol=1e-9, atol=1e-11,
                         batch_dims=1, options={"stiff_detect": 3})

    y0 = torch.tensor([[1.0, 0.5], [0.3, -0.2]], dtype=D, requires_grad=True)
    k = torch.tensor([[1e4, 2.0], [1.0, 0.5]], dtype=D, requires_grad=True)
    sw = run(y0, k).stats.switches.tolist()
    assert sw[0] >= 1 and sw[1] == 0, sw
    assert torch.autograd.gradcheck(lambda a, b: run(a, b).ys[1:], (y0, k), atol=1e-5,
                                    rtol=1e-4)


@pytest.mark.parametrize("mode,k0", [("checkpointed", 1e4), ("adjoint", 5.0)])
def test_adjoint_matches_direct(mode, k0):
    """gradient='checkpointed' (per-sample auto forward, re-solved from checkpoints with the
    graph, through the switch of sample 0 at k0 = 1e4) and the plain 'adjoint' (joint backward
    with auto on the whole batch; mildly stiff, k0 = 5: its backward z-solve is unstable on
    strongly stiff problems with any method, see the README) against direct backprop, all at
    rtol 1e-9: agreement to 1e-5 relative."""
    k = torch.tensor([[k0, 2.0], [1.0, 0.5]], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=D)
    y0 = torch.tensor([[1.0, 0.5], [0.3, -0.2]], dtype=D, requires_grad=True)
    grads = {}
    for how in ("direct", mode):
        sol = pdb.solve(_stiff_rhs(k), y0, t, method="auto", rtol=1e-9, atol=1e-11,
                        batch_dims=1, gradient=how, adjoint_params=(k,),
                        options={"stiff_detect": 3})
        if k0 > 1e3:
            assert int(sol.stats.switches[0]) >= 1
        grads[how] = torch.autograd.grad((sol.ys ** 2).sum(), (y0, k))
    for a, b in zip(grads["direct"], grads[mode], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8), (a, b)


def test_output_time_gradients_closed_form():
    """Per-sample output times with gradients: y' = -lam (y - cos t) - sin t has the solution
    y(t) = cos t + (y0 - cos t0) e^{-lam (t - t0)}; lam = 1e4 (switches) and 1 (does not).
    d/dt_j of sum_j y(t_j) against the closed form's derivative.  atol 1e-5: on this problem
    the direct gradient of the discrete stiff scheme is off by ~3e-6 at rtol 1e-8 for the
    single solve too (rodas5: 8e-7, auto: 2.8e-6), where the gradients are O(1)."""
    lam = torch.tensor([1e4, 1.0], dtype=D)

    def f(t, y):
        return -lam[:, None] * (y - torch.cos(t)[:, None]) - torch.sin(t)[:, None]

    t = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.6, 1.5]], dtype=D, requires_grad=True)
    y0 = torch.tensor([[2.0], [1.5]], dtype=D)
    sol = pdb.solve(f, y0, t, method="auto", rtol=1e-8, atol=1e-10, batch_dims=1,
                    options={"stiff_detect": 3})
    assert int(sol.stats.switches[0]) >= 1 and int(sol.stats.switches[1]) == 0
    (gt,) = torch.autograd.grad(sol.ys[1:].sum(), t)
    with torch.no_grad():
        td = t.detach()
        t0 = td[:, :1]
        c0 = y0 - torch.cos(t0)
        e = torch.exp(-lam[:, None] * (td[:, 1:] - t0))
        dj = -torch.sin(td[:, 1:]) - lam[:, None] * c0 * e  # d y(t_j) / d t_j
        d0 = ((torch.sin(t0) + lam[:, None] * c0) * e).sum(1, keepdim=True)  # d/dt0
        ref = torch.cat([d0, dj], 1)
    assert torch.allclose(gt, ref, rtol=1e-5, atol=1e-5), (gt, ref)


def test_failures_are_per_sample():
    """A sample whose func turns NaN fails with NONFINITE; the others finish (one of them after
    switching to the stiff method)."""
    k = torch.tensor([1.0, 1e4, 1.0], dtype=D)[:, None]
    first = torch.tensor([True, False, False])

    def f(t, y):
        return torch.where(((t > 0.5) & first)[:, None], torch.nan, -k * y)

    y0 = torch.ones(3, 1, dtype=D)
    sol = pdb.solve(f, y0, torch.tensor([0.0, 1.0], dtype=D), method="auto", batch_dims=1,
                    rtol=1e-6, atol=1e-8)
    assert sol.status.tolist() == [int(Status.NONFINITE), 0, 0], sol.status
    assert int(sol.stats.switches[1]) >= 1
    ref = torch.exp(-torch.tensor([1e4, 1.0], dtype=D))
    assert torch.allclose(sol.ys[-1, 1:, 0], ref, rtol=1e-4, atol=1e-8)
    assert not math.isfinite(float(sol.ys[-1, 0, 0]))


def test_bad_options_raise_clear_errors():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(2, 3, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(InputError, match="stiff_method"):
        pdb.solve(f, y0, t, method="auto", batch_dims=1, options={"stiff_method": "kvaerno5"})
    with pytest.raises(InputError, match="stiff_detect"):
        pdb.solve(f, y0, t, method="auto", batch_dims=1, options={"stiff_detect": 0})
    with pytest.raises(UnknownOptionError, match="auto"):
        pdb.solve(f, y0, t, method="rodas5", batch_dims=1, options={"stiff_detect": 3})
    with pytest.raises(UnknownOptionError, match="kvaerno5"):
        pdb.solve(f, y0, t, method="auto", batch_dims=1, options={"newton_tol": 1e-3})


@pytest.mark.parametrize("method", ["auto", "rodas5"])
@pytest.mark.parametrize("mode", ["checkpointed", "interpolated"])
def test_stable_adjoints_on_a_strongly_stiff_batch(method, mode):
    """Robertson (rate constants k as parameters), a batch of 2, gradient='checkpointed' (the
    per-sample forward re-solved from checkpoints with the graph) and 'interpolated' (z from
    the forward's dense output): no back-solve of z (the plain adjoint's z-solve underflows
    here).  d loss / dk against central differences of
    SciPy Radau at rtol 1e-10 (relative step 1e-5: the solves' errors of ~1e-13 in the loss give
    ~1e-7 relative in the differences), within 1e-5 relative: the solve runs at rtol 1e-7
    (measured: 2e-8)."""
    p = STIFF_PROBLEMS["robertson"]
    y0 = ensemble(p, 2)
    t = p.times(4)
    k0 = [0.04, 3e7, 1e4]
    k = torch.tensor(k0, dtype=D, requires_grad=True)

    def f(tt, y):
        a, b, c = y[:, 0], y[:, 1], y[:, 2]
        return torch.stack([-k[0] * a + k[2] * b * c, k[0] * a - k[2] * b * c - k[1] * b * b,
                            k[1] * b * b], 1)

    sol = pdb.solve(f, y0, t, method=method, rtol=1e-7, atol=1e-7 * p.atol_scale,
                    batch_dims=1, gradient=mode, adjoint_params=(k,))
    (g,) = torch.autograd.grad(sol.ys[-1, :, 0].sum() + sol.ys[1, :, 1].sum(), k)

    def loss(kv):
        total = 0.0
        for b in range(2):
            def rhs(_, z):
                return [-kv[0] * z[0] + kv[2] * z[1] * z[2],
                        kv[0] * z[0] - kv[2] * z[1] * z[2] - kv[1] * z[1] ** 2,
                        kv[1] * z[1] ** 2]
            def jac(_, z):
                return [[-kv[0], kv[2] * z[2], kv[2] * z[1]],
                        [kv[0], -kv[2] * z[2] - 2 * kv[1] * z[1], -kv[2] * z[1]],
                        [0.0, 2 * kv[1] * z[1], 0.0]]
            r = solve_ivp(rhs, (0.0, float(t[-1])), y0[b].numpy(), method="Radau", jac=jac,
                          t_eval=t.numpy(), rtol=1e-10, atol=1e-14)
            total += r.y[0, -1] + r.y[1, 1]
        return total

    for i in range(3):
        e = 1e-5 * k0[i]
        hi, lo = list(k0), list(k0)
        hi[i] += e
        lo[i] -= e
        ref = (loss(hi) - loss(lo)) / (2 * e)
        assert abs(float(g[i]) - ref) <= 1e-5 * abs(ref), (i, float(g[i]), ref)
