"""``gradient="interpolated"`` with per-sample stepping (``batch_dims``,
pydiffbridge.gradients.batched_interp): gradients w.r.t. ``y0``, a per-sample parameter and the
output times against the closed forms of linear systems ``y' = k_b A y`` (matrix exponentials),
for explicit and stiff methods, shared and per-sample output times.

Tolerances: the solves run at rtol 1e-9; the backward solve of ``[a, g]`` at the same
tolerance, with ``z`` from the forward's dense output (whose error is the forward's, ~1e-9
relative), so the gradients are good to ~1e-7 relative; asserted to 1e-5.
"""

import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge.errors import InputError, SolverError
from pydiffbridge.solution import Status

D = torch.float64
MILD = torch.tensor([[-1.0, 0.5], [0.0, -2.0]], dtype=D)
STIFF = torch.tensor([[-1.0, 0.0], [999.0, -1000.0]], dtype=D)  # eigenvalues -1, -1000


def _closed_form(A, k, y0, t, w):
    """L = sum_j <w_j, y_b(t_bj)>, y_b(t) = exp(k_b A (t - t_b0)) y0_b: the value and the
    gradients w.r.t. y0, k and t."""
    B, m = t.shape
    gy0, gk, gt = torch.zeros_like(y0), torch.zeros_like(k), torch.zeros_like(t)
    L = 0.0
    for b in range(B):
        for j in range(1, m):
            tau = t[b, j] - t[b, 0]
            E = torch.linalg.matrix_exp(k[b] * A * tau)
            yj = E @ y0[b]
            L += float(w[j] @ yj)
            gy0[b] += E.T @ w[j]
            gk[b] += w[j] @ (tau * A @ yj)
            d = w[j] @ (k[b] * A @ yj)  # d y(t_j) / d t_j, and minus that for t_0
            gt[b, j] += d
            gt[b, 0] -= d
    return L, gy0, gk, gt


@pytest.mark.parametrize("method,A", [("dopri5", MILD), ("tsit5", MILD), ("rodas5", STIFF),
                                      ("kvaerno5", STIFF), ("auto", STIFF)])
@pytest.mark.parametrize("per_sample_t", [False, True])
def test_gradients_against_closed_form(method, A, per_sample_t):
    k = torch.tensor([1.0, 0.5, 2.0], dtype=D, requires_grad=True)
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-0.3, 0.7]], dtype=D, requires_grad=True)
    if per_sample_t:
        t = torch.tensor([[0.0, 0.4, 1.0], [0.1, 0.3, 0.8], [0.2, 0.5, 1.5]], dtype=D)
    else:
        t = torch.tensor([0.0, 0.4, 1.0], dtype=D)
    t.requires_grad_(True)
    w = torch.tensor([[0.0, 0.0], [1.0, -0.5], [0.3, 2.0]], dtype=D)

    def f(tt, y):
        return k[:, None] * (y @ A.T)

    sol = pdb.solve(f, y0, t, method=method, rtol=1e-9, atol=1e-11, batch_dims=1,
                    gradient="interpolated", adjoint_params=(k,))
    assert bool((sol.status == int(Status.SUCCESS)).all())
    loss = (sol.ys * w[:, None, :]).sum()
    gy0, gk, gt = torch.autograd.grad(loss, (y0, k, t))
    tb = t.detach().expand(3, -1) if not per_sample_t else t.detach()
    L, ry0, rk, rt = _closed_form(A, k.detach(), y0.detach(), tb, w)
    assert abs(float(loss.detach()) - L) <= 1e-7 * abs(L)
    if not per_sample_t:
        rt = rt.sum(0)
    for got, ref in ((gy0, ry0), (gk, rk), (gt, rt)):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7), (got, ref)
    assert sol.stats.nfe_backward > 0 and sol.stats.steps_backward > 0


def test_tuple_state_two_batch_dims_and_adjoint_method():
    """A tuple state with two batch dimensions and a different backward method: the same
    gradients as direct backprop (both within ~1e-7 of the exact ones at rtol 1e-9)."""
    lam = torch.tensor([[1.0, 3.0], [200.0, 0.5]], dtype=D, requires_grad=True)

    def f(tt, y):
        return (-lam[..., None] * y[0], -y[1] + y[0][..., :1])

    y0 = (torch.ones(2, 2, 1, dtype=D, requires_grad=True),
          torch.full((2, 2, 2), 0.5, dtype=D, requires_grad=True))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    grads = {}
    for how, extra in (("direct", {}), ("interpolated", {"adjoint_method": "rodas4"})):
        sol = pdb.solve(f, y0, t, method="rodas5", rtol=1e-9, atol=1e-11, batch_dims=2,
                        gradient=how, adjoint_params=(lam,), **extra)
        assert sol.ys[0].shape == (3, 2, 2, 1) and sol.ys[1].shape == (3, 2, 2, 2)
        loss = (sol.ys[0] ** 2).sum() + sol.ys[1][-1].sum()
        grads[how] = torch.autograd.grad(loss, (*y0, lam))
    for a, b in zip(grads["direct"], grads["interpolated"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8), (a, b)


def test_bad_options_and_failed_forward():
    k = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(InputError, match="record"):
        pdb.solve(lambda tt, y: -k[:, None] * y, y0, t, method="rodas5", batch_dims=1,
                  gradient="interpolated", adjoint_params=(k,),
                  adjoint_options={"checkpoints": 4})
    with pytest.raises(InputError, match="dopri5"):  # (its dense output is a cubic Hermite)
        pdb.solve(lambda tt, y: -k[:, None] * y, y0, t, method="dopri8", batch_dims=1,
                  gradient="interpolated", adjoint_params=(k,))
    first = torch.tensor([True, False])

    def bad(tt, y):
        return torch.where(((tt > 0.5) & first)[:, None], torch.nan, -k[:, None] * y)

    sol = pdb.solve(bad, y0, t, method="rodas5", batch_dims=1, gradient="interpolated",
                    adjoint_params=(k,), raise_on_failure=False)
    assert sol.status.tolist() == [int(Status.NONFINITE), 0]
    with pytest.raises(SolverError, match="status"):
        sol.ys[-1, 1].sum().backward()
