"""Inputs checked and normalised once, for every path (direct, adjoint, batched, dense; any
backend): :class:`Prepared`, the time-grid and norm checks, and how a failed solve becomes an
exception.  Below the entry points (:mod:`pydiffbridge.api`, :mod:`pydiffbridge.batched_api`,
:mod:`pydiffbridge.dense`), above the backends."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _options as O
from . import _validate as V
from . import errors as E
from ._tree import Tree
from .backends.base import SolveSpec, get_backend
from .backends.torch import FIXED_METHODS, _rms
from .solution import Solution, Status

__all__ = ["Prepared", "FUNC_SIGNATURE", "EVENT_SIGNATURE", "STATUS_ERRORS",
           "check_t", "build_norm", "raise_for", "captures_grad_tensors", "adjoint_params_of",
           "needs_grad"]

FUNC_SIGNATURE = "func(t, y) -> dy/dt (dy/dt with the structure of y0: a tensor or a tuple)"
EVENT_SIGNATURE = "event_fn(t, y) -> tensor (crossing zero at the event)"
STATUS_ERRORS = {
    Status.MAX_STEPS: E.MaxStepsExceededError,
    Status.STEP_UNDERFLOW: E.StepSizeUnderflowError,
    Status.NONFINITE: E.NonFiniteError,
    Status.FAILED: E.SolverError,
}


def check_t(t, y_like: torch.Tensor, needs_two: bool) -> torch.Tensor:
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


def build_norm(tree: Tree, user_norm) -> Callable[[torch.Tensor], torch.Tensor]:
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
        self.t = check_t(t, self.y0, needs_two=event_fn is None)
        V.check_method_arg(method)
        if method == "scipy_solver" and backend == "torch":
            backend = "scipy"  # torchdiffeq's spelling; the SciPy backend reads options["solver"]
        self.backend = get_backend(backend)
        self.method = self.backend.resolve_method(method)
        opts = O.check_options_arg(options)
        check = getattr(self.backend, "check_options", None)
        if check is not None:
            check(self.method, opts)
        O.check_option_values(opts, method=self.method)  # types, ranges (names: just above)
        if self.backend.name == "torch" and self.method in FIXED_METHODS:
            O.check_fixed_grid(self.t, opts)  # max_num_steps, before any grid is built
        norm = build_norm(self.tree, opts.pop("norm", None))
        for key in ("step_t", "jump_t"):
            if key in opts:
                opts[key] = O.time_list(opts[key])
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


def raise_for(sol: Solution) -> None:
    if sol.success:
        return
    cls = STATUS_ERRORS.get(Status(int(sol.status)), E.SolverError)
    hint = ""
    if cls is E.MaxStepsExceededError:
        hint = ("; raise options['max_num_steps'], loosen rtol/atol, or call pydiffbridge.solve"
                "(...) which returns the partial result with status=MAX_STEPS instead of raising")
    raise cls(f"{sol.backend}/{sol.method}: {sol.message}{hint}")


def captures_grad_tensors(func) -> bool:
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


def adjoint_params_of(func, adjoint_params) -> tuple[torch.Tensor, ...]:
    if adjoint_params is not None:
        return tuple(adjoint_params)
    if isinstance(func, torch.nn.Module):
        return tuple(p for p in func.parameters() if p.requires_grad)
    return ()


def needs_grad(p: Prepared, func, adjoint_params) -> bool:
    if p.y0.requires_grad or p.t.requires_grad:
        return True
    try:
        return any(q.requires_grad for q in adjoint_params_of(func, adjoint_params))
    except TypeError:
        return False
