"""``pydiffbridge.solve(..., batch_dims=k)``: the checks and the flattening around the
per-sample loop of :mod:`pydiffbridge.solvers.batched`, and its joint adjoint."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import _options as O
from . import _resources as R
from . import _validate as V
from . import errors as E
from ._prepare import FUNC_SIGNATURE, STATUS_ERRORS, adjoint_params_of
from ._tree import Tree
from .backends.torch import ADAPTIVE_METHODS, STIFF_ADAPTIVE_METHODS, TorchBackend
from .gradients.settings import GradientSettings
from .solution import Solution, Stats, Status
from .solvers.autoswitch import check_auto_options
from .solvers.batched import BATCHED_OPTIONS, solve_batched
from .solvers.batched_stiff import BATCHED_STIFF_METHODS, BATCHED_STIFF_OPTIONS, solve_batched_stiff
from .solvers.esdirk import check_esdirk_options
from .solvers.jacobian import check_jacobian_option
from .solvers.tableaus import TABLEAUS

__all__ = ["batched_solve"]


def batched_solve(func: Callable, y0, t, *, batch_dims: int, rtol: Any, atol: Any,
                  method: str | None, options: dict | None, event_fn: Callable | None,
                  backend: Any, gradient: GradientSettings, raise_on_failure: bool) -> Solution:
    """``pydiffbridge.solve(..., batch_dims=k)``: checks, flattening and the call above.

    ``y0`` (or each tensor of a tuple ``y0``) has ``k`` leading batch dimensions; ``t`` is
    ``(m,)`` (shared) or ``batch_shape + (m,)`` (per sample).  The result has ``ys`` of shape
    ``(m, *batch_shape, ...)``, ``ts`` of shape ``batch_shape + (m,)``, per-sample stats and
    status (tensors of shape ``batch_shape``).

    ``gradient="adjoint"`` (or ``"checkpointed"``) keeps the per-sample forward and runs one
    joint adjoint over the whole batch through :func:`~pydiffbridge.gradients.bridge.bridge_solve`
    (see :mod:`pydiffbridge.gradients.batched`); ``stats.nfe_backward`` and
    ``stats.steps_backward`` are then ints.
    """
    if not isinstance(batch_dims, int) or isinstance(batch_dims, bool) or batch_dims < 1:
        raise E.InputError(f"batch_dims must be a positive int (leading batch dimensions of y0),"
                           f" got {batch_dims!r}")
    if backend not in ("torch", None) and getattr(backend, "name", None) != "torch":
        raise E.InputError(f"batch_dims (per-sample stepping) runs on the native torch backend "
                           f"only, got backend={backend!r}; drop batch_dims to use it")
    if event_fn is not None:
        raise E.InputError("batch_dims does not support event_fn; solve each sample with "
                           "event_fn separately")
    g = gradient
    gradient, adjoint_params = g.mode, g.params
    if gradient not in ("direct", "auto", "adjoint", "checkpointed", "interpolated"):
        raise E.InputError(f"batch_dims supports gradient='direct', 'auto', 'adjoint', "
                           f"'checkpointed' or 'interpolated', got {gradient!r}")
    tree = Tree.of(y0)
    V.check_not_meta(y0, "y0")
    V.check_not_meta(t, "t")
    if not tree.dtype.is_floating_point:
        raise E.InputError(f"y0 must be floating point, got {tree.dtype}")

    V.check_callable(func, "func", FUNC_SIGNATURE)
    bshape = tree.shapes[0][:batch_dims]
    if len(tree.shapes[0]) < batch_dims or any(s[:batch_dims] != bshape for s in tree.shapes):
        raise E.InputError(f"every tensor of y0 needs the same {batch_dims} leading batch "
                           f"dimension(s); got shapes {[tuple(s) for s in tree.shapes]}")
    B = math.prod(bshape)
    rests = [s[batch_dims:] for s in tree.shapes]
    sizes = [math.prod(r) for r in rests]
    n_state = sum(sizes)
    parts = [n for n in sizes if n] if tree.is_tuple else None  # an empty part has no error
    ys0 = y0 if tree.is_tuple else (y0,)
    flat0 = torch.cat([v.reshape(B, n) for v, n in zip(ys0, sizes, strict=True)], 1)
    if not bool(torch.isfinite(flat0).all()):
        raise E.NonFiniteError("y0 contains NaN or Inf")
    meth = TorchBackend().resolve_method(method)
    stiff = meth in STIFF_ADAPTIVE_METHODS
    assert not stiff or meth in BATCHED_STIFF_METHODS  # (every stiff method steps per sample)
    if meth not in ADAPTIVE_METHODS and not stiff:
        raise E.InputError(f"batch_dims gives per-sample adaptive steps; method {meth!r} is "
                           f"fixed-step (one grid for all samples): drop batch_dims for it")
    opts = O.check_options_arg(options)
    allowed = BATCHED_STIFF_OPTIONS if stiff else BATCHED_OPTIONS
    bad = sorted(set(opts) - allowed)
    if bad:
        raise E.UnknownOptionError(f"option(s) {bad} not supported with batch_dims and method "
                                   f"{meth!r}; accepted: {', '.join(sorted(allowed))}")
    if stiff:
        check_jacobian_option(opts, meth)
        if meth == "kvaerno5":
            check_esdirk_options(meth, opts)
        if meth == "auto":
            check_auto_options(opts)
    O.check_option_values(opts)
    V.check_tolerance(rtol, "rtol")
    V.check_tolerance(atol, "atol")
    t = torch.as_tensor(t, device=flat0.device)
    t = t if t.dtype.is_floating_point else t.to(torch.float64)
    if t.ndim == 1:
        tb = t.expand(B, -1)
    elif tuple(t.shape[:-1]) == tuple(bshape):
        tb = t.reshape(B, -1)
    else:
        raise E.TimeGridError(f"t must have shape (m,) or batch_shape + (m,) = "
                              f"{tuple(bshape) + ('m',)}, got {tuple(t.shape)}")
    if tb.shape[1] < 2 or not bool(torch.isfinite(tb).all()):
        raise E.TimeGridError("t needs at least 2 finite times per sample")
    d = tb[:, 1:] - tb[:, :-1]
    mono = (d > 0).all(1) | (d < 0).all(1)
    if not bool(mono.all()):
        b = int(torch.nonzero(~mono)[0])
        raise E.TimeGridError(f"t of sample {b} is not strictly monotonic")
    if B == 0 or n_state == 0:  # nothing to integrate: no step, no evaluation of func
        return _empty(flat0, t, tb, bshape, rests, sizes, tree.is_tuple, func, adjoint_params,
                      meth)

    def tol(v, name):  # (values checked above, or by check_tolerance for adjoint_*)
        if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
            return float(v)
        try:
            return torch.cat([torch.as_tensor(x, dtype=flat0.dtype, device=flat0.device)
                              .broadcast_to(s).reshape(B, -1) for x, s in zip(
                                  v if tree.is_tuple else (v,), tree.shapes, strict=True)], 1)
        except (RuntimeError, ValueError) as exc:
            raise E.InputError(f"{name} does not broadcast to the state's shape") from exc

    tdtype = opts.pop("dtype", None) or tb.dtype
    shapes = [(*bshape, *r) for r in rests]

    checked = [False]

    plain = not tree.is_tuple and len(bshape) == 1 and len(shapes[0]) == 2  # y0 is (B, n)

    def f(tt, yy):
        if checked[0] and not tree.is_tuple:  # fast path once the output shape is known good
            if plain:
                return func(tt, yy)
            return func(tt.reshape(bshape), yy.reshape(shapes[0])).reshape(B, -1)
        checked[0] = True
        ys = yy.reshape(shapes[0]) if not tree.is_tuple else tuple(
            p.reshape(sh) for p, sh in zip(torch.split(yy, sizes, 1), shapes, strict=True))
        out = func(tt.reshape(bshape), ys)
        outs = out if tree.is_tuple and isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(shapes) or any(not isinstance(o, torch.Tensor) or o.shape != sh
                                           for o, sh in zip(outs, shapes, strict=True)):
            raise E.RHSError(f"func must return dy/dt with the state's shape(s) {shapes}, got "
                             f"{[getattr(o, 'shape', type(o).__name__) for o in outs]}")
        if plain:
            f.checked = func  # the loop may call func itself from now on (no wrapper)
        return out.reshape(B, -1) if not tree.is_tuple else torch.cat(
            [o.reshape(B, -1) for o in outs], 1)

    params = ()
    if gradient in ("adjoint", "checkpointed", "interpolated") and torch.is_grad_enabled():
        params = adjoint_params_of(func, adjoint_params)
        if not (flat0.requires_grad or t.requires_grad or any(q.requires_grad for q in params)):
            gradient = "direct"  # nothing to differentiate: the plain forward solve
    else:
        gradient = "direct"
    rtol_v, atol_v = tol(rtol, "rtol"), tol(atol, "atol")
    V.check_tolerance_pair(rtol_v, atol_v)
    with R.memory_guard(shapes, flat0.dtype, tb.shape[1], flat0.device, batch=B):
        if gradient == "direct" and stiff:
            sol = solve_batched_stiff(f, flat0, tb, meth, rtol_v, atol_v, opts, parts, tdtype)
        elif gradient == "direct":
            sol = solve_batched(f, flat0, tb, TABLEAUS[meth], rtol_v, atol_v, opts, parts,
                                tdtype)
        else:
            adj = dict(options=g.adjoint_options, method=g.method,
                       rtol=None if g.rtol is None else tol(g.rtol, "adjoint_rtol"),
                       atol=None if g.atol is None else tol(g.atol, "adjoint_atol"))
            if adj["rtol"] is not None or adj["atol"] is not None:
                V.check_tolerance_pair(rtol_v if adj["rtol"] is None else adj["rtol"],
                                       atol_v if adj["atol"] is None else adj["atol"],
                                       "adjoint_rtol", "adjoint_atol")
            if gradient == "interpolated":
                from .gradients.batched_interp import bridge_batched_interp

                sol = bridge_batched_interp(f, flat0, t, tb, meth, rtol_v, atol_v, opts,
                                            parts or [n_state], tdtype, params, adj)
            else:
                from .gradients.batched import bridge_batched

                sol = bridge_batched(f, flat0, t, tb, meth, rtol_v, atol_v, opts,
                                     parts or [n_state], tdtype, params, gradient, adj)
    sol.ts = tb.reshape(*bshape, -1) if t.ndim > 1 else t
    m = sol.ys.shape[0]
    ys = sol.ys.reshape(m, B, -1)
    pieces = torch.split(ys, sizes, 2)
    out = tuple(p.reshape(m, *bshape, *r) for p, r in zip(pieces, rests, strict=True))
    sol.ys = out if tree.is_tuple else out[0]
    sol.status = sol.status.reshape(bshape)
    for k in ("nfe", "steps", "accepted", "rejected", "switches"):
        v = getattr(sol.stats, k)
        if isinstance(v, torch.Tensor):  # (switches: per sample with auto, else 0)
            setattr(sol.stats, k, v.reshape(bshape))
    if raise_on_failure and not sol.success:
        first = Status(int(sol.status.reshape(-1)[sol.status.reshape(-1) != 0][0]))
        raise STATUS_ERRORS.get(first, E.SolverError)(f"torch/{meth} (batch_dims): "
                                                       f"{sol.message}")
    return sol


def _empty(flat0: torch.Tensor, t: torch.Tensor, tb: torch.Tensor, bshape, rests, sizes,
           is_tuple: bool, func, adjoint_params, method: str) -> Solution:
    """The result for a batch without samples, or samples without elements: ``ys`` of shape
    ``(m, *batch_shape, ...)`` connected to ``y0`` (zero gradients), zero per-sample stats,
    every sample a success."""
    B, m = tb.shape
    also: tuple = (t,)
    if torch.is_grad_enabled():

        try:
            also += adjoint_params_of(func, adjoint_params)
        except TypeError:
            pass
    flat = R.empty_solution(flat0.reshape(-1), t, also, n_times=m).ys.reshape(m, B, sum(sizes))
    pieces = torch.split(flat, sizes, 2)
    out = tuple(p.reshape(m, *bshape, *r) for p, r in zip(pieces, rests, strict=True))
    zeros = torch.zeros(bshape, dtype=torch.long, device=flat0.device)
    stats = Stats(nfe=zeros, steps=zeros.clone(), accepted=zeros.clone(),
                  rejected=zeros.clone())
    return Solution(ys=out if is_tuple else out[0], ts=tb.reshape(*bshape, m) if t.ndim > 1
                    else t, stats=stats, status=torch.full(bshape, int(Status.SUCCESS),
                                                           device=flat0.device),
                    backend="torch", method=method)
