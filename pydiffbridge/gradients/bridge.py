"""The adjoint bridge: one ``torch.autograd.Function`` that gives any backend O(1)-memory
gradients.

Forward runs ``backend.solve`` on the flat state with no graph kept and saves only the states
at the output times.  Backward walks the output times from last to first and, on each interval,
solves the augmented system ``s = [z, a, g]`` backwards in time on the same backend::

    dz/dt = f(t, z),   da/dt = -aᵀ ∂f/∂z,   dg/dt = -aᵀ ∂f/∂θ

(Chen et al. 2018).  Both vector-Jacobian products come from one ``torch.autograd.grad`` call
per right-hand-side evaluation.  At every output time ``z`` is reset to the saved forward state
and the incoming gradient is added to ``a``.  Time gradients are exact identities of the
adjoint: ``dL/dt_i = ⟨∂L/∂y_i, f(t_i, y_i)⟩`` for ``i ≥ 1`` and
``dL/dt_0 = -⟨a(t_0), f(t_0, y_0)⟩``.

``gradient="checkpointed"`` additionally stores the forward state at extra, uniformly spaced
times and, in backward, re-solves forward from each checkpoint with the graph kept (on
backends that support direct backprop) and backpropagates through that short solve.  On other
backends it back-solves the augmented system with ``z`` reset at every checkpoint.  Either way
back-solving ``z`` never runs over a long stretch, which is what goes wrong on dissipative
dynamics (errors in ``z`` grow like the inverse of the forward contraction).

Terminal events: the bridge integrates to the located event time ``T`` and the event time is
made differentiable outside it by the implicit function theorem (one frozen-slope Newton step
``t* = T - g(T, y_T) / (∂g/∂t + ∂g/∂y · f)``); the reported final state is
``y_T + f(T, y_T) (t* - T)``, so its derivative is ``∂y_T/∂θ + f · dt*/dθ``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .. import errors as E
from ..backends.base import Backend, SolveSpec
from ..solution import Solution, Stats
from ..solvers.hooks import adjoint_hooks
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

__all__ = ["BridgeConfig", "bridge_solve", "DEFAULT_CHECKPOINTS"]

#: extra uniformly spaced checkpoints of ``gradient="checkpointed"`` unless
#: ``adjoint_options={"checkpoints": N}`` says otherwise
DEFAULT_CHECKPOINTS = 16


@dataclass
class _Box:
    """Mutable holder for what forward produces besides the output tensor."""

    sol: Solution | None = None


@dataclass(frozen=True)
class BridgeConfig:
    """Every non-tensor input of the bridge (so ``backward`` returns ``None`` for it alone)."""

    backend: Backend
    func: Callable  # flat rhs (t, y_flat) -> dy_flat; the parameters are reachable by autograd
    spec: SolveSpec  # forward solve
    aug_spec: SolveSpec  # backward (augmented) solve, its norm already built
    aug_norm: AugNorm | None  # the norm in torchdiffeq's form (see ctx.adjoint_options)
    event_fn: Callable | None
    mode: str  # "adjoint" or "checkpointed"
    checkpoints: Any  # int (uniform extra times) or a list of floats
    n: int  # flat state size
    param_sizes: tuple[int, ...]
    stats: Stats = field(default_factory=Stats)  # the forward solve's stats, filled in backward
    box: _Box = field(default_factory=_Box)
    forward_backend: Backend | None = None  # runs the forward solves instead of ``backend``
    out_shape: tuple | None = None  # the output's shape (a tensor state: as the user's y0)


# --------------------------------------------------------------------------------------- norms


@dataclass(frozen=True)
class AugNorm:
    """The backward solve's error norm, in torchdiffeq's form and in ours.

    torchdiffeq hands an adjoint norm the tuple ``(t_adj, y, adj_y, *adj_params)`` (a user
    norm for a tuple state gets ``y`` and ``adj_y`` split into the state's parts; the built-in
    ones get them flat) and keeps it in ``grad_fn.adjoint_options["norm"]`` of the output,
    where a user may replace it before ``backward``.  Our augmented state has no time channel
    (time gradients are exact identities, see the module doc): ``t_adj`` is passed as 0.
    ``flat`` is the same norm on our flat ``[z, a, g]``.
    """

    tuple_norm: Callable
    flat: Callable
    to_tuple: Callable


def _aug_norm(user_norm: Any, tree: Any, n: int, params: tuple[torch.Tensor, ...]) -> AugNorm:
    """The backward solve's error norm on the flat ``[z, a, g]`` (see :class:`AugNorm`)."""
    sizes_p = [q.numel() for q in params]
    shapes_p = [q.shape for q in params]
    state_shape = None if tree.is_tuple else tree.shapes[0]

    def split_params(x: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(sh) for v, sh in zip(torch.split(x[2 * n:], sizes_p), shapes_p,
                                           strict=True)]

    if callable(user_norm):
        def to_tuple(x: torch.Tensor) -> tuple:
            ys = tree.unflatten(x[:n])
            ays = tree.unflatten(x[n:2 * n])
            ys, ays = (ys, ays) if tree.is_tuple else ((ys,), (ays,))
            return (x.new_zeros((), dtype=x.real.dtype), *ys, *ays, *split_params(x))

        return AugNorm(user_norm, lambda x: user_norm(to_tuple(x)), to_tuple)
    if user_norm is not None and user_norm != "seminorm":
        raise E.UnknownOptionError(f"adjoint_options['norm'] must be 'seminorm' or a callable "
                                   f"taking torchdiffeq's tuple (t, y, adj_y, *adj_params), got "
                                   f"{user_norm!r}")
    if user_norm is None:
        blocks = [s for s in tree.sizes + tree.sizes + sizes_p if s > 0]
        flat = block_norm(blocks, 2 * n + sum(sizes_p))
    else:
        flat = block_norm(tree.sizes + tree.sizes, 2 * n)

    def to_tuple(x: torch.Tensor) -> tuple:
        y, ay = x[:n], x[n:2 * n]
        if state_shape is not None:
            y, ay = y.view(state_shape), ay.view(state_shape)
        return (x.new_zeros((), dtype=x.real.dtype), y, ay, *split_params(x))

    def tuple_norm(tup: tuple) -> torch.Tensor:
        _, y, ay, *ps = tup
        return flat(torch.cat([y.reshape(-1), ay.reshape(-1), *[q.reshape(-1) for q in ps]]))

    return AugNorm(tuple_norm, flat, to_tuple)


def _widen(v: Any, n: int, p: int) -> Any:
    """Per-component tolerance of the state, laid out for [z, a, g]."""
    if not isinstance(v, torch.Tensor):
        return v
    return torch.cat([v, v, v.min().expand(p)]) if p else torch.cat([v, v])


# -------------------------------------------------------------------------------- the Function
class _Bridge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: BridgeConfig, y0: torch.Tensor, t: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ckpt = cfg.mode == "checkpointed"
        fwd = cfg.forward_backend or cfg.backend
        if ckpt and cfg.event_fn is None:
            # one solve to the output times and the checkpoints together
            ck_t, pos = _merge_times(t, cfg.checkpoints)
            sol = fwd.solve(cfg.func, y0, ck_t, cfg.spec, None)
            ck_y = sol.ys.detach()
            sol.ys, sol.ts = ck_y[pos], t
        else:
            sol = fwd.solve(cfg.func, y0, t, cfg.spec, cfg.event_fn)
        cfg.box.sol = sol
        ts = t
        if sol.event_t is not None:
            ts = torch.stack([t[0], sol.event_t.detach().to(t.dtype).reshape(())])
        ys = sol.ys.detach()
        if ckpt and cfg.event_fn is not None:
            # the event time is known only now: one more solve for the checkpoints
            ck_t, pos = _merge_times(ts, cfg.checkpoints)
            if len(pos) < len(ck_t):
                ck = fwd.solve(cfg.func, y0, ck_t, cfg.spec, None)
                ck_y = ck.ys.detach().clone()
                ck_y[pos] = ys
                cfg.stats.__iadd__(forward_part(ck.stats))
            else:
                ck_y = ys
        if ckpt:
            ctx.pos = pos
            ctx.save_for_backward(ts, ys, ck_t, ck_y, *params)
        else:
            ctx.save_for_backward(ts, ys, *params)
        ctx.cfg = cfg
        ctx.event = sol.event_t is not None
        ctx.t_len = len(t)
        # torchdiffeq keeps the adjoint options on the output's grad_fn; a norm replaced there
        # before backward is the one the backward solve uses
        ctx.adjoint_options = {**cfg.aug_spec.options, "norm": cfg.aug_norm.tuple_norm}
        if cfg.out_shape is not None and sol.event_t is None:
            return ys.view(len(ys), *cfg.out_shape)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys: torch.Tensor):
        cfg: BridgeConfig = ctx.cfg
        saved = ctx.saved_tensors
        grad_ys = grad_ys.reshape(len(grad_ys), -1)
        norm_now = ctx.adjoint_options.get("norm")
        if norm_now is not cfg.aug_norm.tuple_norm:  # replaced by the user after forward
            to_tuple = cfg.aug_norm.to_tuple
            cfg = replace(cfg, aug_spec=replace(cfg.aug_spec,
                                                norm=lambda x: norm_now(to_tuple(x))))
        if cfg.mode == "checkpointed":
            ts, ys, ck_t, ck_y, *params = saved
            pos = ctx.pos
        else:
            ts, ys, *params = saved
            ck_t, ck_y, pos = ts, ys, list(range(len(ts)))
        n, P = cfg.n, sum(cfg.param_sizes)
        dtype, dev = ys.dtype, ys.device
        a = torch.zeros(n, dtype=dtype, device=dev)
        g = torch.zeros(P, dtype=dtype, device=dev)
        out_at = {k: j for j, k in enumerate(pos)}
        counter = [0, 0]  # nfe, steps
        direct = cfg.mode == "checkpointed" and cfg.backend.supports_direct_grad
        for k in range(len(ck_t) - 1, 0, -1):
            if k in out_at:
                a = a + grad_ys[out_at[k]]
            if not bool((a != 0).any()):
                continue
            if direct:
                a, dg = _local_vjp(cfg, ck_t[k - 1:k + 1], ck_y[k - 1], a, params, counter)
                g = g + dg
            else:
                a, g = _back_solve(cfg, ck_t[k], ck_t[k - 1], ck_y[k], a, g, params, counter)
        return finish_backward(ctx, cfg, ts, ys, grad_ys, a, g, params, counter)


def _local_vjp(cfg, t_seg, y_start, a, params, counter):
    """Re-solve forward from a checkpoint with the graph kept, then backprop ``a`` through it."""
    with torch.enable_grad():
        z = y_start.detach().requires_grad_(True)
        sol = cfg.backend.solve(cfg.func, z, t_seg.detach(), cfg.spec, None)
        counter[0] += int(sol.stats.nfe)
        counter[1] += int(sol.stats.steps)
        if not sol.success:
            raise E.SolverError(f"checkpointed backward: re-solving from t={float(t_seg[0]):.6g} "
                                f"to {float(t_seg[1]):.6g} failed: {sol.message}")
        y_end = sol.ys[-1]
        if not y_end.requires_grad:
            return torch.zeros_like(a), torch.zeros(sum(cfg.param_sizes), dtype=a.dtype,
                                                    device=a.device)
        gr = torch.autograd.grad(y_end, (z, *params), a, allow_unused=True)
    dg = [torch.zeros(q.numel(), dtype=a.dtype, device=a.device) if v is None
          else v.reshape(-1).to(a.dtype) for v, q in zip(gr[1:], params, strict=True)]
    a_new = gr[0] if gr[0] is not None else torch.zeros_like(a)
    return a_new, (torch.cat(dg) if dg else a.new_zeros(0))


def _back_solve(cfg, t_hi, t_lo, z_hi, a, g, params, counter):
    """Solve the augmented system from ``t_hi`` back to ``t_lo``; returns ``(a, g)`` there."""
    n = cfg.n
    func = cfg.func

    def aug(tt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        counter[0] += 1
        with torch.enable_grad():
            z = s[:n].detach().requires_grad_(True)
            f = func(tt, z)
            parts = adjoint_vjp(f, z, params, -s[n:2 * n], s.dtype)
        return torch.cat([f.detach(), *parts])

    aug.hooks = adjoint_hooks(func, n, z_hi.real.dtype, z_hi.device)
    s0 = torch.cat([z_hi, a, g])
    tt = torch.stack([t_hi, t_lo]).detach()
    sol = cfg.backend.solve(aug, s0, tt, cfg.aug_spec, None)
    counter[1] += int(sol.stats.steps)
    if not sol.success:
        raise E.SolverError(f"adjoint backward solve from t={float(t_hi):.6g} to "
                            f"{float(t_lo):.6g} failed: {sol.message}. Try a tighter forward "
                            "tolerance, adjoint_rtol/adjoint_atol, or gradient='checkpointed'")
    s1 = sol.ys[-1]
    return s1[n:2 * n], s1[2 * n:]


def _merge_times(ts: torch.Tensor, checkpoints: Any) -> tuple[torch.Tensor, list[int]]:
    """Output times plus checkpoint times, in the direction of ``ts``; returns the merged times
    and the positions of the output times in them."""
    vals = [float(v) for v in ts.tolist()]
    t0, t1 = vals[0], vals[-1]
    if isinstance(checkpoints, int):
        extra = [t0 + (t1 - t0) * (i + 1) / (checkpoints + 1) for i in range(checkpoints)]
    else:
        extra = [float(v) for v in checkpoints]
    direction = 1.0 if t1 >= t0 else -1.0
    tol = 1e-9 * max(abs(t1 - t0), 1e-300)
    items = [(v, j) for j, v in enumerate(vals)]
    for v in extra:
        inside = (v - t0) * direction > 0 and (t1 - v) * direction > 0
        if inside and all(abs(v - o) > tol for o in vals):
            items.append((v, None))
    items.sort(key=lambda it: it[0] * direction)
    merged = torch.stack([ts[j] if j is not None else ts.new_tensor(v) for v, j in items])
    pos = [k for k, (_, j) in enumerate(items) if j is not None]
    return merged.detach(), pos


# ------------------------------------------------------------------------------ entry point
def bridge_solve(p: Any, params: tuple[torch.Tensor, ...], adjoint_spec: SolveSpec,
                 gradient: str, forward_backend: Backend | None = None,
                 shaped: bool = False) -> Solution:
    """Solve ``p`` (an :class:`pydiffbridge._prepare.Prepared`) through the bridge.

    Args:
        p: the normalised problem (flat ``func``, ``y0``, ``t``, forward ``spec``, ``event_fn``).
        params: tensors to differentiate besides ``y0`` and ``t``.
        adjoint_spec: the backward solve's method, tolerances and options; ``norm`` is None
            (max of per-block RMS over ``z``, ``a`` and every parameter), ``"seminorm"``
            (ignore the parameter-gradient channel) or a callable ``norm((z, a, g))``.  The
            option ``"checkpoints"`` (an int, or a list of times) sets the extra checkpoints of
            ``gradient="checkpointed"``.
        gradient: ``"adjoint"`` or ``"checkpointed"``.
        forward_backend: runs the forward solves instead of ``p.backend`` (which still runs
            the backward ones), e.g. per-sample stepping of :mod:`pydiffbridge.solvers.batched`.
        shaped: for a tensor state, return ``ys`` in the state's shape straight from the
            autograd Function (so that ``ys.grad_fn`` is the bridge's node, as in torchdiffeq).

    Returns:
        A flat :class:`Solution` whose ``ys`` is differentiable in ``y0``, ``params`` and ``t``
        (and whose ``event_t`` is differentiable too); ``stats.nfe_backward`` and
        ``stats.steps_backward`` are filled in when ``backward`` runs.
    """
    if gradient not in ("adjoint", "checkpointed"):
        raise E.InputError(f"bridge_solve: gradient must be 'adjoint' or 'checkpointed', got "
                           f"{gradient!r}")
    gparams = grad_params(params)
    opts = dict(adjoint_spec.options)
    checkpoints = parse_checkpoints(opts.pop("checkpoints", DEFAULT_CHECKPOINTS),
                                     "an int or a list of times")
    opts = adjoint_options(p, adjoint_spec.method, opts)
    n = p.y0.numel()
    sizes = tuple(q.numel() for q in gparams)
    P = sum(sizes)
    aug_norm = _aug_norm(adjoint_spec.norm, p.tree, n, gparams)
    aug_spec = SolveSpec(adjoint_spec.method, _widen(adjoint_spec.rtol, n, P),
                         _widen(adjoint_spec.atol, n, P), opts, aug_norm.flat)
    out_shape = tuple(p.tree.shapes[0]) if shaped and not p.tree.is_tuple else None
    cfg = BridgeConfig(p.backend, p.func, p.spec, aug_spec, aug_norm, p.event_fn, gradient,
                       checkpoints, n, sizes, forward_backend=forward_backend,
                       out_shape=out_shape)
    ys = _Bridge.apply(cfg, p.y0, p.t, *gparams)
    sol = cfg.box.sol
    cfg.stats.__iadd__(sol.stats)
    sol.stats = cfg.stats
    sol.ys = ys
    if sol.event_t is not None:
        sol.event_t, sol.ys = event_time(p, sol.event_t, ys)
        sol.ts = torch.stack([p.t[0], sol.event_t.to(p.t.dtype)])
    return sol


