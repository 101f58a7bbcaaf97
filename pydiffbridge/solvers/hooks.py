"""What a right-hand side may carry besides ``f(t, y)``: torchdiffeq's step callbacks and its
``perturb`` keyword.

Callbacks (torchdiffeq's names, looked up on the user's ``func``; a missing one is not an
error): ``func.callback_step(t0, y0, dt)`` is called before every step attempt,
``callback_accept_step(t0, y0, dt)`` / ``callback_reject_step(t0, y0, dt)`` after the
decision (adaptive methods; fixed-grid methods accept every step).  The ``*_adjoint``
variants are called by the backward solve of the adjoint.  ``t0`` and ``dt`` are 0-d tensors
in the time dtype (``dt`` is the step's length, positive also when time runs backwards, as in
torchdiffeq, which integrates reversed time as negated time), ``y0`` has the user's structure
(tensor or tuple).

Perturbation (:class:`Perturb`): where a solver evaluates ``func`` on a discontinuity (a
``jump_t`` of an adaptive method, the grid points of a fixed-grid method with
``perturb=True``) it evaluates just after (``NEXT``) or just before (``PREV``) it in the
direction of integration: the time is moved by one ulp, and a ``func`` whose signature has a
``perturb`` keyword also receives the flag, as torchdiffeq's internal ``func(t, y,
perturb=...)`` does.

Solvers never see the user's function: they see the flat function made by
:meth:`pydiffbridge._tree.Tree.wrap_func`, which carries a :class:`Hooks` as ``f.hooks``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

__all__ = ["Perturb", "Hooks", "hooks_of", "accepts_perturb", "CALLBACK_NAMES", "call_perturbed",
           "adjoint_hooks"]

CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


class Perturb(Enum):
    """torchdiffeq's perturbation flag (same member names and values)."""

    NONE = 0
    PREV = 1
    NEXT = 2


@dataclass(frozen=True)
class Hooks:
    """Callbacks of one solve, already adapted to the flat state: ``(t0: float, y: flat
    tensor, dt: float) -> None``; ``None`` where ``func`` has no such callback."""

    step: Callable | None = None
    accept: Callable | None = None
    reject: Callable | None = None
    #: whether the flat function takes ``perturb=`` (it forwards it to a user func that does)
    perturb: bool = False

    @property
    def any_callback(self) -> bool:
        return self.step is not None or self.accept is not None or self.reject is not None


NO_HOOKS = Hooks()


def hooks_of(f: Callable) -> Hooks:
    return getattr(f, "hooks", NO_HOOKS)


def accepts_perturb(func: Callable) -> bool:
    """Whether ``func`` (or an ``nn.Module``'s ``forward``) names a ``perturb`` parameter."""
    target = func.forward if isinstance(func, torch.nn.Module) else func
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("perturb")
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


def find_callbacks(func: Callable, suffix: str = "") -> dict[str, Callable]:
    """``{name: callable}`` for torchdiffeq's callbacks (``suffix="_adjoint"`` for the
    backward-pass ones) that ``func`` defines."""
    out = {}
    for name in CALLBACK_NAMES:
        cb = getattr(func, name + suffix, None)
        if callable(cb):
            out[name] = cb
    return out


def adapt_callbacks(found: dict[str, Callable], unflatten: Callable, tdtype, device,
                    perturb: bool = False) -> Hooks:
    """Wrap user callbacks as ``(t0: float | Tensor, y_flat, dt: float | Tensor)``."""

    def adapt(cb):
        if cb is None:
            return None

        def call(t0, y, dt):
            t0 = t0 if isinstance(t0, torch.Tensor) else torch.tensor(t0, dtype=tdtype,
                                                                        device=device)
            dt = dt if isinstance(dt, torch.Tensor) else torch.tensor(dt, dtype=tdtype,
                                                                        device=device)
            cb(t0, unflatten(y), dt)

        return call

    return Hooks(step=adapt(found.get("callback_step")),
                 accept=adapt(found.get("callback_accept_step")),
                 reject=adapt(found.get("callback_reject_step")), perturb=perturb)


def beside(t: float, toward: float, *dtypes: torch.dtype) -> float:
    """The float next to ``t`` towards ``toward`` at the resolution of the coarsest of
    ``dtypes`` (the time dtype and the state's, in which ``func`` receives ``t``): a float64
    ``nextafter`` would round back onto ``t`` in a float32 ``func``."""
    eps = [torch.finfo(d).eps for d in dtypes if d.is_floating_point or d.is_complex]
    coarse = max(eps, default=0.0)
    if coarse <= torch.finfo(torch.float64).eps:
        return math.nextafter(t, toward)
    d = next(d for d in dtypes if (d.is_floating_point or d.is_complex)
             and torch.finfo(d).eps == coarse)
    d = d.to_real() if d.is_complex else d
    out = torch.nextafter(torch.tensor(t, dtype=d), torch.tensor(toward, dtype=d))
    return float(out)


def call_perturbed(f: Callable, t: float, t_toward: float, y: torch.Tensor, flag: Perturb,
                   make_t: Callable[[float], torch.Tensor]) -> torch.Tensor:
    """``f`` just beside ``t`` (one ulp towards ``t_toward``), with the flag where ``f`` takes
    it; ``make_t`` turns the moved float time into the tensor ``f`` expects."""
    t_dtype = make_t(t).dtype
    tt = make_t(beside(t, t_toward, t_dtype, y.dtype))
    if hooks_of(f).perturb:
        return f(tt, y, perturb=flag)
    return f(tt, y)


def adjoint_hooks(flat_func: Callable, n: int, tdtype, device) -> Hooks:
    """The ``*_adjoint`` callbacks of the user's func behind ``flat_func`` (a flat function
    from :meth:`Tree.wrap_func`), for the backward solve of the augmented state ``[z, a, g]``:
    they receive the tuple ``(z, a, g)`` of flat tensors (state, adjoint, parameter
    gradient) as ``y0``."""
    user = getattr(flat_func, "user_func", None)
    found = find_callbacks(user, "_adjoint") if user is not None else {}
    if not found:
        return NO_HOOKS

    def split(s: torch.Tensor):
        return s[:n], s[n:2 * n], s[2 * n:]

    return adapt_callbacks(found, split, tdtype, device)
