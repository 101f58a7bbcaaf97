"""Interpolating adjoint (``gradient="interpolated"``): the backward pass integrates only the
adjoint ``[a, g]`` and reads the state ``z(t)`` from a dense record of the forward solution.

The plain adjoint back-solves ``z`` together with ``[a, g]``; on dissipative or stiff dynamics
(Van der Pol with large μ, Robertson, any system with eigenvalues far in the left half plane)
that back-solve is unstable: errors in ``z`` grow like the inverse of the forward contraction
and the step size underflows.  Here (as SciMLSensitivity's ``InterpolatingAdjoint``)::

    da/dt = -aᵀ ∂f/∂z (t, z(t)),   dg/dt = -aᵀ ∂f/∂θ (t, z(t))

is integrated backwards on the same backend, with ``z(t)`` the piecewise cubic Hermite
interpolant of recorded forward states ``z_k`` and slopes ``f(t_k, z_k)`` (computed once per
record point under ``no_grad``).  Both vector-Jacobian products come from one
``torch.autograd.grad`` call per right-hand-side evaluation.  The backward system is linear in
``[a, g]`` and stable in reverse time, so stiff methods (Radau, BDF, LSODA) handle it with
their finite-difference Jacobians.

Where the states are recorded (``adjoint_options["checkpoints"]``):

* ``"auto"`` (default): the times at which the forward solve evaluated ``func`` (every stage
  of every step), so the record is as dense as the solver's own steps, where they are;
* an ``int`` N: N uniformly spaced extra times;
* a list of times.

Each interval's cubic is checked against the solved state at its midpoint (forward
``atol + rtol·|y|`` scale); intervals that miss are split and solved again
(``adjoint_options["refine"]`` passes, default 6; 0: off).  A record solve is one forward solve
to many output times (no extra steps where outputs come from dense output; fixed-grid torch
methods are asked for ``interp="cubic"``).  Memory is O(record points × state size).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import errors as E
from ..backends.base import SolveSpec
from ..solution import Solution, Stats, Status
from .common import (
    adjoint_options,
    adjoint_vjp,
    block_norm,
    event_time,
    finish_backward,
    forward_part,
    grad_params,
    parse_checkpoints,
)

__all__ = ["interp_solve", "HermiteRecord", "DEFAULT_REFINE", "MAX_RECORD"]

#: refinement passes of the record unless ``adjoint_options={"refine": k}``
DEFAULT_REFINE = 6
#: at most this many recorded states (``adjoint_options={"max_record": m}``)
MAX_RECORD = 200_000


class HermiteRecord:
    """Piecewise cubic Hermite interpolant through states ``ys[k]`` with slopes ``fs[k]`` at
    the (strictly monotonic) times ``ts``."""

    def __init__(self, ts: list[float], ys: torch.Tensor, fs: torch.Tensor):
        self.ts = ts
        self.sign = 1.0 if ts[-1] >= ts[0] else -1.0
        self.keys = [self.sign * v for v in ts]
        self.ys, self.fs = ys, fs

    def __call__(self, t: float) -> torch.Tensor:
        i = bisect.bisect_right(self.keys, self.sign * t) - 1
        i = min(max(i, 0), len(self.ts) - 2)
        t0, t1 = self.ts[i], self.ts[i + 1]
        h = t1 - t0
        s = (t - t0) / h
        s2, s3 = s * s, s * s * s
        return ((2 * s3 - 3 * s2 + 1) * self.ys[i] + (s3 - 2 * s2 + s) * h * self.fs[i]
                + (-2 * s3 + 3 * s2) * self.ys[i + 1] + (s3 - s2) * h * self.fs[i + 1])


@dataclass
class _Config:
    backend: Any
    func: Callable
    spec: SolveSpec
    back_spec: SolveSpec  # the [a, g] solve
    event_fn: Callable | None
    checkpoints: Any  # "auto", int or list of floats
    refine: int
    max_record: int
    n: int
    param_sizes: tuple[int, ...]
    stats: Stats = field(default_factory=Stats)
    sol: Solution | None = None


# ---------------------------------------------------------------------------- the record
def _clean(vals: list[float], t0: float, t1: float) -> list[float]:
    """The finite times strictly inside (t0, t1)."""
    d = 1.0 if t1 >= t0 else -1.0
    return [v for v in vals if math.isfinite(v) and (v - t0) * d > 0 and (t1 - v) * d > 0]


def _subsample(vals: list[float], m: int) -> list[float]:
    """At most ``m`` of ``vals``, evenly picked."""
    if len(vals) <= m:
        return vals
    step = len(vals) / m
    return [vals[int(i * step)] for i in range(m)]


def _scale_tol(v: Any, ref: torch.Tensor) -> torch.Tensor:
    return v.to(ref.device, ref.real.dtype) if isinstance(v, torch.Tensor) else \
        torch.full(ref.shape[-1:], float(v), dtype=ref.real.dtype, device=ref.device)


def _merge(vals, keep: set[float], d: float) -> list[float]:
    """Sorted (direction ``d``) distinct times; of two times closer than a few ulps only one
    stays, and times in ``keep`` (the output times) always win."""
    out: list[float] = []
    for v in sorted(set(vals), key=lambda x: x * d):
        if out and abs(v - out[-1]) <= 1e-13 * max(abs(v), abs(out[-1]), 1e-300):
            if v in keep and out[-1] not in keep:
                out[-1] = v
            continue
        out.append(v)
    return out


def _record_spec(cfg: _Config) -> SolveSpec:
    """The forward spec for the record solves: fixed-grid methods that interpolate linearly
    between grid points by default are asked for cubic interpolation (a linear one would put
    O(h²) errors into the record)."""
    check = getattr(cfg.backend, "check_options", None)
    if check is None or "interp" in cfg.spec.options:
        return cfg.spec
    try:
        check(cfg.spec.method, {"interp": "cubic"})
    except E.UnknownOptionError:
        return cfg.spec
    s = cfg.spec
    return SolveSpec(s.method, s.rtol, s.atol, {**s.options, "interp": "cubic"}, s.norm)


def _build_record(cfg: _Config, spec: SolveSpec, y0: torch.Tensor, ts: torch.Tensor,
                  extra: list[float], counter: list[int]) -> tuple[HermiteRecord, torch.Tensor]:
    """Solve forward at the output times ``ts`` plus ``extra`` (and interval midpoints), refine
    intervals whose Hermite interpolant misses its midpoint; return the record and the states at
    ``ts``.

    An interval is split again only while splitting still pays (its midpoint error fell to
    under half its parent's): below that the error is the solver's own, not the cubic's."""
    out = [float(v) for v in ts.tolist()]
    t0, t1 = out[0], out[-1]
    d = 1.0 if t1 >= t0 else -1.0
    keep = set(out)
    grid = _merge(out + _clean(extra, t0, t1), keep, d)
    check = list(range(len(grid) - 1))  # intervals (by left index) to check this pass
    parent: dict[float, float] = {}  # left end of a split interval -> its parent's error
    atol = _scale_tol(cfg.spec.atol, y0)
    rtol = _scale_tol(cfg.spec.rtol, y0)
    states: dict[float, torch.Tensor] = {}
    slopes: dict[float, torch.Tensor] = {}
    for pas in range(cfg.refine + 1):
        mids = [0.5 * (grid[i] + grid[i + 1]) for i in check]
        query = _merge(grid + mids, set(grid), d)
        tq = torch.tensor(query, dtype=ts.dtype, device=ts.device)
        tq[0], tq[-1] = ts[0], ts[-1]
        with torch.no_grad():
            sol = cfg.backend.solve(cfg.func, y0.detach(), tq, spec, None)
        cfg.stats.__iadd__(forward_part(sol.stats))
        if not sol.success:
            raise E.SolverError(f"interpolated adjoint: recording the forward solution failed: "
                                f"{sol.message}")
        for v, y in zip(query, sol.ys.detach(), strict=True):
            states.setdefault(v, y)
        for v in query:
            if v not in slopes:
                counter[0] += 1
                with torch.no_grad():
                    slopes[v] = cfg.func(torch.tensor(v, dtype=ts.dtype, device=ts.device),
                                         states[v])
        # the cubic of each interval's endpoints against the solved state at its midpoint
        bad = []
        for i, tm in zip(check, mids, strict=True):
            a, b = grid[i], grid[i + 1]
            if tm not in states:  # merged away: the interval is a few ulps wide
                continue
            h, ym = b - a, states[tm]
            guess = 0.5 * (states[a] + states[b]) + 0.125 * h * (slopes[a] - slopes[b])
            scale = atol + rtol * torch.maximum(ym.abs(), states[a].abs())
            err = float(((guess - ym).abs() / scale).max())
            if not math.isfinite(err) or (err > 1.0 and err < 0.5 * parent.get(a, math.inf)):
                bad.append((i, err))
        new_grid = query
        if not bad or pas == cfg.refine or len(new_grid) >= cfg.max_record:
            grid = new_grid
            break
        # split each failed interval so that the cubic error (~h^4) drops below tolerance
        splits: list[float] = []
        for i, err in bad:
            a, b = grid[i], grid[i + 1]
            k = 2 if not math.isfinite(err) else min(64, max(2, math.ceil(err ** 0.25 * 1.5)))
            pts = [a + (b - a) * j / k for j in range(1, k)]
            for v in [a, 0.5 * (a + b), *pts]:
                parent[v] = err
            splits += pts
        grid = _merge(new_grid + splits, set(new_grid), d)
        pos = {v: j for j, v in enumerate(grid)}
        fresh = [pos[v] for v in splits if v in pos]
        check = sorted({j - 1 for j in fresh} | set(fresh))
        check = [j for j in check if 0 <= j < len(grid) - 1]
    rec = HermiteRecord(grid, torch.stack([states[v] for v in grid]),
                        torch.stack([slopes[v] for v in grid]))
    return rec, torch.stack([states[v] for v in out])


# -------------------------------------------------------------------------------- the Function
class _Interp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, y0: torch.Tensor, t: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        counter = [0, 0]
        ts = t.detach()
        auto = cfg.checkpoints == "auto"
        rec_spec = _record_spec(cfg)
        if auto or cfg.event_fn is not None or rec_spec is not cfg.spec:
            called: list[torch.Tensor] = []  # the times the solver evaluates func at

            def rec_f(tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
                called.append(tt.detach().reshape(()))
                return cfg.func(tt, yy)

            with torch.no_grad():
                sol = cfg.backend.solve(rec_f, y0.detach(), ts, cfg.spec, cfg.event_fn)
            cfg.stats.__iadd__(forward_part(sol.stats))
            if not sol.success:  # no gradient can be formed; hand the failure to the API
                cfg.sol = sol
                ctx.failed = True
                ctx.save_for_backward()
                return sol.ys.detach()
            if sol.event_t is not None:
                ts = torch.stack([ts[0], sol.event_t.detach().to(ts.dtype).reshape(())])
            times = torch.stack(called).tolist() if auto and called else []
            base = sol
        else:
            times, base = [], None
        t0, t1 = float(ts[0]), float(ts[-1])
        if auto:
            extra = _subsample(_merge(_clean(times, t0, t1), set(), 1.0 if t1 >= t0 else -1.0),
                               max(cfg.max_record // 4, 1))
        elif isinstance(cfg.checkpoints, int):
            extra = [t0 + (t1 - t0) * (i + 1) / (cfg.checkpoints + 1)
                     for i in range(cfg.checkpoints)]
        else:
            extra = list(cfg.checkpoints)
        rec, ys = _build_record(cfg, rec_spec, y0, ts, extra, counter)
        if base is None:
            base = Solution(ys=ys, ts=ts, stats=Stats(), status=Status.SUCCESS, message="",
                            backend=getattr(cfg.backend, "name", ""), method=cfg.spec.method)
        cfg.sol = base
        cfg.stats.nfe_backward += counter[0]
        ys = base.ys.detach()
        ctx.failed = False
        ctx.rec = rec
        ctx.cfg = cfg
        ctx.event = base.event_t is not None
        ctx.t_len = len(t)
        ctx.save_for_backward(ts, ys, *params)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys: torch.Tensor):
        if ctx.failed:
            raise E.SolverError("interpolated adjoint: the forward solve failed, so there is no "
                                "gradient; check Solution.status before calling backward")
        cfg: _Config = ctx.cfg
        ts, ys, *params = ctx.saved_tensors
        n, P = cfg.n, sum(cfg.param_sizes)
        a = torch.zeros(n, dtype=ys.dtype, device=ys.device)
        g = torch.zeros(P, dtype=ys.dtype, device=ys.device)
        counter = [0, 0]
        for k in range(len(ts) - 1, 0, -1):
            a = a + grad_ys[k]
            if bool((a != 0).any()):
                a, g = _back_solve(cfg, ctx.rec, ts[k], ts[k - 1], a, g, params, counter)
        return finish_backward(ctx, cfg, ts, ys, grad_ys, a, g, params, counter)


def _back_solve(cfg: _Config, rec: HermiteRecord, t_hi, t_lo, a, g, params, counter):
    """Integrate ``[a, g]`` from ``t_hi`` back to ``t_lo`` with ``z(t)`` from the record."""
    n, func = cfg.n, cfg.func

    def aug(tt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        counter[0] += 1
        z = rec(float(tt.detach())).detach().requires_grad_(True)
        with torch.enable_grad():
            f = func(tt, z)
            parts = adjoint_vjp(f, z, params, -s[:n], s.dtype)
        return torch.cat(parts)

    tt = torch.stack([t_hi, t_lo]).detach()
    sol = cfg.backend.solve(aug, torch.cat([a, g]), tt, cfg.back_spec, None)
    counter[1] += int(sol.stats.steps)
    if not sol.success:
        raise E.SolverError(f"interpolated adjoint: the backward solve of [a, g] from "
                            f"t={float(t_hi):.6g} to {float(t_lo):.6g} failed: {sol.message}. Try "
                            "adjoint_method (a stiff one such as 'Radau' or 'BDF' on "
                            "backend='scipy') or adjoint_rtol/adjoint_atol")
    s1 = sol.ys[-1]
    return s1[:n], s1[n:]


# ------------------------------------------------------------------------------ entry point
def _back_norm(user_norm: Any, tree_sizes: list[int], n: int, param_sizes: tuple[int, ...]):
    if user_norm is None:
        sizes = [s for s in list(tree_sizes) + list(param_sizes) if s > 0]
        return block_norm(sizes, n + sum(param_sizes))
    if user_norm == "seminorm":
        return block_norm(list(tree_sizes), n)
    if callable(user_norm):
        return lambda x: user_norm((torch.zeros_like(x[:n]), x[:n], x[n:]))
    raise E.UnknownOptionError(f"adjoint_options['norm'] must be 'seminorm' or a callable taking "
                               f"(z, a, g), got {user_norm!r}")


def _back_tol(v: Any, p: int) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    return torch.cat([v, v.min().expand(p)]) if p else v


def interp_solve(p: Any, params: tuple[torch.Tensor, ...], adjoint_spec: SolveSpec) -> Solution:
    """Solve ``p`` (a :class:`pydiffbridge._prepare.Prepared`) with interpolating-adjoint gradients.

    Args:
        p: the normalised problem (flat ``func``, ``y0``, ``t``, forward ``spec``, ``event_fn``).
        params: tensors to differentiate besides ``y0`` and ``t``.
        adjoint_spec: the ``[a, g]`` solve's method, tolerances and options, plus
            ``"checkpoints"`` (``"auto"``, an int or a list of times), ``"refine"`` and
            ``"max_record"`` (see the module docstring); ``norm``: None, ``"seminorm"`` (only
            ``a`` counts) or a callable ``norm((z, a, g))`` (``z`` given as zeros).

    Returns:
        A flat :class:`Solution`, ``ys`` (and ``event_t``) differentiable in ``y0``, ``params``
        and ``t``; ``stats.nfe_backward`` counts record slopes and backward calls.
    """
    gparams = grad_params(params)
    opts = dict(adjoint_spec.options)
    checkpoints = opts.pop("checkpoints", "auto")
    refine = opts.pop("refine", DEFAULT_REFINE)
    max_record = opts.pop("max_record", MAX_RECORD)
    if checkpoints != "auto":
        checkpoints = parse_checkpoints(checkpoints, "'auto', an int or a list of times")
    if not isinstance(refine, int) or refine < 0:
        raise E.InputError(f"adjoint_options['refine'] must be an int >= 0, got {refine!r}")
    if not isinstance(max_record, int) or max_record < 2:
        raise E.InputError(f"adjoint_options['max_record'] must be an int >= 2, got "
                           f"{max_record!r}")
    opts = adjoint_options(p, adjoint_spec.method, opts)
    n = p.y0.numel()
    sizes = tuple(q.numel() for q in gparams)
    P = sum(sizes)
    back_spec = SolveSpec(adjoint_spec.method, _back_tol(adjoint_spec.rtol, P),
                          _back_tol(adjoint_spec.atol, P), opts,
                          _back_norm(adjoint_spec.norm, p.tree.sizes, n, sizes))
    cfg = _Config(p.backend, p.func, p.spec, back_spec, p.event_fn, checkpoints, refine,
                  max_record, n, sizes)
    ys = _Interp.apply(cfg, p.y0, p.t, *gparams)
    sol = cfg.sol
    sol.stats = cfg.stats
    sol.ys = ys
    if sol.event_t is not None and sol.success:
        sol.event_t, sol.ys = event_time(p, sol.event_t, ys)
        sol.ts = torch.stack([p.t[0], sol.event_t.to(p.t.dtype)])
    return sol
