"""The no-autograd fast path of the host loop (solvers/stages.py: LeanStages).

A solve without autograd takes the lean path; the same solve with ``y0.requires_grad`` takes
the general StageEngine path.  Both must make the same decisions and give the same numbers, and
the lean path's buffers must never leak into results (outputs that land on a step end, the
state a rejected retry starts from).
"""

import math

import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge.errors import RHSError
from pydiffbridge.solution import Status

METHODS = ("dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8")


class Spiral(torch.nn.Module):
    """A damped linear spiral in a (3, 2)-shaped state: dy/dt = y A, closed form via expm."""

    A = torch.tensor([[-0.1, -2.0], [2.0, -0.1]], dtype=torch.float64)

    def forward(self, t, y):
        return y @ self.A + 0.0 * t


def _both(func, y0, t, **kw):
    with torch.no_grad():
        lean = pdb.solve(func, y0, t, **kw)
    y0g = y0.clone().requires_grad_(True)
    general = pdb.solve(func, y0g, t, **kw)
    return lean, general


@pytest.mark.parametrize("method", METHODS)
def test_lean_matches_general_path_and_closed_form(method):
    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.3], [-2.0, 1.0]], dtype=torch.float64)
    t = torch.linspace(0, 6, 13, dtype=torch.float64)  # many outputs: some land on step ends
    lean, general = _both(Spiral(), y0, t, method=method, rtol=1e-7, atol=1e-9)
    assert lean.status == general.status == Status.SUCCESS
    assert (lean.stats.nfe, lean.stats.steps, lean.stats.accepted) == (
        general.stats.nfe, general.stats.steps, general.stats.accepted)
    assert lean.stats.rejected > 0 or method in ("dopri8",)  # retries ran from kept states
    assert torch.equal(lean.ys, general.ys.detach())  # the same arithmetic, bit for bit
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(Spiral.A * float(s)) for s in t])
    tol = 1e-3 if method in ("fehlberg2", "adaptive_heun", "bosh3") else 1e-5
    torch.testing.assert_close(lean.ys, exact, rtol=0, atol=tol)


def test_lean_with_tolerance_tensors_and_custom_norm():
    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.3], [-2.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    atol = torch.tensor([1e-9, 1e-6], dtype=torch.float64)
    for opts in ({}, {"norm": lambda x: x.abs().max()}):
        lean, general = _both(Spiral(), y0, t, method="dopri5", rtol=1e-6, atol=atol,
                              options=opts)
        assert lean.stats.nfe == general.stats.nfe
        torch.testing.assert_close(lean.ys, general.ys.detach(), rtol=1e-12, atol=1e-13)


def test_lean_outputs_are_not_overwritten_by_later_steps():
    """dopri8 lands exactly on output times: those outputs are the step's new state, which the
    lean loop keeps in a buffer row; they must be copies."""
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 3, 31, dtype=torch.float64)
    with torch.no_grad():
        ys = pdb.odeint(Spiral(), y0, t, method="dopri8", rtol=1e-10, atol=1e-12)
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(Spiral.A * float(s)) for s in t])
    torch.testing.assert_close(ys, exact, rtol=0, atol=1e-8)
    assert len({v.untyped_storage().data_ptr() for v in ys.unbind(0)}) == 1  # one stacked tensor


def test_lean_checks_func_output():
    y0 = torch.ones(4, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    calls = [0]

    def late_wrong_shape(t, y):  # right on the first calls (general path), wrong in the loop
        calls[0] += 1
        return -y if calls[0] < 4 else -y[:1]

    with torch.no_grad(), pytest.raises(RHSError, match="shape"):
        pdb.odeint(late_wrong_shape, y0, t, method="dopri5")
    calls[0] = 0

    def late_wrong_dtype(t, y):  # an integer result is unusable; a float32 one is cast
        calls[0] += 1
        return -y if calls[0] < 4 else (-y).long()

    with torch.no_grad(), pytest.raises(RHSError, match="floating-point"):
        pdb.odeint(late_wrong_dtype, y0, t, method="dopri5")


def test_lean_blow_up_reports_like_the_general_path():
    """y' = y² from y(0)=1 blows up at t=1: both paths stop with the same status, and the
    reached outputs agree with 1/(1-t)."""
    y0 = torch.ones(3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 0.9, 2.0], dtype=torch.float64)
    lean, general = _both(lambda t, y: y * y, y0, t, method="dopri5", rtol=1e-8, atol=1e-10)
    assert lean.status == general.status and lean.status != Status.SUCCESS
    assert lean.stats.nfe == general.stats.nfe
    for j, tj in enumerate([0.0, 0.5, 0.9]):
        torch.testing.assert_close(lean.ys[j], torch.full((3,), 1 / (1 - tj),
                                                          dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.isnan(lean.ys[-1]).all()


def test_lean_overflow_to_inf_is_caught():
    """dy/dt = 1e308: the error estimate is exactly 0 (ratio 0, every step accepted) while the
    state overflows to +inf past t = 1.797: both paths must stop there, never return Inf."""
    y0 = torch.zeros(2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    lean, general = _both(lambda t, y: torch.full_like(y, 1e308), y0, t, method="dopri5")
    for sol in (lean, general):
        assert sol.status == Status.NONFINITE and "became NaN/Inf" in sol.message
        torch.testing.assert_close(sol.ys[1], torch.full((2,), 1e308, dtype=torch.float64))
        assert not any(math.isinf(v) for v in sol.ys[-1].tolist())


def test_cached_coefficients_made_in_inference_mode_still_serve_autograd():
    """The tableau and dense-output coefficients are cached per dtype/device; when the first
    solve runs under inference_mode they must still work in a later differentiable solve."""
    from pydiffbridge.solvers import batched_step, interp, tableaus

    tableaus.coefficients.cache_clear()
    interp._dopri5_coeffs.cache_clear()
    batched_step._interp_poly.cache_clear()
    y0 = torch.tensor([[1.0, 0.5], [0.2, -1.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, 1.5], dtype=torch.float64)
    k = torch.tensor(0.8, dtype=torch.float64)
    with torch.inference_mode():
        for bd in (None, 1):
            pdb.solve(lambda tt, y: -k * y, y0, t, method="dopri5", batch_dims=bd)
    for bd in (None, 1):
        kk = k.clone().requires_grad_(True)
        ys = pdb.odeint(lambda tt, y, kk=kk: -kk * y, y0, t, method="dopri5", rtol=1e-10,
                        atol=1e-12, batch_dims=bd)
        ys[-1].sum().backward()  # d/dk sum(y0 e^{-k t}) = -t sum(y0) e^{-k t}
        expect = -1.5 * y0.sum() * torch.exp(-0.8 * torch.tensor(1.5, dtype=torch.float64))
        torch.testing.assert_close(kk.grad, expect, rtol=1e-7, atol=0)
