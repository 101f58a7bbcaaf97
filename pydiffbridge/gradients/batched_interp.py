"""The interpolating adjoint (``gradient="interpolated"``) over a batch whose forward pass steps
per sample (``batch_dims``).

As for one solve (:mod:`~pydiffbridge.gradients.interpolated`), the backward pass integrates
only the adjoint ``[a, g]`` and reads the state ``z(t)`` from a record of the forward solution,
so nothing unstable is back-solved (the plain adjoint's backward ``z``-solve fails on strongly
stiff batches).  The record is the forward's own dense output: every accepted step of every
sample, sampled at the fractions :data:`~pydiffbridge.solvers.batched.RECORD_NODES` and kept
as the polynomial through them (exact for the degree <= 5 dense outputs of every method here),
so ``z_b(t)`` is the value the forward solve itself would report at ``t``.  Memory: O(steps x
batch x state).

The backward solve is joint: the flat ``[a (B n), g (P)]`` on the torch backend with shared
steps, from each output time to the one before (per-sample output times run on a shared
variable ``s``, as in :mod:`~pydiffbridge.gradients.batched`).  Its method defaults to the
forward's; a stiff one gets the exact Jacobian of the augmented system,
``[[-(df/dz)^T, 0], [-(df/dtheta)^T, 0]]``, from one batched vector-Jacobian product.
Gradients w.r.t. the output times are the adjoint identities, per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import errors as E
from ..backends.base import SolveSpec, get_backend
from ..solution import Solution, Stats
from ..solvers.batched import RECORD_NODES, solve_batched
from ..solvers.batched_stiff import BATCHED_STIFF_METHODS, solve_batched_stiff
from ..solvers.jacobian import batched_vjp
from ..solvers.tableaus import TABLEAUS
from .batched import _SHARED_STIFF, _TimeMap
from .common import adjoint_vjp, block_norm, grad_params

__all__ = ["BatchedRecord", "bridge_batched_interp"]

#: options of the single solve's record that do not apply here (the record is the forward's)
_RECORD_ONLY = ("checkpoints", "refine", "max_record")


class BatchedRecord:
    """Per-sample dense output of a per-sample solve, from the steps of
    :func:`~pydiffbridge.solvers.batched.record_step`: ``z(t)`` for per-sample times ``t``
    ``(B,)`` is each sample's polynomial of the step that holds ``t_b``."""

    def __init__(self, steps: list, y0: torch.Tensor, direction: torch.Tensor):
        B = y0.shape[0]
        self.y0, self.ar = y0, torch.arange(B, device=y0.device)
        if not steps:  # no sample stepped (every t_end == t0)
            self.n_acc = torch.zeros(B, dtype=torch.long, device=y0.device)
            return
        TS = torch.stack([s[0] for s in steps]).to(torch.float64)  # (I, B)
        HS = torch.stack([s[1] for s in steps]).to(torch.float64)
        acc = torch.stack([s[2] for s in steps])
        V = torch.stack([s[3] for s in steps])  # (I, B, K, n)
        nodes = torch.tensor(RECORD_NODES, dtype=torch.float64, device=V.device)
        vand = nodes[:, None] ** torch.arange(len(RECORD_NODES), device=V.device)
        to_coef = torch.linalg.inv(vand).to(V.dtype)  # node values -> monomial coefficients
        self.C = torch.einsum("kj,ibjn->ibkn", to_coef, V)
        self.TS, self.HS = TS, HS
        self.dir = direction.to(torch.float64)
        key = torch.where(acc, TS * self.dir[None, :], torch.inf).T  # (B, I)
        keys, self.perm = torch.sort(key, dim=1, stable=True)
        self.keys = keys.contiguous()
        self.n_acc = acc.sum(0)
        self.pows = torch.arange(len(RECORD_NODES), device=V.device)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not bool((self.n_acc > 0).any()):
            return self.y0
        q = (t.detach().to(torch.float64) * self.dir)[:, None].contiguous()
        j = torch.searchsorted(self.keys, q, right=True)[:, 0] - 1
        j = torch.minimum(torch.clamp(j, min=0), torch.clamp(self.n_acc - 1, min=0))
        i = self.perm[self.ar, j]
        h = self.HS[i, self.ar]
        theta = (t.detach().to(torch.float64) - self.TS[i, self.ar]) / torch.where(h == 0, 1.0,
                                                                                    h)
        w = (theta[:, None] ** self.pows).to(self.C.dtype)  # (B, K)
        z = torch.einsum("bk,bkn->bn", w, self.C[i, self.ar])
        return torch.where((self.n_acc > 0)[:, None], z, self.y0)


@dataclass
class _Config:
    f: Callable  # f(t (B,), y (B, n)) -> (B, n)
    B: int
    n: int
    method: str
    rtol: Any
    atol: Any
    opts: dict
    parts: list[int]
    tdtype: torch.dtype
    tmap: _TimeMap | None
    back_spec: SolveSpec
    exact_jac: bool  # give the (stiff) backward method the augmented system's Jacobian
    param_sizes: tuple[int, ...]
    stats: Stats = field(default_factory=Stats)
    sol: Solution | None = None


def _times(cfg: _Config, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sample's time ``t_b(s)`` and ``dt_b/ds`` (``None``: ``t = s``, shared times)."""
    if cfg.tmap is None:
        return s.detach().to(torch.float64).expand(cfg.B), None
    return cfg.tmap.rate(s.detach())


def _F(cfg: _Config, rec: BatchedRecord, s: torch.Tensor):
    """``(z, F)``: the recorded state at ``s`` (a leaf that requires grad) and the right-hand
    side in the shared variable ``s``, ``f(t(s), z) dt/ds``."""
    tt, rate = _times(cfg, s)
    z = rec(tt).detach().requires_grad_(True)
    fz = cfg.f(tt.to(cfg.tdtype), z)
    return z, fz if rate is None else fz * rate.to(z.dtype)[:, None]


class _BatchedInterp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, y0: torch.Tensor, tb: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        steps: list = []
        T = tb.detach()
        parts = cfg.parts if len(cfg.parts) > 1 else None
        with torch.no_grad():
            if cfg.method in BATCHED_STIFF_METHODS:
                sol = solve_batched_stiff(cfg.f, y0.detach(), T, cfg.method, cfg.rtol, cfg.atol,
                                          cfg.opts, parts, cfg.tdtype, record=steps)
            else:
                sol = solve_batched(cfg.f, y0.detach(), T, TABLEAUS[cfg.method], cfg.rtol,
                                    cfg.atol, cfg.opts, parts, cfg.tdtype, record=steps)
        cfg.sol, cfg.stats = sol, sol.stats  # (backward adds its counts to these stats)
        ys = sol.ys.detach()
        ctx.failed = not sol.success
        if ctx.failed:  # no gradient can be formed; the API reports the statuses
            ctx.save_for_backward()
            return ys
        direction = torch.where(T[:, -1] >= T[:, 0], 1.0, -1.0)
        ctx.rec = BatchedRecord(steps, y0.detach(), direction)
        ctx.cfg = cfg
        ctx.save_for_backward(T, ys, *params)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys: torch.Tensor):
        if ctx.failed:
            raise E.SolverError("interpolated adjoint (batch_dims): the forward solve failed for "
                                "some samples, so there is no gradient; check Solution.status "
                                "before calling backward")
        cfg: _Config = ctx.cfg
        T, ys, *params = ctx.saved_tensors
        B, n, m = cfg.B, cfg.n, T.shape[1]
        a = torch.zeros(B, n, dtype=ys.dtype, device=ys.device)
        g = torch.zeros(sum(cfg.param_sizes), dtype=ys.dtype, device=ys.device)
        s_grid = T[0] if cfg.tmap is None else torch.arange(m, dtype=T.dtype, device=T.device)
        for k in range(m - 1, 0, -1):
            a = a + grad_ys[k]
            if bool((a != 0).any()):
                a, g = _back_solve(cfg, ctx.rec, s_grid[k], s_grid[k - 1], a, g, params)
        grad_t = None
        if ctx.needs_input_grad[2]:  # dL/dt_bi = <dL/dy_bi, f_b(t_bi, y_bi)>, t_b0: -<a_b, f_b>
            with torch.no_grad():
                grad_t = torch.zeros_like(T)
                for i in range(m):
                    w = -a if i == 0 else grad_ys[i]
                    if bool((w != 0).any()):
                        cfg.stats.nfe_backward += 1
                        fi = cfg.f(T[:, i].to(cfg.tdtype), ys[i])
                        grad_t[:, i] = (w * fi).sum(1).to(T.dtype)
        a = a + grad_ys[0]
        grads = [gp.reshape(q.shape).to(q.dtype)
                 for gp, q in zip(torch.split(g, list(cfg.param_sizes)), params, strict=True)]
        return (None, a, grad_t, *grads)


def _back_solve(cfg: _Config, rec: BatchedRecord, s_hi, s_lo, a, g, params):
    """Integrate ``[a, g]`` from ``s_hi`` back to ``s_lo`` with ``z`` from the record."""
    B, n = cfg.B, cfg.n
    N = B * n

    def aug(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cfg.stats.nfe_backward += 1
        with torch.enable_grad():
            z, fz = _F(cfg, rec, s)
            parts = adjoint_vjp(fz, z, params, -x[:N].reshape(B, n), x.dtype)
        return torch.cat(parts)

    def jac(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[[-(dF/dz)^T, 0], [-(dF/dtheta)^T, 0]]: one batched vjp of N unit vectors."""
        P = x.shape[0] - N
        with torch.enable_grad():
            z, fz = _F(cfg, rec, s)
            fz = fz.reshape(-1)
            eye = torch.eye(N, dtype=fz.dtype, device=fz.device)
            J = x.new_zeros(N + P, N + P)
            if not fz.requires_grad:
                return J
            rows = batched_vjp(fz, (z, *params), eye)
        if rows[0] is not None:
            J[:N, :N] = -rows[0].reshape(N, N).T
        col = N
        for v, q in zip(rows[1:], params, strict=True):
            if v is not None:
                J[col:col + q.numel(), :N] = -v.reshape(N, -1).T.to(x.dtype)
            col += q.numel()
        return J

    spec = cfg.back_spec
    if cfg.exact_jac:
        spec = SolveSpec(spec.method, spec.rtol, spec.atol, {**spec.options, "jac": jac},
                         spec.norm)
    tt = torch.stack([s_hi, s_lo]).detach()
    sol = get_backend("torch").solve(aug, torch.cat([a.reshape(-1), g]), tt, spec, None)
    cfg.stats.steps_backward += int(sol.stats.steps)
    if not sol.success:
        raise E.SolverError(f"interpolated adjoint (batch_dims): the backward solve of [a, g] "
                            f"from s={float(s_hi):.6g} to {float(s_lo):.6g} failed: "
                            f"{sol.message}. Try adjoint_method (a stiff one such as 'rodas5') "
                            "or adjoint_rtol/adjoint_atol")
    x1 = sol.ys[-1]
    return x1[:N].reshape(B, n), x1[N:]


def bridge_batched_interp(f: Callable, flat0: torch.Tensor, t: torch.Tensor, tb: torch.Tensor,
                          method: str, rtol: Any, atol: Any, opts: dict, parts: list[int],
                          tdtype: torch.dtype, params: tuple, adj: dict) -> Solution:
    """Per-sample forward with a record of its dense output, joint interpolating adjoint
    backward (see the module doc).  ``t``: the user's (1-D shared or ``(B, m)``) output times,
    ``tb`` their ``(B, m)`` expansion; ``adj``: ``method``, ``rtol``, ``atol`` and ``options``
    of the backward solve."""
    from ..backends.torch import STIFF_ADAPTIVE_METHODS

    B, n = flat0.shape
    tab = TABLEAUS.get(method)
    if tab is not None and tab.interp == "hermite" and tab.order >= 5:
        raise E.InputError(f"gradient='interpolated' with batch_dims reads z from the forward's "
                           f"dense output, which for {method!r} is a cubic Hermite (far less "
                           "accurate than its steps); use dopri5 or tsit5, or "
                           "gradient='checkpointed'")
    aopts = dict(adj["options"] or {})
    bad = sorted(set(aopts) & set(_RECORD_ONLY))
    if bad:
        raise E.InputError(f"adjoint_options {bad} set the single solve's record; with batch_dims "
                           "the record is the forward's own dense output (every step of every "
                           "sample): drop them")
    anorm = aopts.pop("norm", None)
    if anorm is not None:
        raise E.InputError("adjoint_options['norm'] is not supported with batch_dims and "
                           "gradient='interpolated'")
    gparams = grad_params(params)
    sizes = tuple(q.numel() for q in gparams)
    P = sum(sizes)
    be = get_backend("torch")
    back = be.resolve_method(adj["method"]) if adj["method"] else method

    def flat_tol(v):
        if not isinstance(v, torch.Tensor):
            return v
        v = v.reshape(-1)
        return torch.cat([v, v.min().expand(P)]) if P else v

    rt = adj["rtol"] if adj["rtol"] is not None else rtol
    at = adj["atol"] if adj["atol"] is not None else atol
    be.check_options(back, aopts)
    for k in _SHARED_STIFF:  # the forward's step settings carry over where the backward
        if k in opts and k not in aopts:  # method takes them (a per-sample jac does not)
            try:
                be.check_options(back, {k: opts[k]})
            except E.UnknownOptionError:
                continue
            aopts[k] = opts[k]
    exact_jac = back in STIFF_ADAPTIVE_METHODS and "jac" not in aopts and "jacobian" not in aopts
    norm = block_norm(parts * B + [s for s in sizes if s], B * n + P)
    back_spec = SolveSpec(back, flat_tol(rt), flat_tol(at), aopts, norm)
    tmap = _TimeMap(tb) if t.ndim > 1 else None
    cfg = _Config(f, B, n, method, rtol, atol, opts, parts, tdtype, tmap, back_spec, exact_jac,
                  sizes)
    ys = _BatchedInterp.apply(cfg, flat0, tb, *gparams)
    sol = cfg.sol
    sol.ys = ys
    return sol
