"""Fixed-grid implicit Runge-Kutta methods: torchdiffeq's ``implicit_euler`` ... ``trbdf2``.

One step solves the stage equations in the increments ``Z_i = Y_i - y0`` (Hairer & Wanner,
*Solving ODEs II*, 2nd ed., Sec. IV.8)::

    Z_i = h * sum_j a_ij f(t0 + c_j h, y0 + Z_j)

by simplified Newton with ``J = df/dy(t0, y0)`` taken once per step (autograd, finite
differences or a user ``jacobian`` callable) and a Newton matrix factorised once per step
(refreshed at the current iterate only when the contraction rate exceeds 0.2: a fixed grid
cannot shrink the step, as Hairer's RADAU5 would):

* fully implicit methods (Radau IIA, Gauss-Legendre) solve the ``s*n`` system at once with the
  matrix ``I - h A (x) J`` (ibid.) and return ``y1 = y0 + sum_i d_i Z_i``,
  ``d^T = b^T A^{-1}`` (ibid.): no evaluation after the last Newton step;
* diagonally implicit methods go stage by stage with ``I - h a_ii J``, one factorisation per
  distinct ``a_ii``; ``k_i = (Z_i - h sum_{j<i} a_ij k_j) / (h a_ii)`` (no extra evaluation);
  an explicit first stage (``a_11 = 0``, ``c_1 = 0``) is ``f0``.

The first iterate is one linearly implicit step that uses ``f0`` only (the W-method predictor
``(I - h A (x) J) Z = h c (x) f0``): exact for linear autonomous problems, whose Newton then
stops after its first evaluation.  Convergence: the scaled RMS norm of the increment
(scale ``atol + rtol |y0|``) is below ``newton_tol``, or its predicted remainder
``theta / (1 - theta) |dZ|`` is (Hairer & Wanner, Sec. IV.8), or it is at roundoff
(100 eps relative).  Non-convergence, divergence (the increment grows twice in a row) and NaN
give a :class:`ConvergenceWarning` and the last iterate.

Gradients are the exact implicit-function-theorem derivative: Newton's arithmetic is detached;
when autograd is on and something upstream requires grad, one final Newton step is taken from
the detached converged stages with the exact Jacobians *at those stages*, so
``dZ/dp = (I - h A (x) J*)^{-1} dG/dp``.  In that case the f values of the last Newton
iteration are evaluated with the graph (no separate evaluation round) and each stage costs one
extra Jacobian.  Complex states are solved as real systems of twice the size.

NFE of a step (autograd Jacobian, no gradient): 1 (the Jacobian; it also yields ``f0`` when
``f0`` is None) + ``s`` per Newton iteration (fully implicit) or 1 per iteration and implicit
stage (diagonally implicit), + 1 per implicit stage and Jacobian refresh; with gradients, + 1
per implicit stage (the exact Jacobian), and + 1 for an explicit first stage when ``f0`` is
None; ``"fd"`` Jacobians cost ``n`` evaluations instead of 1, a ``jacobian`` callable none.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError, UnknownMethodError
from .tableaus import advance

__all__ = ["IMPLICIT_METHODS", "IMPLICIT_ORDER", "IMPLICIT_OPTIONS", "IMPLICIT_TABLEAUS",
           "ConvergenceWarning", "ImplicitTableau", "check_implicit_options", "implicit_step"]


class ConvergenceWarning(RuntimeWarning):
    """An implicit step's Newton iteration did not converge; the step kept its last iterate."""


@dataclass(frozen=True)
class ImplicitTableau:
    """Butcher tableau with a full ``s x s`` matrix ``a``."""

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def diagonal(self) -> bool:
        """Diagonally implicit (lower triangular ``a``): solved stage by stage."""
        return all(x == 0.0 for i, row in enumerate(self.a) for x in row[i + 1:])


_R2, _R3, _R6, _R15 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(6.0), math.sqrt(15.0)
_T = ImplicitTableau
# Backward Euler and the implicit midpoint rule (the one-stage Radau IIA and Gauss methods),
# Hairer & Wanner, *Solving ODEs II*, Sec. IV.5.
IMPLICIT_EULER = _T("implicit_euler", (1.0,), ((1.0,),), (1.0,), 1)
IMPLICIT_MIDPOINT = _T("implicit_midpoint", (0.5,), ((0.5,),), (1.0,), 2)
# The trapezoidal rule as the 2-stage Lobatto IIIA method, ibid. Sec. IV.5.
TRAPEZOID = _T("trapezoid", (0.0, 1.0), ((0.0, 0.0), (0.5, 0.5)), (0.5, 0.5), 2)
# Radau IIA of orders 3 and 5 (Ehle 1969), ibid. Sec. IV.5.
RADAU_IIA3 = _T("radauIIA3", (1 / 3, 1.0), ((5 / 12, -1 / 12), (3 / 4, 1 / 4)), (3 / 4, 1 / 4), 3)
_RB = ((16 - _R6) / 36, (16 + _R6) / 36, 1 / 9)
RADAU_IIA5 = _T(
    "radauIIA5", ((4 - _R6) / 10, (4 + _R6) / 10, 1.0),
    (((88 - 7 * _R6) / 360, (296 - 169 * _R6) / 1800, (-2 + 3 * _R6) / 225),
     ((296 + 169 * _R6) / 1800, (88 + 7 * _R6) / 360, (-2 - 3 * _R6) / 225),
     _RB), _RB, 5)
# Gauss-Legendre methods of orders 4 and 6 (Butcher 1964, Math. Comp. 18), ibid. Sec. IV.5.
GL4 = _T("gl4", (0.5 - _R3 / 6, 0.5 + _R3 / 6),
         ((0.25, 0.25 - _R3 / 6), (0.25 + _R3 / 6, 0.25)), (0.5, 0.5), 4)
GL6 = _T(
    "gl6", (0.5 - _R15 / 10, 0.5, 0.5 + _R15 / 10),
    ((5 / 36, 2 / 9 - _R15 / 15, 5 / 36 - _R15 / 30),
     (5 / 36 + _R15 / 24, 2 / 9, 5 / 36 - _R15 / 24),
     (5 / 36 + _R15 / 30, 2 / 9 + _R15 / 15, 5 / 36)), (5 / 18, 4 / 9, 5 / 18), 6)
# Alexander (1977), "Diagonally implicit Runge-Kutta methods for stiff O.D.E.'s", SIAM J.
# Numer. Anal. 14(6): the 2-stage, order-2, L-stable, stiffly accurate SDIRK, gamma = 1 - 1/sqrt2.
_G = 1.0 - _R2 / 2
SDIRK2 = _T("sdirk2", (_G, 1.0), ((_G, 0.0), (1 - _G, _G)), (1 - _G, _G), 2)
# TR-BDF2 (Bank et al. 1985, IEEE Trans. CAD 4(4)) as the 3-stage ESDIRK of Hosea & Shampine
# (1996), Appl. Numer. Math. 20: gamma = 2 - sqrt2, d = gamma/2, w = sqrt2/4; L-stable.
_GT, _W = 2.0 - _R2, _R2 / 4
TRBDF2 = _T("trbdf2", (0.0, _GT, 1.0),
            ((0.0, 0.0, 0.0), (_GT / 2, _GT / 2, 0.0), (_W, _W, _GT / 2)), (_W, _W, _GT / 2), 2)

IMPLICIT_TABLEAUS: dict[str, ImplicitTableau] = {
    t.name: t for t in (IMPLICIT_EULER, IMPLICIT_MIDPOINT, TRAPEZOID, RADAU_IIA3, RADAU_IIA5, GL4,
                        GL6, SDIRK2, TRBDF2)}
IMPLICIT_METHODS: tuple[str, ...] = tuple(IMPLICIT_TABLEAUS)
IMPLICIT_ORDER: dict[str, int] = {k: t.order for k, t in IMPLICIT_TABLEAUS.items()}
IMPLICIT_OPTIONS: frozenset[str] = frozenset({"max_iters", "newton_tol", "jacobian"})
DEFAULT_MAX_ITERS = 100  # as torchdiffeq
DEFAULT_NEWTON_TOL = 1e-3  # of the scaled unit atol + rtol|y|: far below the step's error


def check_implicit_options(method: str, opts: dict) -> None:
    """Validate the options an implicit step reads; raise :class:`InputError` naming them."""
    if method not in IMPLICIT_TABLEAUS:
        raise UnknownMethodError(f"'{method}' is not an implicit method; choose one of "
                                 f"{', '.join(IMPLICIT_METHODS)}")
    where = f"options of method '{method}'"
    it = opts.get("max_iters")
    if it is not None and (not isinstance(it, numbers.Integral) or isinstance(it, bool)
                           or it < 1):
        raise InputError(f"options['max_iters'] must be an integer >= 1, got {it!r} ({where}); "
                         f"try the default {DEFAULT_MAX_ITERS}")
    tol = opts.get("newton_tol")
    if tol is not None and (not isinstance(tol, numbers.Real) or isinstance(tol, bool)
                            or not math.isfinite(tol) or tol <= 0):
        raise InputError(f"options['newton_tol'] must be a finite number > 0 (a fraction of the "
                         f"atol + rtol|y| scale), got {tol!r} ({where}); try the default "
                         f"{DEFAULT_NEWTON_TOL}")
    jac = opts.get("jacobian")
    if jac is not None and not callable(jac) and jac not in ("autograd", "fd"):
        raise InputError(f"options['jacobian'] must be 'autograd', 'fd' or a callable "
                         f"jac(t, y) -> (n, n) tensor, got {jac!r} ({where})")


@functools.lru_cache(maxsize=64)
def _coeffs(tab: ImplicitTableau, dtype: torch.dtype, device: torch.device):
    """``(A, c, d)`` as tensors (``d = b^T A^{-1}``, None for singular ``A``); never modify."""
    with torch.inference_mode(False), torch.no_grad():
        a64 = torch.tensor(tab.a, dtype=torch.float64)
        b64 = torch.tensor(tab.b, dtype=torch.float64)
        d = None if tab.diagonal else torch.linalg.solve(a64.T, b64)
        kw = dict(dtype=dtype, device=device)
        return a64.to(**kw), torch.tensor(tab.c, **kw), None if d is None else d.to(**kw)


def _rms(x: torch.Tensor) -> float:
    m = float(x.abs().amax()) if x.numel() else 0.0
    if m == 0.0 or not math.isfinite(m):
        return m
    return m * float(torch.linalg.vector_norm(x / m)) / math.sqrt(x.numel())


def _solve(lu, r: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lu_solve(*lu, r.reshape(-1, 1)).reshape(r.shape)


def _jacobian(fc, t: float, y: torch.Tensor, kind, f0=None):
    """``(f(t, y) or None, df/dy(t, y))``, both detached; ``kind``: 'autograd', 'fd', callable."""
    n = y.numel()
    if callable(kind):
        J = torch.as_tensor(kind(torch.scalar_tensor(t, dtype=y.dtype, device=y.device),
                                 y.detach()), dtype=y.dtype, device=y.device).detach()
        if J.shape != (n, n):
            raise InputError(f"options['jacobian'] returned shape {tuple(J.shape)} at t={t:.6g}; "
                             f"it must return df/dy of shape ({n}, {n}) for the flat state")
        return None, J
    if kind == "fd":  # forward differences, increments as in Hairer's RADAU5 code
        with torch.no_grad():
            f0 = (fc(t, y) if f0 is None else f0).detach()
            cols, eps = [], torch.finfo(y.dtype).eps
            for j in range(n):
                yj = y.detach().clone()
                yj[j] += math.sqrt(eps * max(1e-5, abs(float(yj[j]))))
                cols.append((fc(t, yj) - f0) / (float(yj[j]) - float(y[j])))
            return f0, torch.stack(cols, 1)
    with torch.inference_mode(False), torch.enable_grad():
        x = y.detach().clone().requires_grad_(True)
        out = fc(t, x)
        zeros = torch.zeros(n, n, dtype=y.dtype, device=y.device)
        if not out.requires_grad:
            return out.detach(), zeros
        eye = torch.eye(n, dtype=out.dtype, device=out.device)
        try:  # rows e_i^T J, vmapped over the backward pass only
            (J,) = torch.autograd.grad(out, x, eye, retain_graph=True, is_grads_batched=True,
                                       allow_unused=True)
        except Exception:  # a backward formula vmap cannot batch: one row at a time
            rows = [torch.autograd.grad(out, x, e, retain_graph=True, allow_unused=True)[0]
                    for e in eye]
            J = zeros if rows[0] is None else torch.stack(rows)
    return out.detach(), zeros if J is None else J


def _newton(resid, lu, refresh, z, sc, ref, max_iters, tol, where):
    """Simplified Newton from ``z``; ``refresh(z)`` refactorises at the current iterate when
    the contraction rate exceeds 0.2.  Returns the last evaluated iterate, its increment, the f
    values there (with their graph) and whether the increment is finite."""
    floor_k = 100 * torch.finfo(z.dtype).eps
    prev, grew = _rms(z / sc), 0
    for k in range(1, max_iters + 1):
        r, fg = resid(z)
        dz = _solve(lu, r)
        nrm = _rms(dz / sc)
        theta = nrm / prev if prev > 0 else 0.0
        if theta > 0.2 and math.isfinite(nrm):  # slow or diverging: Jacobian at z
            lu = refresh(z)
            dz = _solve(lu, r)
            nrm = _rms(dz / sc)
            theta = nrm / prev
        if not math.isfinite(nrm):
            reason = "produced NaN/Inf"
            break
        if (nrm <= tol or nrm <= floor_k * _rms((ref + z.abs()) / sc)
                or (theta < 1 and theta / (1 - theta) * nrm <= tol)):
            return z, dz, fg, True
        grew = grew + 1 if theta >= 1 else 0
        if grew >= 2:
            reason = "diverged (the increment grew twice in a row)"
            break
        if k < max_iters:
            z, prev = z + dz, nrm
        reason = f"did not converge in max_iters={max_iters} iterations"
    method, t0, h = where
    warnings.warn(f"{method}: the Newton iteration of the implicit stages {reason} in the step "
                  f"from t0={t0:.6g} with h={h:.6g} (iteration {k}, scaled increment {nrm:.3g}, "
                  f"newton_tol {tol:.3g}); the step keeps the last iterate and its gradient is "
                  f"not exact. Try a smaller step_size, a larger max_iters, or looser "
                  f"rtol/atol/newton_tol.", ConvergenceWarning, stacklevel=3)
    return z, dz, fg, math.isfinite(nrm)


def _stage_matrix(A, Js, h: float):
    """``I - h (A (x) I) blockdiag(Js)``: the exact Newton matrix at stages with Jacobians Js."""
    s, n = Js.shape[:2]
    return torch.eye(n * s, dtype=Js.dtype, device=Js.device) - h * (
        A[:, :, None, None] * Js[None]).permute(0, 2, 1, 3).reshape(n * s, n * s)


def implicit_step(fc: Callable, method: str, t0: float, h: float, y: torch.Tensor,
                  f0: torch.Tensor | None, opts: dict, rtol, atol,
                  perturb: bool = False) -> torch.Tensor:
    """One step of ``method`` from ``(t0, y)`` (flat, shape ``(n,)``) with step ``h``; returns y1.

    ``f0`` is ``f(t0, y)`` if known (with its graph, when gradients are wanted); options are
    those of :data:`IMPLICIT_OPTIONS` (validate once with :func:`check_implicit_options`).
    A callable ``jacobian`` gets ``(t, y)``: ``t`` a 0-d tensor of y's real dtype, y flat.
    """
    if h == 0.0:
        return y
    if y.is_complex():  # the real system of twice the size (also for non-holomorphic f)
        n = y.numel()

        def fr(t, yr):
            return torch.view_as_real(fc(t, torch.view_as_complex(yr.reshape(n, 2)))).reshape(-1)

        o = dict(opts)
        jac = opts.get("jacobian")
        if callable(jac):  # holomorphic f: the complex J as 2x2 real blocks [[a, -b], [b, a]]
            def jr(t, yr):
                J = jac(t, torch.view_as_complex(yr.reshape(n, 2)))
                a, b = J.real, J.imag
                blk = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
                return blk.permute(0, 2, 1, 3).reshape(2 * n, 2 * n)
            o["jacobian"] = jr
        tol2 = [v.repeat_interleave(2) if torch.is_tensor(v) and v.numel() == n else v
                for v in (rtol, atol)]
        y1 = implicit_step(fr, method, t0, h, torch.view_as_real(y).reshape(-1),
                           None if f0 is None else torch.view_as_real(f0).reshape(-1), o,
                           *tol2, perturb=perturb)
        return torch.view_as_complex(y1.reshape(n, 2))
    tab = IMPLICIT_TABLEAUS[method]
    kind = opts.get("jacobian") or "autograd"
    exact = kind if callable(kind) else "autograd"
    max_iters = int(opts.get("max_iters") or DEFAULT_MAX_ITERS)
    tol = float(opts.get("newton_tol") or DEFAULT_NEWTON_TOL)
    A, c, d = _coeffs(tab, y.dtype, y.device)
    n, s = y.numel(), tab.stages
    t1, ts = t0 + h, [t0 + ci * h for ci in tab.c]
    if perturb:
        ts = [math.nextafter(t0, t1) if ci == 0.0 else math.nextafter(t1, t0) if ci == 1.0
              else ti for ci, ti in zip(tab.c, ts, strict=True)]
    tstart = math.nextafter(t0, t1) if perturb else t0
    where, grad, yd = (method, t0, h), torch.is_grad_enabled(), y.detach()
    with torch.no_grad():
        ref = yd.abs()
        sc = (atol + rtol * ref).clamp_min(torch.finfo(y.dtype).tiny)
        fj, J0 = _jacobian(fc, tstart, yd, kind, f0)
        f0d = f0.detach() if f0 is not None else fj if fj is not None else fc(tstart, yd)
        eye = torch.eye(n, dtype=y.dtype, device=y.device)

    if not tab.diagonal:
        lu = torch.linalg.lu_factor(torch.eye(n * s, dtype=y.dtype, device=y.device)
                                    - h * torch.kron(A, J0))

        def resid(z):
            fg = torch.stack([fc(ts[i], y + z[i]) for i in range(s)])
            return h * (A @ fg.detach()) - z, fg

        def lu_at(z, kind=kind):
            Js = torch.stack([_jacobian(fc, ts[i], yd + z[i], kind)[1] for i in range(s)])
            return torch.linalg.lu_factor(_stage_matrix(A, Js, h))

        z0 = _solve(lu, h * c[:, None] * f0d)
        z, dz, fg, ok = _newton(resid, lu, lu_at, z0, sc, ref, max_iters, tol, where)
        if ok and grad and (fg.requires_grad or y.requires_grad):
            Z = z + _solve(lu_at(z, exact), h * (A @ fg) - z)
        else:
            Z = z + dz
        return y + d @ Z

    lus: dict[float, tuple] = {}
    ks: list[torch.Tensor] = []
    kp, zp = f0d, torch.zeros_like(yd)  # the predictor linearises f about the latest stage
    for i in range(s):
        g = tab.a[i][i]
        known = torch.zeros_like(y)
        for j in range(i):
            if tab.a[i][j] != 0.0:
                known = known + (h * tab.a[i][j]) * ks[j]
        if g == 0.0:  # explicit first stage (c = 0): f(t0, y0), with its graph if wanted
            ks.append(f0 if f0 is not None else fc(tstart, y) if grad else f0d)
            continue
        if g not in lus:
            lus[g] = torch.linalg.lu_factor(eye - (h * g) * J0)
        kd = known.detach()

        def resid(z, ti=ts[i], g=g, kd=kd):
            fg = fc(ti, y + z)
            return kd + (h * g) * fg.detach() - z, fg

        def lu_at(z, kind=kind, ti=ts[i], g=g):
            return torch.linalg.lu_factor(eye - (h * g) * _jacobian(fc, ti, yd + z, kind)[1])

        z0 = _solve(lus[g], kd + (h * g) * (kp - J0 @ zp))
        z, dz, fg, ok = _newton(resid, lus[g], lu_at, z0, sc, ref, max_iters, tol, where)
        if ok and grad and (fg.requires_grad or known.requires_grad or y.requires_grad):
            Z = z + _solve(lu_at(z, exact), known + (h * g) * fg - z)
        else:
            Z = z + dz
        ks.append((Z - known) / (h * g))
        kp, zp = ks[-1].detach(), Z.detach()
    return advance(y, h, tab.b, ks)
