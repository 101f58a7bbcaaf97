"""The per-sample implicit pieces of the per-sample stiff loop
(:mod:`~pydiffbridge.solvers.batched_stiff`): per-sample Jacobians
(:class:`BatchedDerivatives`) and the step of a Rosenbrock method or ``kvaerno5``
(:class:`ImplicitStep`), which :class:`~pydiffbridge.solvers.batched_auto.AutoStep` also uses
for its stiff phase."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InputError
from .batched_esdirk import esdirk_step, newton_tol
from .batched_step import per_sample_rms
from .esdirk import KVAERNO5, _hermite
from .jacobian import batched_vjp, check_jacobian_option
from .rosenbrock import _GAMMA, _ORDER, _TABLES, _interp, _step_rodas, _step_ros23

__all__ = ["BatchedDerivatives", "ImplicitStep"]


class BatchedDerivatives:
    """``(f0, J, ft)`` of a batched ``f(t, y)`` (``t``: ``(B,)``, ``y``: ``(B, n)``), whose
    samples are independent: ``J`` of shape ``(B, n, n)``, ``ft = df/dt`` of shape ``(B, n)``
    (``None`` for an autonomous ``f``, or with ``options['autonomous']``).

    * ``"autograd"``: one evaluation and ``n`` vector-Jacobian products (the unit vector
      ``e_i`` in every sample at once), batched with ``is_grads_batched``; under autograd
      through ``torch.func.vjp`` (its own tape: differentiating on the solve's tape would walk
      the whole history every step), one product a row where ``f`` cannot be vmapped;
    * ``"fd"``: ``n`` forward differences, increments ``sqrt(eps) max(|y|, 1e-3)``;
    * a callable ``jac(t, y) -> (B, n, n)``.

    ``calls`` counts the evaluations of ``f`` made here."""

    def __init__(self, f: Callable, opts: dict, method: str):
        check_jacobian_option(opts, method)
        kind = opts.get("jacobian", "autograd")
        self.user = opts.get("jac") or (kind if callable(kind) else None)
        self.kind = "user" if self.user is not None else kind
        self.f, self.autonomous = f, bool(opts.get("autonomous", False))
        self.calls, self._no_func = 0, False

    def __call__(self, t: torch.Tensor, y: torch.Tensor):
        B, n = y.shape
        if self.kind == "autograd":
            out = self._autograd(t, y)
            if out is not None:
                return out
        self.calls += 1
        f0 = self.f(t, y)
        if self.kind == "user":
            J = self.user(t, y)
            if not isinstance(J, torch.Tensor) or tuple(J.shape) != (B, n, n):
                got = tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__
                raise InputError(f"options['jac'] must return a {(B, n, n)} tensor (df/dy of "
                                 f"each sample, batch_dims), got {got}")
            J = J.to(device=y.device, dtype=y.dtype)
        else:
            J = self._fd(t, y, f0)
        return f0, J, self._ft_fd(t, y, f0)

    def _ft_fd(self, t, y, f0):
        if self.autonomous:
            return None
        with torch.no_grad():
            dt = math.sqrt(torch.finfo(y.dtype).eps) * torch.clamp(t.abs(), min=1.0)
            self.calls += 1
            return (self.f(t + dt, y.detach()) - f0.detach()) / dt.to(y.dtype)[:, None]

    def _fd(self, t, y, f0):
        with torch.no_grad():
            yd, f0d = y.detach(), f0.detach()
            dy = math.sqrt(torch.finfo(y.dtype).eps) * torch.clamp(yd.abs(), min=1e-3)
            cols = []
            for j in range(y.shape[1]):
                yj = yd.clone()
                yj[:, j] += dy[:, j]
                self.calls += 1
                cols.append((self.f(t, yj) - f0d) / (yj[:, j] - yd[:, j])[:, None])
            return torch.stack(cols, 2)

    def _autograd(self, t, y):
        B, n = y.shape
        eye = torch.eye(n, dtype=y.dtype, device=y.device)[:, None, :].expand(n, B, n)
        graph = torch.is_grad_enabled()  # J keeps its graph (to y and to f's parameters)
        tin = t if self.autonomous else t.detach().clone()
        if graph and y.requires_grad and not self._no_func:
            try:
                return self._func(tin, y, eye)
            except Exception:  # noqa: BLE001 - f not transformable by torch.func: the tape
                self._no_func = True
        with torch.enable_grad():
            yy = y if (graph and y.requires_grad) else y.detach().requires_grad_(True)
            if not self.autonomous:
                tin.requires_grad_(True)
            self.calls += 1
            fy = self.f(tin, yy)
            if not fy.requires_grad:  # f detaches its arguments: differences instead
                J = self._fd(t, y, fy)
                return fy, J, self._ft_fd(t, y, fy)
            inputs = (yy,) if self.autonomous else (yy, tin)
            gs = batched_vjp(fy, inputs, eye, retain_graph=True, create_graph=graph)
        return self._assemble(fy, gs, y, graph)

    def _func(self, t, y, eye):
        def fn(yq, tq):
            self.calls += 1
            return self.f(tq, yq)

        if self.autonomous:
            fy, vjp = torch.func.vjp(lambda yq: fn(yq, t), y)
        else:
            fy, vjp = torch.func.vjp(fn, y, t)
        gs = torch.vmap(vjp)(eye)
        return self._assemble(fy, gs, y, True)

    def _assemble(self, fy, gs, y, graph):
        B, n = y.shape
        J = gs[0].permute(1, 0, 2) if gs[0] is not None else y.new_zeros((B, n, n))
        ft = None
        if not self.autonomous and len(gs) > 1 and gs[1] is not None:
            ft = gs[1].transpose(0, 1).to(y.dtype)
        if not graph:
            fy, J = fy.detach(), J.detach()
            ft = None if ft is None else ft.detach()
        return fy, J, ft


def _block_solve(lu, r: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lu_solve(lu[0], lu[1], r[:, :, None])[:, :, 0]


def _ratio(err, y, y1, rtol, atol, parts) -> torch.Tensor:
    """Per-sample error ratio: the RMS (the max over ``parts`` of their RMS) of the scaled
    error; NaN counts as infinite."""
    with torch.no_grad():
        q = err.detach() / (torch.maximum(y.detach().abs(), y1.detach().abs()) * rtol + atol)
        r = per_sample_rms(q, parts)
        return torch.nan_to_num(r.to(torch.float64), nan=math.inf)


class ImplicitStep:
    """One per-sample step of a Rosenbrock method or ``kvaerno5`` for the loop of
    :func:`solve_batched_stiff`: ``start`` takes ``f``, ``J`` (and ``df/dt``) at the step
    starts, ``attempt`` one batched LU and the stages, ``dense`` the method's dense output.
    :class:`~pydiffbridge.solvers.batched_auto.AutoStep` has the same four methods."""

    def __init__(self, method: str, fc: Callable, derivs: BatchedDerivatives, opts: dict, rtol,
                 atol, parts, eye: torch.Tensor):
        self.method, self.fc, self.derivs, self.eye = method, fc, derivs, eye
        self.rtol, self.atol, self.parts = rtol, atol, parts
        self.esdirk = method == "kvaerno5"
        if self.esdirk:  # (an ESDIRK needs no df/dt)
            self.gamma, self.order, self.tab = KVAERNO5["gamma"], KVAERNO5["order"], KVAERNO5
            self.ntol, self.max_iters = newton_tol(rtol, opts), int(opts.get("max_iters") or 10)
        else:
            self.gamma, self.order, self.tab = _GAMMA[method], _ORDER[method], _TABLES.get(method)
        self.J = self.ft = None

    def start(self, tc: torch.Tensor, y: torch.Tensor, running: torch.Tensor):
        """``(f0, ok)``: ``f(tc, y)`` and the samples whose ``f``, ``J`` (and ``df/dt``) are
        finite; a failed sample keeps a usable, unused ``J``."""
        f0, J, ft = self.derivs(tc, y)
        with torch.no_grad():
            okj = torch.isfinite(J).flatten(1).all(1)
            if ft is not None:
                okj &= torch.isfinite(ft).all(1)
            ok = torch.isfinite(f0).all(1) & (okj | ~running)
        if not bool((ok & okj).all()):
            J = torch.where((ok & okj)[:, None, None], J, self.eye)
            ft = None if ft is None else torch.where((ok & okj)[:, None], ft, 0.0)
        self.J, self.ft = J, ft
        return torch.where(ok[:, None], f0, 0.0) if not bool(ok.all()) else f0, ok

    def attempt(self, tc, y, f0, hs, hl, mask):
        """One step of ``hs`` from ``(tc, y)`` (``f0 = f(tc, y)``; ``hs = 0`` for the samples
        outside ``mask``, ``hl`` the algebra's nonzero step): ``(y1, ratio, st, converged)``,
        ``converged`` ``None`` or the samples whose Newton iterations converged."""
        hcol = hl.to(y.dtype)[:, None]
        lu = torch.linalg.lu_factor_ex(self.eye / (hcol[:, :, None] * self.gamma) - self.J)[:2]
        m = mask[:, None]

        def keep(u):
            return torch.where(m, u, 0.0)

        converged = None  # (the Rosenbrock methods solve no nonlinear equations)
        if self.esdirk:
            y1, err, st, converged = esdirk_step(self.fc, self.derivs, tc, y, hcol, hs, f0,
                                                 lu, _block_solve, keep, self.rtol, self.atol,
                                                 self.ntol, self.max_iters)
        elif self.method == "rosenbrock23":
            y1, err, st = _step_ros23(self.fc, tc, y, hcol, f0, self.ft, lu, _block_solve,
                                      hs, keep)
        else:
            y1, err, st = _step_rodas(self.tab, self.fc, tc, y, hcol, f0, self.ft, lu,
                                      _block_solve, hs, keep)
        return y1, _ratio(err, y, y1, self.rtol, self.atol, self.parts), st, converged

    def dense(self, theta, y, y1, hcol, st):
        """Rows ``(B, k, n)`` at the step fractions ``theta`` ``(B, k, 1)``."""
        stages = tuple(u[:, None] for u in st)
        if self.esdirk:
            return _hermite(theta, y[:, None], y1[:, None], hcol[:, :, None], *stages)
        return _interp(self.method, theta, y[:, None], y1[:, None], hcol[:, :, None], stages)

    def after(self, accept, running, h_new) -> None:
        """Bookkeeping after a step's decisions (nothing for a single method)."""

    def stats(self) -> dict:
        return {}
