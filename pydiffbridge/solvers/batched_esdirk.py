"""One per-sample step of ``kvaerno5`` (:data:`~pydiffbridge.solvers.esdirk.KVAERNO5`) for the
per-sample stiff loop (:mod:`~pydiffbridge.solvers.batched_stiff`).

Each implicit stage ``z = s_i + h gamma f(t_i, y + z)`` is solved by simplified Newton for
all samples at once, with each sample's own LU of ``I - h_b gamma J_b`` (``J`` at the step's
start, fresh every step) and its own convergence test (as the single-solve
:class:`~pydiffbridge.solvers.esdirk.EsdirkScheme`: contraction rate ``theta``, stop when
``theta/(1-theta) |dz| <= newton_tol``, fail when ``theta >= 1``, on NaN/Inf or after
``max_iters``).  A sample that converged keeps its ``z`` while the others iterate; one whose
iteration failed is reported in the returned mask, and the loop rejects its step and retries
with half the step.  Under autograd every converged stage takes one more Newton step with its
graph and a Jacobian at the converged point (the single solve's "exact step").  Dense output:
the cubic Hermite interpolant through ``(y, f0)`` and ``(y1, f1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .esdirk import KVAERNO5

__all__ = ["esdirk_step", "newton_tol"]


def newton_tol(rtol, opts: dict) -> float:
    """The Newton tolerance (a fraction of the error scale), as EsdirkScheme's."""
    r = float(torch.as_tensor(rtol).max())
    eps = torch.finfo(torch.float64).eps
    return float(opts.get("newton_tol") or max(10 * eps / max(r, 1e-300),
                                                min(1e-3, 0.01 * math.sqrt(r))))


def _rms(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=1) / math.sqrt(v.shape[1])


def esdirk_step(fc: Callable, derivs: Callable, t, y, h, ht, f0, lu, solve: Callable,
                keep: Callable, rtol, atol, tol: float, max_iters: int):
    """One step for the batch: ``t``/``ht`` ``(B,)`` (stage times ``t + c ht``), ``h`` ``(B, 1)``
    (the algebra's step), ``lu`` factors ``I/(h gamma) - J``.  Returns ``(y1, err, (f0, f1),
    ok)``, ``ok`` the samples whose Newton iterations all converged."""
    tab = KVAERNO5
    hg = h * tab["gamma"]
    grad = torch.is_grad_enabled()
    yd = y.detach()
    with torch.no_grad():
        sc = yd.abs() * rtol + atol
        floor_eps = 100 * torch.finfo(y.dtype).eps
    ks = [f0]
    ok = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    z = None
    for i in range(1, len(tab["c"])):
        ti = t + tab["c"][i] * ht
        s_i = keep(sum((ks[j] * (h * a) for j, a in enumerate(tab["a"][i]) if a != 0.0),
                       torch.zeros_like(y)))
        with torch.no_grad():
            sd = s_i.detach()
            k0 = sum((ks[j].detach() * p for j, p in enumerate(tab["pred"][i])),
                     torch.zeros_like(yd))
            z = keep(sd + hg * k0)
            floor = floor_eps * (yd.abs().amax(1) + sd.abs().amax(1) + (hg * k0).abs().amax(1))
            done = torch.zeros_like(ok)
            prev = None
            for _ in range(max_iters):
                G = z - sd - hg * fc(ti, yd + z)
                dz = keep(-solve(lu, G) / hg)
                nd = torch.nan_to_num(_rms(dz / sc), nan=math.inf)
                bad = ~torch.isfinite(nd)
                z = torch.where((done | bad)[:, None], z, z + dz)
                conv = (nd == 0) | (dz.abs().amax(1) <= floor)
                if prev is None:
                    conv |= nd <= 1e-2 * tol
                else:
                    theta = nd / prev
                    bad |= theta >= 1.0
                    conv |= (theta < 1.0) & (theta / (1.0 - theta) * nd <= tol)
                ok &= ~(bad & ~done)
                done |= conv | bad
                prev = nd if prev is None else torch.where(done, prev, nd)
                if bool(done.all()):
                    break
            ok &= done
        if grad:  # one Newton step with the graph, from the converged z
            with torch.no_grad():
                Jz = derivs(ti, yd + z)[1].detach()
                eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
                luz = torch.linalg.lu_factor_ex(eye / hg[:, :, None] - Jz)[:2]
            G = z - s_i - hg * fc(ti, y + z)
            z = z - keep(solve(luz, G) / hg)
        ks.append(keep((z - s_i) / hg))
    err = h * sum(ks[j] * c for j, c in enumerate(tab["e"]) if c != 0.0)
    return y + z, err, (f0, ks[-1]), ok
