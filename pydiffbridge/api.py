"""The public entry points: ``odeint``, ``odeint_adjoint``, ``odeint_event`` and ``solve``.

Inputs are checked and normalised once here (tuple states flattened, tolerances made
per-component vectors, the error norm built), then handed to a backend, directly or through
the adjoint bridge.  ``odeint``/``odeint_adjoint`` keep torchdiffeq's signatures and raise on
failure; ``solve`` returns a :class:`~pydiffbridge.solution.Solution` with stats and a status.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _resources as R
from . import errors as E
from ._prepare import (
    Prepared,
    adjoint_params_of,
    captures_grad_tensors,
    needs_grad,
    raise_for,
)
from .backends.base import get_backend
from .gradients.settings import GradientSettings
from .solution import Solution, Stats, Status

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "solve"]

def solve(func: Callable, y0, t, *, rtol: Any = 1e-7, atol: Any = 1e-9, method: str | None = None,
          options: dict | None = None, event_fn: Callable | None = None, backend: Any = "torch",
          gradient: str | GradientSettings = "direct", adjoint_rtol: Any = None,
          adjoint_atol: Any = None,
          adjoint_method: str | None = None, adjoint_options: dict | None = None,
          adjoint_params: Any = None, raise_on_failure: bool = False,
          batch_dims: int | None = None) -> Solution:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` and report states at ``t``.

    Without autograd the torch backend calls ``func`` on views of buffers it reuses from
    stage to stage: a ``func`` that keeps ``t`` or ``y`` beyond the call must clone them.

    Args:
        gradient: a :class:`~pydiffbridge.GradientSettings` or its mode: ``"direct"``
            backprop through the solver's operations (torch backend),
            ``"adjoint"`` (O(1) memory, through the bridge autograd.Function, any backend),
            ``"checkpointed"`` (adjoint that re-solves forward from saved states: stable on
            dissipative problems), ``"interpolated"`` (interpolating adjoint: records the
            forward states densely and back-solves only the adjoint, with the state from cubic
            Hermite interpolation; stable on stiff problems, with stiff ``adjoint_method``s too;
            see :mod:`pydiffbridge.gradients.interpolated`), or ``"auto"`` (direct where the backend
            allows it, else adjoint).
        raise_on_failure: raise the matching exception instead of returning a non-success
            status.
        batch_dims: number of leading batch dimensions of ``y0`` whose samples each get their
            own adaptive step size, accept/reject, error norm and status (torch backend,
            adaptive methods; see :mod:`pydiffbridge.solvers.batched`).  ``func`` then receives
            ``t`` of the batch shape; ``t`` may be ``(m,)`` or ``batch_shape + (m,)``; stats
            and status are per-sample tensors.  ``gradient="adjoint"``/``"checkpointed"``
            solve one joint adjoint over the batch (parameters shared by the samples);
            ``"interpolated"`` reads ``z`` from the per-sample forward's dense output (see
            :mod:`pydiffbridge.gradients.batched_interp`).

    Returns:
        A :class:`Solution`; ``ys`` has the structure of ``y0`` with a leading time dimension.
        For a failed solve the rows not reached are NaN and ``status``/``message`` say why.
    """
    g = GradientSettings.of(gradient, rtol=adjoint_rtol, atol=adjoint_atol, method=adjoint_method,
                            options=adjoint_options, params=adjoint_params)
    gradient, adjoint_params = g.mode, g.params
    if batch_dims is not None:
        from .batched_api import batched_solve

        return batched_solve(func, y0, t, batch_dims=batch_dims, rtol=rtol, atol=atol,
                             method=method, options=options, event_fn=event_fn, backend=backend,
                             gradient=g, raise_on_failure=raise_on_failure)
    p = Prepared(func, y0, t, rtol, atol, method, options, event_fn, backend)
    if p.y0.numel() == 0:
        return p.finish(_empty_solve(p, func, adjoint_params))
    if p.t.numel() == 1 and p.event_fn is None:
        # one output time: the initial state itself, nothing to integrate (as torchdiffeq)
        sol = Solution(ys=p.y0[None], ts=p.t, stats=Stats(), status=Status.SUCCESS,
                       backend=p.backend.name, method=p.method)
        return p.finish(sol)
    if gradient == "auto":
        gradient = "direct" if p.backend.supports_direct_grad else "adjoint"
        if (gradient == "adjoint" and adjoint_params is None and torch.is_grad_enabled()
                and not isinstance(func, torch.nn.Module) and captures_grad_tensors(func)):
            warnings.warn(
                f"func is not an nn.Module: on backend {p.backend.name!r} gradients reach y0 and t"
                " but no tensors captured by func; pass an nn.Module or use odeint_adjoint(..., "
                "adjoint_params=...)", E.GradientWarning, stacklevel=3)
    with R.memory_guard(list(p.tree.shapes), p.tree.dtype, p.t.numel(), p.tree.device):
        if gradient == "direct" and not p.backend.supports_direct_grad:
            if torch.is_grad_enabled() and needs_grad(p, func, adjoint_params):
                raise E.InputError(f"backend {p.backend.name!r} cannot backpropagate directly; "
                                   "use gradient='adjoint' (or odeint, which does so "
                                   "automatically)")
            with torch.no_grad():
                sol = p.backend.solve(p.func, p.y0, p.t, p.spec, p.event_fn)
        elif gradient == "direct" or not torch.is_grad_enabled() or not needs_grad(
                p, func, adjoint_params):
            sol = p.backend.solve(p.func, p.y0, p.t, p.spec, p.event_fn)
        elif gradient == "interpolated":
            from .gradients.interpolated import interp_solve

            sol = interp_solve(p, adjoint_params_of(func, adjoint_params),
                               p.adjoint_spec(g.rtol, g.atol, g.method, g.adjoint_options))
        else:
            from .gradients.bridge import bridge_solve

            params = adjoint_params_of(func, adjoint_params)
            sol = bridge_solve(p, params, p.adjoint_spec(g.rtol, g.atol, g.method,
                                                         g.adjoint_options),
                               gradient, shaped=True)
    if raise_on_failure:
        raise_for(sol)
    return p.finish(sol)


def _empty_solve(p: Prepared, func, adjoint_params) -> Solution:
    """A state without elements: nothing to integrate (no step, no evaluation of func)."""
    if p.event_fn is not None:
        raise E.InputError(f"y0 has no elements (shape(s) {[tuple(s) for s in p.tree.shapes]}):"
                           " there is no trajectory for event_fn to watch; give y0 at least "
                           "one element")
    also: tuple = (p.t,)
    if torch.is_grad_enabled():
        try:
            also += adjoint_params_of(func, adjoint_params)
        except TypeError:
            pass
    sol = R.empty_solution(p.y0, p.t, also)
    sol.backend, sol.method = p.backend.name, p.method
    return sol


def _event_search(t, options, event_fn):
    """torchdiffeq's ``odeint(..., t=[t0, t1], event_fn=...)`` searches for the event beyond
    ``t1`` (only its direction counts): as ``t=[t0]`` with an unbounded ``t_max``."""
    if (event_fn is None or not isinstance(t, torch.Tensor) or t.ndim != 1 or t.numel() != 2
            or (options and "t_max" in options)):
        return t, options
    d = float(t[1].detach()) - float(t[0].detach())
    return t[:1], {**(options or {}), "t_max": math.copysign(math.inf, d) if d else math.inf}


def _ignore_unknown_options(options, method, backend, where: str):
    """torchdiffeq's treatment of options a method does not take: warn and drop them.  Anything
    else wrong with ``options`` (bad values, a bad method or backend) is left to :func:`solve`."""
    if not isinstance(options, dict) or not options or not all(isinstance(k, str) for k in options):
        return options
    try:
        if method == "scipy_solver" and backend == "torch":
            backend = "scipy"
        be = get_backend(backend)
        check = getattr(be, "check_options", None)
        m = be.resolve_method(method)
        if check is None:
            return options
        try:
            check(m, options)
            return options
        except E.UnknownOptionError:
            pass
        base = {"solver": options["solver"]} if "solver" in options else {}
        bad = []
        for key, value in options.items():
            try:
                check(m, {**base, key: value})
            except E.UnknownOptionError:
                bad.append(key)
            except E.PyDiffBridgeError:
                pass
    except E.PyDiffBridgeError:
        return options
    if not bad:
        return options
    warnings.warn(f"{where}: method {m!r} (backend {be.name!r}) does not take option(s) "
                  f"{sorted(map(str, bad))}; they are ignored, as torchdiffeq does (solve() "
                  "raises UnknownOptionError instead)", E.UnknownOptionWarning, stacklevel=3)
    return {k: v for k, v in options.items() if k not in bad}


def odeint(func: Callable, y0, t, *, rtol: Any = 1e-7, atol: Any = 1e-9, method: str | None = None,
           options: dict | None = None, event_fn: Callable | None = None, backend: Any = "torch",
           batch_dims: int | None = None):
    """torchdiffeq-compatible solve: returns ``ys`` (or ``(event_t, ys)`` with ``event_fn``).

    Gradients flow by direct backprop on the torch backend; on engines that cannot be traced
    (SciPy, Julia) they flow through the adjoint bridge automatically.  ``batch_dims=k`` steps
    each sample of the ``k`` leading dimensions on its own (see :func:`solve`).  Raises the
    matching :mod:`pydiffbridge.errors` exception if the solve fails (naming the failing
    sample with ``batch_dims``).
    """
    t, options = _event_search(t, options, event_fn)
    options = _ignore_unknown_options(options, method, backend, "odeint")
    sol = solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                event_fn=event_fn, backend=backend, gradient="auto", raise_on_failure=True,
                batch_dims=batch_dims)
    return (sol.event_t, sol.ys) if event_fn is not None else sol.ys


def odeint_adjoint(func: Callable, y0, t, *, rtol: Any = 1e-7, atol: Any = 1e-9,
                   method: str | None = None, options: dict | None = None,
                   event_fn: Callable | None = None, adjoint_rtol: Any = None,
                   adjoint_atol: Any = None, adjoint_method: str | None = None,
                   adjoint_options: dict | None = None, adjoint_params: Any = None,
                   backend: Any = "torch"):
    """torchdiffeq-compatible adjoint solve with O(1) memory in the number of steps.

    ``func`` must be an ``nn.Module`` unless ``adjoint_params`` lists the tensors to
    differentiate.  ``adjoint_options={"norm": "seminorm"}`` uses the seminorm of Kidger et al.
    (2021) for the backward pass.
    """
    if isinstance(func, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        warnings.warn("odeint_adjoint: func is a DataParallel/DistributedDataParallel wrapper, "
                      "whose forward would run (and re-arm its gradient reducer) once per "
                      "function evaluation; wrap the model that calls odeint_adjoint in DDP and "
                      "pass func.module (see pydiffbridge.distributed)", E.GradientWarning,
                      stacklevel=2)
    if adjoint_params is None and not isinstance(func, torch.nn.Module):
        raise E.InputError("odeint_adjoint: func must be an nn.Module so that its parameters can "
                           "be found, or pass adjoint_params=(tensors...)")
    t, options = _event_search(t, options, event_fn)
    options = _ignore_unknown_options(options, method, backend, "odeint_adjoint")
    sol = solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                event_fn=event_fn, backend=backend, gradient="adjoint", adjoint_rtol=adjoint_rtol,
                adjoint_atol=adjoint_atol, adjoint_method=adjoint_method,
                adjoint_options=adjoint_options, adjoint_params=adjoint_params,
                raise_on_failure=True)
    return (sol.event_t, sol.ys) if event_fn is not None else sol.ys


def odeint_event(func: Callable, y0, t0, *, event_fn: Callable, reverse_time: bool = False,
                 odeint_interface: Callable = odeint, **kwargs):
    """torchdiffeq's ``odeint_event``: integrate from ``t0`` until ``event_fn(t, y)`` crosses
    zero; returns ``(event_t, ys)`` with ``ys`` the states at ``[t0, event_t]``.

    Args:
        t0: the start time: a number, or a tensor of one element (0-d or ``(1,)``); one that
            requires grad makes ``event_t`` and ``ys`` differentiable in it.
        event_fn: ``event_fn(t, y) -> tensor``; the first component to cross zero ends the
            solve.  As in torchdiffeq, autograd works through its ``t`` and ``y``.
        reverse_time: search towards decreasing ``t`` (from ``t0`` to ``t0 - inf``, or
            ``t0 - |options['t_max']|``) instead of increasing ``t``.
        odeint_interface: :func:`odeint` (direct backprop) or :func:`odeint_adjoint` (or a
            function with their signature); every other keyword argument (``rtol``,
            ``method``, ``options``, ``adjoint_*``, ...) is passed to it unchanged.  Fixed-grid
            methods need ``options['step_size']`` (as in torchdiffeq).

    ``event_t`` and ``ys`` are differentiable w.r.t. ``y0``, ``t0`` and the parameters of
    ``func`` and ``event_fn`` (implicit function theorem at the event), through either
    interface.
    """
    if isinstance(t0, torch.Tensor):
        if t0.numel() != 1:
            raise E.TimeGridError(f"odeint_event: t0 must be one time (a number, a 0-d tensor or a"
                                  f" tensor of one element), got shape {tuple(t0.shape)}")
        t = t0.reshape(1)
        if not t.dtype.is_floating_point:
            t = t.to(torch.float64)
    else:
        first = y0[0] if isinstance(y0, (tuple, list)) and len(y0) else y0
        dt = getattr(first, "dtype", torch.float64)
        dt = dt.to_real() if dt.is_complex else dt if dt.is_floating_point else torch.float64
        try:
            t = torch.as_tensor(t0, dtype=dt).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise E.TimeGridError(f"odeint_event: t0 must be a number or a tensor of one "
                                  f"element, got {type(t0).__name__}") from exc
        if t.numel() != 1:
            raise E.TimeGridError(f"odeint_event: t0 must be one time, got {t.numel()} values")
        t = t.to(first.device) if isinstance(first, torch.Tensor) else t
    if reverse_time:
        options = dict(kwargs.get("options") or {})
        options["t_max"] = -abs(float(options.get("t_max", math.inf)))
        kwargs["options"] = options
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
