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

from . import _validate as V
from . import errors as E
from ._tree import Tree
from .backends.base import SolveSpec, get_backend
from .backends.torch import FIXED_METHODS, _rms
from .solution import Solution, Stats, Status

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "solve"]

GRADIENTS = ("direct", "adjoint", "checkpointed", "interpolated", "auto")
FUNC_SIGNATURE = "func(t, y) -> dy/dt (dy/dt with the structure of y0: a tensor or a tuple)"
EVENT_SIGNATURE = "event_fn(t, y) -> tensor (crossing zero at the event)"
_STATUS_ERRORS = {
    Status.MAX_STEPS: E.MaxStepsExceededError,
    Status.STEP_UNDERFLOW: E.StepSizeUnderflowError,
    Status.NONFINITE: E.NonFiniteError,
    Status.FAILED: E.SolverError,
}


def _check_t(t, y_like: torch.Tensor, needs_two: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64 if not y_like.dtype.is_floating_point
                                else y_like.dtype)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise E.TimeGridError(f"t must be a 1-D tensor of times, got {type(t).__name__}") \
                from exc
    if t.ndim != 1:
        raise E.TimeGridError(f"t must be one-dimensional, got shape {tuple(t.shape)}; pass the "
                              "output times as a 1-D tensor")
    if not t.dtype.is_floating_point:
        t = t.to(torch.float64 if not y_like.dtype.is_floating_point else y_like.dtype)
    if t.numel() < 1:
        raise E.TimeGridError("t is empty; it needs at least one time (the start; one time "
                              "alone returns y0 without integrating)")
    if not bool(torch.isfinite(t).all()):
        raise E.TimeGridError("t contains NaN or Inf")
    if t.numel() > 1:
        d = t[1:] - t[:-1]
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            bad = int(torch.nonzero((d <= 0) if bool(d[0] > 0) else (d >= 0))[0])
            raise E.TimeGridError(
                f"t must be strictly increasing or strictly decreasing; it is not at index "
                f"{bad + 1} (t[{bad}]={float(t[bad]):.6g}, t[{bad + 1}]={float(t[bad + 1]):.6g})")
    return t.to(y_like.device) if t.device != y_like.device else t


def _build_norm(tree: Tree, user_norm) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(user_norm):
        return lambda flat: user_norm(tree.unflatten(flat))
    if user_norm is not None:
        raise E.UnknownOptionError(f"options['norm'] must be a callable, got {user_norm!r} "
                                   "('seminorm' is an adjoint_options setting)")
    if not tree.is_tuple:
        return _rms
    sizes = [n for n in tree.sizes if n]  # an empty part has no error to measure

    def max_rms(x):
        return torch.stack([torch.linalg.vector_norm(p) / (p.numel() ** 0.5)
                            for p in torch.split(x, sizes)]).max()

    max_rms.rms_parts = list(sizes)  # built in: the branch-free loop computes the same norm
    return max_rms


class Prepared:
    """Normalised inputs: what every path (direct, adjoint, any backend) starts from."""

    def __init__(self, func, y0, t, rtol, atol, method, options, event_fn, backend):
        self.tree = Tree.of(y0)
        if self.tree.device.type == "meta":
            V.check_not_meta(y0, "y0")
        if not (self.tree.dtype.is_floating_point or self.tree.dtype.is_complex):
            raise E.DTypeError(f"y0 must be floating point or complex, got {self.tree.dtype}; "
                               "use y0.double() or y0.float()")
        V.check_not_meta(t, "t")
        V.check_callable(func, "func", FUNC_SIGNATURE)
        V.check_callable(event_fn, "event_fn", EVENT_SIGNATURE, allow_none=True)
        self.y0 = self.tree.flatten(y0)
        if not bool(torch.isfinite(self.y0).all()):
            raise E.NonFiniteError("y0 contains NaN or Inf")
        self.t = _check_t(t, self.y0, needs_two=event_fn is None)
        V.check_method_arg(method)
        if method == "scipy_solver" and backend == "torch":
            backend = "scipy"  # torchdiffeq's spelling; the SciPy backend reads options["solver"]
        self.backend = get_backend(backend)
        self.method = self.backend.resolve_method(method)
        opts = V.check_options_arg(options)
        check = getattr(self.backend, "check_options", None)
        if check is not None:
            check(self.method, opts)
        V.check_option_values(opts, method=self.method)  # types, ranges (names: just above)
        if self.backend.name == "torch" and self.method in FIXED_METHODS:
            V.check_fixed_grid(self.t, opts)  # max_num_steps, before any grid is built
        norm = _build_norm(self.tree, opts.pop("norm", None))
        for key in ("step_t", "jump_t"):
            if key in opts:
                opts[key] = V.time_list(opts[key])
        rtol_v = self.tree.flat_values(rtol, "rtol")
        atol_v = self.tree.flat_values(atol, "atol")
        V.check_tolerance_pair(rtol_v, atol_v)
        self.spec = SolveSpec(self.method, rtol_v, atol_v, opts, norm)
        self.func = self.tree.wrap_func(func)
        self.event_fn = None
        if event_fn is not None:
            tree = self.tree
            self.event_fn = lambda tt, yy: event_fn(tt, tree.unflatten(yy))

    def adjoint_spec(self, rtol, atol, method, options) -> SolveSpec:
        s = self.spec
        opts = dict(options or {})
        norm = opts.pop("norm", None)
        r = self.tree.flat_values(rtol, "adjoint_rtol") if rtol is not None else s.rtol
        a = self.tree.flat_values(atol, "adjoint_atol") if atol is not None else s.atol
        if rtol is not None or atol is not None:
            V.check_tolerance_pair(r, a, "adjoint_rtol", "adjoint_atol")
        return SolveSpec(
            self.backend.resolve_method(method) if method is not None else s.method,
            r,
            a,
            {**{k: v for k, v in s.options.items() if k not in ("jump_t", "step_t")}, **opts},
            norm,  # None, "seminorm" or a callable: interpreted by the bridge
        )

    def finish(self, sol: Solution, t_out: torch.Tensor | None = None) -> Solution:
        if self.tree.is_tuple or sol.ys.shape[1:] != self.tree.shapes[0]:
            # (already in shape: the adjoint bridge's output, whose grad_fn stays the bridge's)
            sol.ys = self.tree.unflatten(sol.ys, lead=(sol.ys.shape[0],))
        return sol


def _raise_for(sol: Solution) -> None:
    if sol.success:
        return
    cls = _STATUS_ERRORS.get(Status(int(sol.status)), E.SolverError)
    hint = ""
    if cls is E.MaxStepsExceededError:
        hint = ("; raise options['max_num_steps'], loosen rtol/atol, or call pydiffbridge.solve"
                "(...) which returns the partial result with status=MAX_STEPS instead of raising")
    raise cls(f"{sol.backend}/{sol.method}: {sol.message}{hint}")


def solve(func: Callable, y0, t, *, rtol: Any = 1e-7, atol: Any = 1e-9, method: str | None = None,
          options: dict | None = None, event_fn: Callable | None = None, backend: Any = "torch",
          gradient: str = "direct", adjoint_rtol: Any = None, adjoint_atol: Any = None,
          adjoint_method: str | None = None, adjoint_options: dict | None = None,
          adjoint_params: Any = None, raise_on_failure: bool = False,
          batch_dims: int | None = None) -> Solution:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` and report states at ``t``.

    Without autograd the torch backend calls ``func`` on views of buffers it reuses from
    stage to stage: a ``func`` that keeps ``t`` or ``y`` beyond the call must clone them.

    Args:
        gradient: ``"direct"`` backprop through the solver's operations (torch backend),
            ``"adjoint"`` (O(1) memory, through the bridge autograd.Function, any backend),
            ``"checkpointed"`` (adjoint that re-solves forward from saved states: stable on
            dissipative problems), ``"interpolated"`` (interpolating adjoint: records the
            forward states densely and back-solves only the adjoint, with the state from cubic
            Hermite interpolation; stable on stiff problems, with stiff ``adjoint_method``s too;
            see :mod:`pydiffbridge.adjoint_interp`), or ``"auto"`` (direct where the backend
            allows it, else adjoint).
        raise_on_failure: raise the matching exception instead of returning a non-success
            status.
        batch_dims: number of leading batch dimensions of ``y0`` whose samples each get their
            own adaptive step size, accept/reject, error norm and status (torch backend,
            adaptive methods; see :mod:`pydiffbridge.solvers.batched`).  ``func`` then receives
            ``t`` of the batch shape; ``t`` may be ``(m,)`` or ``batch_shape + (m,)``; stats
            and status are per-sample tensors.  ``gradient="adjoint"``/``"checkpointed"``
            solve one joint adjoint over the batch (parameters shared by the samples).

    Returns:
        A :class:`Solution`; ``ys`` has the structure of ``y0`` with a leading time dimension.
        For a failed solve the rows not reached are NaN and ``status``/``message`` say why.
    """
    if gradient not in GRADIENTS:
        raise E.InputError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    for name, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if v is not None:  # checked here even where no adjoint ends up running
            V.check_tolerance(v, name)
    if adjoint_options is not None:
        V.check_option_values(V.check_options_arg(adjoint_options, "adjoint_options"),
                              "adjoint_options")
    V.check_method_arg(adjoint_method)
    if batch_dims is not None:
        from .solvers.batched_api import batched_solve

        return batched_solve(func, y0, t, batch_dims=batch_dims, rtol=rtol, atol=atol,
                             method=method, options=options, event_fn=event_fn, backend=backend,
                             gradient=gradient, raise_on_failure=raise_on_failure,
                             adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                             adjoint_method=adjoint_method, adjoint_options=adjoint_options,
                             adjoint_params=adjoint_params)
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
                and not isinstance(func, torch.nn.Module) and _captures_grad_tensors(func)):
            warnings.warn(
                f"func is not an nn.Module: on backend {p.backend.name!r} gradients reach y0 and t"
                " but no tensors captured by func; pass an nn.Module or use odeint_adjoint(..., "
                "adjoint_params=...)", E.GradientWarning, stacklevel=3)
    with V.memory_guard(list(p.tree.shapes), p.tree.dtype, p.t.numel(), p.tree.device):
        if gradient == "direct" and not p.backend.supports_direct_grad:
            if torch.is_grad_enabled() and _needs_grad(p, func, adjoint_params):
                raise E.InputError(f"backend {p.backend.name!r} cannot backpropagate directly; "
                                   "use gradient='adjoint' (or odeint, which does so "
                                   "automatically)")
            with torch.no_grad():
                sol = p.backend.solve(p.func, p.y0, p.t, p.spec, p.event_fn)
        elif gradient == "direct" or not torch.is_grad_enabled() or not _needs_grad(
                p, func, adjoint_params):
            sol = p.backend.solve(p.func, p.y0, p.t, p.spec, p.event_fn)
        elif gradient == "interpolated":
            from .adjoint_interp import interp_solve

            sol = interp_solve(p, _adjoint_params(func, adjoint_params),
                               p.adjoint_spec(adjoint_rtol, adjoint_atol, adjoint_method,
                                              adjoint_options))
        else:
            from .adjoint import bridge_solve

            params = _adjoint_params(func, adjoint_params)
            sol = bridge_solve(p, params, p.adjoint_spec(adjoint_rtol, adjoint_atol,
                                                         adjoint_method, adjoint_options),
                               gradient, shaped=True)
    if raise_on_failure:
        _raise_for(sol)
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
            also += _adjoint_params(func, adjoint_params)
        except TypeError:
            pass
    sol = V.empty_solution(p.y0, p.t, also)
    sol.backend, sol.method = p.backend.name, p.method
    return sol


def _captures_grad_tensors(func) -> bool:
    """Whether a plain function closes over tensors (or modules) that require gradients."""
    for cell in getattr(func, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:
            continue
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return True
        if isinstance(v, torch.nn.Module) and any(q.requires_grad for q in v.parameters()):
            return True
    return False


def _adjoint_params(func, adjoint_params) -> tuple[torch.Tensor, ...]:
    if adjoint_params is not None:
        return tuple(adjoint_params)
    if isinstance(func, torch.nn.Module):
        return tuple(p for p in func.parameters() if p.requires_grad)
    return ()


def _needs_grad(p: Prepared, func, adjoint_params) -> bool:
    if p.y0.requires_grad or p.t.requires_grad:
        return True
    try:
        return any(q.requires_grad for q in _adjoint_params(func, adjoint_params))
    except TypeError:
        return False


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
