"""Checks of ``options``: names are strings, values have the right type and range
(:data:`OPTION_RULES`), and a fixed grid's step count fits ``max_num_steps`` before the grid is
built (:func:`check_fixed_grid`).  Which names a method takes is its backend's business
(``check_options``); the values are checked here, once, at the entry points."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import errors as E
from ._validate import (
    ADAMS_MAX_ORDER,
    DEFAULT_MAX_NUM_STEPS,
    check_callable,
    integer,
    real_number,
    show,
)

__all__ = ["OPTION_RULES", "is_positive_int", "check_options_arg", "check_option_values",
           "check_fixed_grid", "time_list"]


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


def is_positive_int(v) -> bool:
    i = integer(v)
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
    "max_order": (lambda v: integer(v) is not None and 1 <= integer(v) <= ADAMS_MAX_ORDER,
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
    # the adaptive stiff methods (solvers/rosenbrock.py, esdirk.py, autoswitch.py)
    "autonomous": (lambda v: isinstance(v, bool), "True or False", "autonomous=True"),
    "jac": (lambda v: v is None or callable(v), "a callable jac(t, y) -> (n, n) tensor",
            "jac=lambda t, y: J"),
    "fixed_step": (lambda v: v is None or _pos_finite(v), "a finite number > 0 (or None)",
                   "fixed_step=0.01"),
    "stiff_detect": (is_positive_int, "a positive integer", "stiff_detect=15"),
    "nonstiff_detect": (is_positive_int, "a positive integer", "nonstiff_detect=5"),
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
    limit = integer(opts.get("max_num_steps", DEFAULT_MAX_NUM_STEPS))
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
