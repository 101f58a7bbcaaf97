"""Checks of hostile inputs, made once at the entry points before anything is solved.

Every check here turns a value that would otherwise be accepted silently, crash deep inside a
solver with a raw ``TypeError``, loop to ``max_num_steps`` with ``dt=nan`` or exhaust memory
into an exception of :mod:`pydiffbridge.errors` that names the argument, its bad value and
what to try.  They run on every call, so they are cheap: numbers are checked with plain
Python, a tensor with at most one reduction read back to the host, and a right-hand side's
signature is inspected once per function definition (cached by code object).

* tolerances (:func:`check_tolerance`, :func:`check_tolerance_pair`),
* callables (:func:`check_callable`: ``func(t, y)``, ``event_fn(t, y)``, ...),
* option values (:data:`OPTION_RULES`, :func:`check_option_values`) and the step count of a
  fixed grid (:func:`check_fixed_grid`),
* tensors on the meta device (:func:`check_not_meta`),
* empty states (:func:`empty_solution`) and running out of memory (:func:`memory_guard`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from . import errors as E
from .solution import Solution, Stats, Status

__all__ = ["DEFAULT_MAX_NUM_STEPS", "ADAMS_MAX_ORDER", "SolverMemoryError", "OPTION_RULES",
           "real_number", "is_positive_int", "show",
           "check_tolerance", "check_tolerance_pair", "check_callable", "check_options_arg",
           "check_option_values", "check_fixed_grid", "check_not_meta", "check_method_arg",
           "time_list", "empty_solution", "memory_guard"]

#: the adaptive loops' default ``max_num_steps`` (solvers/rk.py, solvers/batched.py, the SciPy
#: and Julia backends); fixed grids are held to the same limit
DEFAULT_MAX_NUM_STEPS = 100_000
#: highest order of the Adams methods (solvers/fixed.py).  Their coefficients integrate the
#: Lagrange interpolant of the last ``max_order`` slopes with 8-point Gauss-Legendre quadrature,
#: exact up to degree 15; 12 is the usual ceiling of variable-order Adams codes (LSODE's
#: Adams-Moulton: 12; Hairer-Norsett-Wanner I, III.3: the stability regions of Adams-Bashforth
#: shrink to nearly nothing beyond it) and keeps the Lagrange weights well conditioned.
ADAMS_MAX_ORDER = 12

SolverMemoryError = E.SolverMemoryError  # (defined in errors.py)


# -- numbers ------------------------------------------------------------------------------
def real_number(v) -> float | None:
    """``v`` as a float if it is one real number (not a bool), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex() \
            and v.dtype != torch.bool and v.device.type != "meta":
        return float(v)
    return None


def _integer(v) -> int | None:
    """``v`` as an int if it is an integer (an int, or an integral float such as ``1e5``)."""
    x = real_number(v)
    if x is None or not math.isfinite(x) or x != int(x):
        return None
    return int(x)


def show(v) -> str:
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and v.device.type != "meta":
            return f"tensor({v.item()!r})"
        return f"a tensor of shape {tuple(v.shape)}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# -- tolerances ---------------------------------------------------------------------------
_TOL_EXAMPLE = {"rtol": "rtol=1e-7", "atol": "atol=1e-9", "adjoint_rtol": "adjoint_rtol=1e-7",
                "adjoint_atol": "adjoint_atol=1e-9"}


def _tol_error(name: str, what: str) -> E.InputError:
    base = name.split("[")[0]
    example = _TOL_EXAMPLE.get(base, f"{base}=1e-7")
    hint = "; or leave it None to reuse the forward tolerance" if base.startswith("adjoint") \
        else ""
    return E.InputError(f"{name} {what}; a tolerance must be a finite number >= 0 (or a tensor "
                        f"of them broadcastable to the state), e.g. {example}{hint}")


def check_tolerance(v, name: str) -> None:
    """Raise :class:`InputError` unless ``v`` is a usable ``rtol``/``atol``: a number, a tensor
    (per component) or a list/tuple of them (per tensor of a tuple state), every value finite
    and ``>= 0``, no tensor requiring grad (as in torchdiffeq) or on the meta device.

    A number costs a comparison; a tensor one fused reduction read back to the host."""
    x = real_number(v) if not isinstance(v, torch.Tensor) else None
    if x is not None:
        if not 0.0 <= x < math.inf:  # False for NaN too
            raise _tol_error(name, f"is {x!r}" + (" (negative)" if x < 0 else ""))
        return
    if isinstance(v, (tuple, list)):
        for i, item in enumerate(v):
            check_tolerance(item, f"{name}[{i}]")
        return
    if v is None or isinstance(v, (bool, str, bytes)) or not (
            isinstance(v, torch.Tensor) or hasattr(v, "__array__")):
        raise _tol_error(name, f"is {show(v)} of type {type(v).__name__}")
    if not isinstance(v, torch.Tensor):
        try:
            v = torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise _tol_error(name, f"is {show(v)}, not numeric") from exc
    if v.requires_grad:
        raise E.InputError(f"{name} requires grad; tolerances cannot be differentiated (as in "
                           f"torchdiffeq): pass {name}.detach()")
    if v.device.type == "meta":
        raise _meta_error(name, v)
    if v.dtype == torch.bool or not (v.dtype.is_floating_point or v.is_complex()
                                      or v.dtype in _INT_DTYPES):
        raise _tol_error(name, f"has dtype {v.dtype}")
    if v.numel() == 0:
        return
    r = v.real if v.is_complex() else v
    if bool((torch.isfinite(r) & (r >= 0)).all()):
        return
    flat = r.reshape(-1)
    i = int(torch.nonzero(~(torch.isfinite(flat) & (flat >= 0)))[0])
    raise _tol_error(name, f"has the value {float(flat[i])!r} at flat index {i} (of "
                           f"{flat.numel()})")


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_tolerance_pair(rtol, atol, rname: str = "rtol", aname: str = "atol") -> None:
    """``rtol = atol = 0`` (for some component) asks for an exact solution: every error
    estimate divided by a zero scale, no step ever accepted.  ``rtol`` and ``atol`` are checked
    values (floats or tensors); one of them alone may be zero."""
    r_f = isinstance(rtol, float)
    a_f = isinstance(atol, float)
    if (r_f and rtol > 0.0) or (a_f and atol > 0.0):
        return
    if r_f and a_f:
        raise E.InputError(f"{rname}=0 and {aname}=0: the error test would demand an exact "
                           f"solution and reject every step; give {aname} > 0 (e.g. "
                           f"{aname}=1e-9) for a pure absolute test, or {rname} > 0")
    both = torch.as_tensor(rtol) == 0
    both = both & (torch.as_tensor(atol).to(both.device) == 0)
    if both.numel() and bool(both.any()):
        i = int(torch.nonzero(both.reshape(-1))[0])
        raise E.InputError(f"{rname} and {aname} are both 0 for component {i} (of the flattened "
                           f"state): the error test would reject every step; give that "
                           f"component {aname} > 0 or {rname} > 0")


# -- callables ----------------------------------------------------------------------------
_SIG_CACHE: dict[tuple, str | None] = {}


def _module_target(fn: torch.nn.Module, name: str, expected: str):
    """The function whose signature decides how an ``nn.Module`` may be called, or None
    where hooks may rewrite the arguments."""
    if type(fn).forward is torch.nn.Module.forward:
        raise E.RHSError(f"{name} is {type(fn).__name__}, an nn.Module without a forward method;"
                         f" it must be callable as {expected}: define its forward")
    if getattr(fn, "_forward_pre_hooks", None) or \
            getattr(torch.nn.modules.module, "_global_forward_pre_hooks", None):
        return None
    return fn.forward


def _bind_problem(target, nargs: int) -> str | None:
    """Why ``target`` cannot be called with ``nargs`` positional arguments ('' if it can;
    None if its signature cannot be known)."""
    key = None
    plain = target
    if inspect.ismethod(plain):
        plain = plain.__func__
    if inspect.isfunction(plain) and not hasattr(plain, "__wrapped__") \
            and not hasattr(plain, "__signature__"):
        key = (plain.__code__, inspect.ismethod(target), len(plain.__defaults__ or ()),
               frozenset(plain.__kwdefaults__ or ()), nargs)
        if key in _SIG_CACHE:
            return _SIG_CACHE[key]
    try:
        sig = inspect.signature(target)
    except Exception:  # builtins, C extensions, TorchScript: nothing to check
        return None
    try:
        sig.bind(*range(nargs))
        why = ""
    except TypeError as exc:
        name = getattr(target, "__qualname__", None) or type(target).__name__
        why = f"its signature is {name}{sig} ({exc})"
    if key is not None:
        if len(_SIG_CACHE) > 4096:
            _SIG_CACHE.clear()
        _SIG_CACHE[key] = why
    return why


def _first_parameter(m: torch.nn.Module, depth: int = 0):
    """The first parameter of ``m`` (depth first), without ``m.parameters()``'s generator
    machinery (which costs more than the rest of the checks together)."""
    for p in getattr(m, "_parameters", {}).values():
        if p is not None:
            return p
    if depth < 8:
        for sub in getattr(m, "_modules", {}).values():
            p = _first_parameter(sub, depth + 1) if sub is not None else None
            if p is not None:
                return p
    return None


def check_callable(fn, name: str, expected: str, nargs: int = 2, allow_none: bool = False
                   ) -> None:
    """Raise :class:`RHSError` unless ``fn`` can be called with ``nargs`` positional arguments.

    ``expected`` is the calling convention for the message, e.g. ``"func(t, y) -> dy/dt"``.
    Callables whose signature Python cannot report (builtins, TorchScript) pass; so do
    ``*args``, ``**kwargs``, ``functools.partial`` objects and instances with ``__call__``."""
    if fn is None and allow_none:
        return
    if not callable(fn):
        raise E.RHSError(f"{name} must be a callable {expected}, got {show(fn)} of type "
                         f"{type(fn).__name__}")
    if isinstance(fn, type) and issubclass(fn, torch.nn.Module):
        raise E.RHSError(f"{name} is the class {fn.__name__}, not a module: pass an instance, "
                         f"{fn.__name__}(...), callable as {expected}")
    target = _module_target(fn, name, expected) if isinstance(fn, torch.nn.Module) else fn
    if target is None:
        return
    why = _bind_problem(target, nargs)
    if why:
        raise E.RHSError(f"{name} must be callable as {expected}, but {why}; give it exactly "
                         f"{nargs} positional parameters (extra ones need defaults)")
    if isinstance(fn, torch.nn.Module):
        first = _first_parameter(fn)
        if first is not None and first.device.type == "meta":
            raise E.InputError(f"{name}'s parameters are on the meta device (shapes only, no "
                               "values): materialise them, e.g. module.to_empty(device='cpu') "
                               "and initialise, or build the module on a real device")


# -- options ------------------------------------------------------------------------------
def check_options_arg(options, name: str = "options") -> dict:
    """``options`` as a new dict (``None`` is ``{}``)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise E.InputError(f"{name} must be a dict of option names to values (or None), got "
                           f"{show(options)} of type {type(options).__name__}")
    bad = [k for k in options if not isinstance(k, str)]
    if bad:
        raise E.UnknownOptionError(f"{name} keys must be option names (str), got {bad[0]!r}")
    return dict(options)


def check_method_arg(method) -> None:
    if method is not None and not isinstance(method, str):
        raise E.UnknownMethodError(f"method must be a method name (str) or None, got "
                                   f"{show(method)} of type {type(method).__name__}")


def is_positive_int(v) -> bool:
    i = _integer(v)
    return i is not None and i >= 1


def _pos_finite(v) -> bool:
    x = real_number(v)
    return x is not None and 0.0 < x < math.inf


def _in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def ok(v) -> bool:
        x = real_number(v)
        if x is None or x != x:
            return False
        return (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    return ok


def _finite(v) -> bool:
    x = real_number(v)
    return x is not None and math.isfinite(x)


def _times(v) -> bool:
    x = real_number(v) if not isinstance(v, (list, tuple, torch.Tensor)) else None
    if x is not None:
        return math.isfinite(x)
    if isinstance(v, (list, tuple)):
        return all(real_number(e) is not None and math.isfinite(real_number(e)) for e in v)
    if isinstance(v, torch.Tensor) or hasattr(v, "__array__"):
        try:
            a = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v)
        except (TypeError, ValueError, RuntimeError):
            return False
        if a.device.type == "meta" or a.ndim > 1 or a.is_complex() or a.dtype == torch.bool:
            return False
        return a.numel() == 0 or bool(torch.isfinite(a).all())
    return False


def _nonzero(v) -> bool:
    x = real_number(v)
    return x is not None and x == x and x != 0.0


def _grid_constructor(v) -> bool:
    if v is None:
        return True
    check_callable(v, "options['grid_constructor']", "grid_constructor(func, y0, t) -> grid",
                   nargs=3)
    return True


#: option -> (predicate, what it must be, an example).  Only options that are given are
#: checked; the backends' ``check_options`` reject unknown names first.
OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "max_num_steps": (is_positive_int, "a positive integer", "max_num_steps=100000"),
    "step_size": (lambda v: v is None or _pos_finite(v), "a finite number > 0",
                  "step_size=0.01"),
    "first_step": (lambda v: v is None or _pos_finite(v), "a finite number > 0 (or None)",
                   "first_step=1e-3"),
    "max_step": (_in_range(0.0, math.inf, lo_open=True), "a number > 0 (inf: no limit)",
                 "max_step=0.1"),
    "min_step": (_in_range(0.0, math.inf, hi_open=True), "a finite number >= 0",
                 "min_step=1e-10"),
    "safety": (_in_range(0.0, 1.0, lo_open=True), "a number in (0, 1]", "safety=0.9"),
    "ifactor": (_in_range(1.0, math.inf, hi_open=True), "a finite number >= 1",
                "ifactor=10.0"),
    "dfactor": (_in_range(0.0, 1.0, lo_open=True), "a number in (0, 1]", "dfactor=0.2"),
    "pcoeff": (_finite, "a finite number", "pcoeff=0.0"),
    "icoeff": (_finite, "a finite number", "icoeff=1.0"),
    "dcoeff": (_finite, "a finite number", "dcoeff=0.0"),
    "max_order": (lambda v: _integer(v) is not None and 1 <= _integer(v) <= ADAMS_MAX_ORDER,
                  f"an integer in [1, {ADAMS_MAX_ORDER}]", "max_order=4"),
    "max_iters": (is_positive_int, "a positive integer", "max_iters=4"),
    "interp": (lambda v: v in ("linear", "cubic"), "'linear' or 'cubic'", "interp='cubic'"),
    "perturb": (lambda v: isinstance(v, bool) or (type(v).__module__ == "numpy"
                                                  and type(v).__name__ in ("bool", "bool_")),
                "True or False", "perturb=True"),
    "dtype": (lambda v: v is None or (isinstance(v, torch.dtype) and v.is_floating_point),
              "a floating torch dtype (the dtype of the times)", "dtype=torch.float64"),
    "step_t": (_times, "finite times: a number or a 1-D list/tensor", "step_t=[0.5, 1.0]"),
    "jump_t": (_times, "finite times: a number or a 1-D list/tensor", "jump_t=[0.5]"),
    "grid_constructor": (_grid_constructor, "a callable grid_constructor(func, y0, t)",
                         "grid_constructor=lambda f, y0, t: t"),
    "t_max": (_nonzero,
              "a nonzero number (the signed length of the event search; inf: unbounded)",
              "t_max=10.0"),
    "sync_every": (is_positive_int, "a positive integer", "sync_every=8"),
    "max_outputs_per_step": (is_positive_int, "a positive integer", "max_outputs_per_step=8"),
    "loop": (lambda v: v in ("auto", "host", "device"), "'auto', 'host' or 'device'",
             "loop='host'"),
    "compile": (lambda v: isinstance(v, bool), "True or False", "compile=True"),
}


def check_option_values(opts: Mapping, name: str = "options", method: str | None = None
                        ) -> None:
    """Check the type and range of every option in :data:`OPTION_RULES` that ``opts`` has."""
    for key, value in opts.items():
        rule = OPTION_RULES.get(key)
        if rule is None:
            continue
        if key == "max_iters" and value is None and method is not None \
                and not method.endswith("_adams"):
            continue  # the implicit RK methods read None as their default (solvers/implicit.py)
        ok, what, example = rule
        if not ok(value):
            raise E.InputError(f"{name}['{key}'] must be {what}, got {show(value)}; e.g. "
                               f"{name}={{'{example.split('=')[0]}': "
                               f"{example.split('=', 1)[1]}}}")
    lo, hi = opts.get("min_step"), opts.get("max_step")
    if lo is not None and hi is not None and real_number(lo) > real_number(hi):
        raise E.InputError(f"{name}['min_step']={real_number(lo)!r} exceeds {name}['max_step']="
                           f"{real_number(hi)!r}; the step size must fit between them")


def time_list(v) -> list[float]:
    """Sorted floats of a checked ``step_t``/``jump_t``."""
    if isinstance(v, torch.Tensor):
        v = v.detach().reshape(-1).tolist()
    elif real_number(v) is not None:
        v = [v]
    elif hasattr(v, "__array__"):
        v = torch.as_tensor(v).reshape(-1).tolist()
    return sorted(float(x) for x in v)


def check_fixed_grid(t: torch.Tensor, opts: Mapping) -> None:
    """Hold a fixed grid to ``max_num_steps`` (default :data:`DEFAULT_MAX_NUM_STEPS`) before it
    is built: its step count comes from ``t`` and ``step_size`` by arithmetic (the same as
    :func:`pydiffbridge.solvers.fixed.make_grid`); a ``grid_constructor``'s grid is the
    user's own and is not counted."""
    if opts.get("grid_constructor") is not None:
        return
    limit = _integer(opts.get("max_num_steps", DEFAULT_MAX_NUM_STEPS))
    step = opts.get("step_size")
    if step is None:
        n = t.numel() - 1
        how = f"t has {t.numel()} times"
    else:
        t0, t1 = t[[0, -1]].tolist()
        step = abs(float(step))
        span = abs(t1 - t0)
        n = max(1, math.ceil(span / step - 1e-9)) if span / step < 1e18 else math.inf
        how = f"step_size={step:g} over |t[-1] - t[0]|={span:g}"
    if n > limit:
        count = f"{n:,}" if n != math.inf else "more than 1e18"
        raise E.MaxStepsExceededError(
            f"the fixed grid needs {count} steps ({how}), more than max_num_steps={limit:,}; "
            "use a larger step_size (or fewer output times), an adaptive method such as "
            "'dopri5', or raise options['max_num_steps'] if you mean it")


# -- devices and memory -------------------------------------------------------------------
def _meta_error(name: str, v: torch.Tensor) -> E.InputError:
    return E.InputError(f"{name} is on the meta device (shape {tuple(v.shape)}, no values): a "
                        "solve needs data; create it on 'cpu' or 'cuda' (e.g. "
                        "torch.empty_like(x, device='cpu') and fill it)")


def check_not_meta(v, name: str) -> None:
    """Raise :class:`InputError` for a tensor (or a tuple of them) on the meta device."""
    if isinstance(v, torch.Tensor):
        if v.device.type == "meta":
            raise _meta_error(name, v)
    elif isinstance(v, (tuple, list)):
        for i, x in enumerate(v):
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                raise _meta_error(f"{name}[{i}]", x)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:.3g} MiB"


_OOM_TEXT = ("out of memory", "not enough memory", "can't allocate memory",
             "cannot allocate memory", "failed to allocate", "unable to allocate")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, E.PyDiffBridgeError):
        return False
    if isinstance(exc, E._OOM_BASES):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _OOM_TEXT)


@contextlib.contextmanager
def memory_guard(shape, dtype: torch.dtype, n_times: int, device, batch: int | None = None
                 ) -> Iterator[None]:
    """Re-raise running out of memory inside the block as :class:`SolverMemoryError` with the
    size asked for and what to try.  ``shape``: the state's shape (or a list of shapes)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        shapes = shape if isinstance(shape, list) else [shape]
        numel = sum(math.prod(s) for s in shapes)
        item = torch.empty((), dtype=dtype).element_size()
        state = " + ".join(str(tuple(s)) for s in shapes)
        per = f" ({batch} samples)" if batch is not None else ""
        raise SolverMemoryError(
            f"out of memory on {device} solving a state of {numel:,} elements{per}, shape "
            f"{state}, {dtype}: {_gib(numel * item)} per copy of the state, "
            f"{_gib(numel * item * n_times)} for the {n_times} output times alone, and each "
            "step holds one copy per stage (more with autograd). Try a smaller batch (split "
            "y0 along its batch dimension), float32, fewer output times, gradient='adjoint' "
            f"(memory independent of the step count), or a device with more memory [{exc}]"
        ) from exc


# -- empty states -------------------------------------------------------------------------
def empty_solution(y0_flat: torch.Tensor, t: torch.Tensor, also=(), n_times: int | None = None
                   ) -> Solution:
    """The solution of a state without elements: nothing to integrate, so no step and no
    evaluation.  ``ys`` has shape ``(n_times, 0)`` (default ``len(t)``; the caller restores the
    state's shape) and stays connected to ``y0`` (and to the tensors in ``also``: ``t``,
    parameters) so that backward gives them zero gradients."""
    ys = y0_flat.reshape(1, 0).expand(t.shape[0] if n_times is None else n_times, 0)
    for x in also:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            ys = ys + x.reshape(-1)[:0].sum().to(ys.dtype)
    return Solution(ys=ys, ts=t, stats=Stats(), status=Status.SUCCESS)
