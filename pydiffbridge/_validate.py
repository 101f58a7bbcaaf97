"""Checks of hostile inputs, made once at the entry points before anything is solved.

Every check here turns a value that would otherwise be accepted silently, crash deep inside a
solver with a raw ``TypeError``, loop to ``max_num_steps`` with ``dt=nan`` or exhaust memory
into an exception of :mod:`pydiffbridge.errors` that names the argument, its bad value and
what to try.  They run on every call, so they are cheap: numbers are checked with plain
Python, a tensor with at most one reduction read back to the host, and a right-hand side's
signature is inspected once per function definition (cached by code object).

* tolerances (:func:`check_tolerance`, :func:`check_tolerance_pair`),
* callables (:func:`check_callable`: ``func(t, y)``, ``event_fn(t, y)``, ...),
* tensors on the meta device (:func:`check_not_meta`).

Options (names, values, ranges, a fixed grid's step count) are checked in
:mod:`pydiffbridge._options`; empty states and running out of memory are handled in
:mod:`pydiffbridge._resources`.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch

from . import errors as E

__all__ = ["DEFAULT_MAX_NUM_STEPS", "ADAMS_MAX_ORDER", "SolverMemoryError", "integer",
           "real_number", "show", "check_tolerance", "check_tolerance_pair", "check_callable",
           "check_not_meta", "check_method_arg"]

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


def integer(v) -> int | None:
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
def check_method_arg(method) -> None:
    if method is not None and not isinstance(method, str):
        raise E.UnknownMethodError(f"method must be a method name (str) or None, got "
                                   f"{show(method)} of type {type(method).__name__}")


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
