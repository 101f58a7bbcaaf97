"""The native adaptive stiff methods on Robertson, Van der Pol (mu = 1000) and HIRES, through
``pydiffbridge.solve``, against SciPy's Radau at rtol 1e-10 (computed here).

Error measure: ``max |y - y_ref| / (rtol |y_ref| + atol)`` over the output times and
components, i.e. the global error in units of the requested tolerance.  Step-size control
bounds the *local* error; the global error is that times the problem's error amplification,
which is large on Van der Pol (a timing error of a relaxation jump moves the whole state) and
on Robertson's tiny y2.  The bound used, 100, is two decades; SciPy's own BDF at the same
tolerances measures 6-13 (Robertson), 170-500 (Van der Pol) and 55-130 (HIRES) in these units
(printed by ``python -m pydiffbridge bench --preset stiff``).
"""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pydiffbridge as pdb
from pydiffbridge.bench.stiff_problems import STIFF_PROBLEMS
from pydiffbridge.solution import Status

D = torch.float64
_REF: dict = {}


def _ref(name):
    if name not in _REF:
        p = STIFF_PROBLEMS[name]
        t = p.times(6)
        r = solve_ivp(p.rhs_np, (0.0, p.t_end), np.array(p.y0), method="Radau", t_eval=t.numpy(),
                      rtol=1e-10, atol=1e-12 * p.atol_scale, jac=p.jac_np)
        assert r.success
        _REF[name] = (t, torch.tensor(r.y.T, dtype=D))
    return _REF[name]


def _err(sol, ref, rtol, atol):
    return float(((sol.ys - ref).abs() / (rtol * ref.abs() + atol)).max())


CASES = [(pn, m, rtol) for pn in STIFF_PROBLEMS for m, rtol in
         [("rodas4", 1e-6), ("rodas5", 1e-6), ("kvaerno5", 1e-6), ("rosenbrock23", 1e-4),
          ("auto", 1e-6)]]


@pytest.mark.parametrize("name,method,rtol", CASES)
def test_error_against_radau(name, method, rtol):
    p = STIFF_PROBLEMS[name]
    t, ref = _ref(name)
    atol = rtol * p.atol_scale
    sol = pdb.solve(p.rhs, torch.tensor(p.y0, dtype=D), t, method=method, rtol=rtol, atol=atol)
    assert sol.status == Status.SUCCESS, sol.message
    assert sol.stats.steps == sol.stats.accepted + sol.stats.rejected
    err = _err(sol, ref, rtol, atol)
    assert err < 100, err


@pytest.mark.parametrize("name,cap", [("robertson", 4000), ("vdp", 8000), ("hires", 4000)])
@pytest.mark.parametrize("method", ["rodas5", "kvaerno5"])
def test_far_fewer_steps_than_dopri5(name, cap, method):
    p = STIFF_PROBLEMS[name]
    t, _ = _ref(name)
    y0 = torch.tensor(p.y0, dtype=D)
    kw = dict(rtol=1e-6, atol=1e-6 * p.atol_scale)
    ours = pdb.solve(p.rhs, y0, t, method=method, **kw)
    exp = pdb.solve(p.rhs, y0, t, method="dopri5", options={"max_num_steps": cap}, **kw)
    assert ours.success
    # dopri5 is held to `cap` steps (it stops with MAX_STEPS, or needs at least this many)
    assert exp.status == Status.MAX_STEPS or exp.stats.steps >= cap // 2
    assert ours.stats.steps < 0.15 * exp.stats.steps, (ours.stats.steps, exp.stats.steps)


def test_auto_switches_on_van_der_pol():
    p = STIFF_PROBLEMS["vdp"]
    t, ref = _ref("vdp")
    sol = pdb.solve(p.rhs, torch.tensor(p.y0, dtype=D), t, method="auto", rtol=1e-6, atol=1e-6)
    assert sol.success
    assert sol.stats.switches >= 1
    exp = pdb.solve(p.rhs, torch.tensor(p.y0, dtype=D), t, method="tsit5", rtol=1e-6, atol=1e-6,
                    options={"max_num_steps": 8000})
    assert exp.status == Status.MAX_STEPS
    assert sol.stats.steps < 0.2 * 8000


def test_auto_switches_back_on_a_nonstiff_phase():
    # y' = -lam(t) (y - sin t) + cos t, exact solution sin t; lam falls from 1e4 to 1 at t = 5
    def f(t, y):
        lam = 1.0 + 1e4 * torch.sigmoid(-10.0 * (t - 5.0))
        return -lam * (y - torch.sin(t)) + torch.cos(t)

    t = torch.linspace(0.0, 20.0, 11, dtype=D)
    sol = pdb.solve(f, torch.zeros(1, dtype=D), t, method="auto", rtol=1e-6, atol=1e-8)
    assert sol.success
    assert sol.stats.switches >= 2  # tsit5 -> rodas5 (stiff phase) -> tsit5 (non-stiff phase)
    assert float((sol.ys[:, 0] - torch.sin(t)).abs().max()) < 1e-4
    stiff_only = pdb.solve(f, torch.zeros(1, dtype=D), t, method="rodas5", rtol=1e-6, atol=1e-8)
    assert stiff_only.stats.switches == 0
