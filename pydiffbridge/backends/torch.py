"""The native torch backend: batched explicit RK, Adams and fixed-grid implicit RK solvers, and
the adaptive stiff solvers (Rosenbrock, ESDIRK, automatic switching) from
:mod:`pydiffbridge.solvers`, on any device, differentiable by direct backprop."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InputError, UnknownMethodError, UnknownOptionError
from ..solution import Solution, Stats, Status
from ..solvers.fixed import ADAMS, solve_fixed
from ..solvers.fixed_events import solve_fixed_until_event
from ..solvers.hooks import hooks_of
from ..solvers.implicit import IMPLICIT_METHODS, IMPLICIT_OPTIONS, check_implicit_options
from ..solvers.rk import solve_adaptive
from ..solvers.rosenbrock import ROSENBROCK_METHODS, STIFF_OPTIONS
from ..solvers.tableaus import TABLEAUS
from .base import SolveSpec

__all__ = ["TorchBackend", "ADAPTIVE_METHODS", "FIXED_METHODS", "STIFF_ADAPTIVE_METHODS",
           "METHODS"]

ADAPTIVE_METHODS = ("dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8")
EXPLICIT_FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4") + ADAMS
FIXED_METHODS = EXPLICIT_FIXED_METHODS + IMPLICIT_METHODS
#: adaptive stiff methods (solvers/rosenbrock.py, esdirk.py, autoswitch.py)
STIFF_ADAPTIVE_METHODS = ROSENBROCK_METHODS + ("kvaerno5", "auto")
METHODS = ADAPTIVE_METHODS + FIXED_METHODS + STIFF_ADAPTIVE_METHODS

_COMMON = {"dtype", "norm", "max_num_steps", "t_max"}
ADAPTIVE_OPTIONS = _COMMON | {"first_step", "step_t", "jump_t", "min_step", "max_step",
                              "safety", "ifactor", "dfactor", "pcoeff", "icoeff", "dcoeff",
                              "loop", "sync_every"}
LOOPS = ("auto", "host", "device")
FIXED_OPTIONS = _COMMON | {"step_size", "grid_constructor", "perturb", "interp", "max_iters",
                           "max_order"}
IMPLICIT_FIXED_OPTIONS = (_COMMON | {"step_size", "grid_constructor", "perturb", "interp",
                                     "max_iters"} | set(IMPLICIT_OPTIONS))
# other names users bring from torchdiffeq or other engines
_ALIASES = {"rk4_classic": "rk4", "explicit_euler": "euler", "Tsit5": "tsit5", "DP5": "dopri5",
            "BS3": "bosh3", "RK45": "dopri5", "RK23": "bosh3", "DP8": "dopri8",
            "DOP853": "dopri8", "Euler": "euler", "Midpoint": "midpoint", "RK4": "rk4",
            "Heun": "heun2", "Rosenbrock23": "rosenbrock23", "ode23s": "rosenbrock23",
            "Rodas4": "rodas4", "Rodas5": "rodas5", "Kvaerno5": "kvaerno5"}
_STIFF_EXTRA = {"rosenbrock23": set(), "rodas4": set(), "rodas5": set(),
                "kvaerno5": {"newton_tol", "max_iters"},
                "auto": {"stiff_method", "stiff_detect", "nonstiff_detect"}}


class TorchBackend:
    name = "torch"
    supports_direct_grad = True

    def methods(self) -> list[str]:
        return list(METHODS)

    def availability(self) -> str:
        return ""

    def resolve_method(self, method: str | None) -> str:
        if method is None:
            return "dopri5"
        m = _ALIASES.get(method, method)
        if m not in METHODS:
            raise UnknownMethodError(
                f"unknown method {method!r} for backend 'torch'. Adaptive: "
                f"{', '.join(ADAPTIVE_METHODS)}; fixed-step: "
                f"{', '.join(EXPLICIT_FIXED_METHODS)}; fixed-step implicit: "
                f"{', '.join(IMPLICIT_METHODS)}; adaptive stiff: "
                f"{', '.join(STIFF_ADAPTIVE_METHODS)}. Engine-specific methods (Radau, BDF, "
                "LSODA, ...) need backend='scipy' or backend='julia'.")
        return m

    def check_options(self, method: str, options: dict) -> None:
        if method in STIFF_ADAPTIVE_METHODS:
            return _check_stiff_options(method, options)
        allowed = (ADAPTIVE_OPTIONS if method in ADAPTIVE_METHODS else IMPLICIT_FIXED_OPTIONS
                   if method in IMPLICIT_METHODS else FIXED_OPTIONS)
        bad = sorted(set(options) - allowed)
        if bad:
            raise UnknownOptionError(
                f"option(s) {bad} not understood by method {method!r}; it accepts: "
                f"{', '.join(sorted(allowed))}")
        if (method in FIXED_METHODS and options.get("step_size") is not None
                and options.get("grid_constructor") is not None):
            raise InputError("options step_size and grid_constructor are mutually exclusive "
                             f"(method {method!r}); give one of them")
        if method in IMPLICIT_METHODS:
            check_implicit_options(method, options)

    def solve(self, func: Callable, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec,
              event_fn: Callable | None = None) -> Solution:
        method = self.resolve_method(spec.method)
        opts = dict(spec.options)
        norm = spec.norm or _rms
        if method in STIFF_ADAPTIVE_METHODS:
            sol = _solve_stiff(func, y0, t, method, spec, opts, norm, event_fn)
        elif method in ADAPTIVE_METHODS:
            if _device_loop(opts, y0, t, norm, event_fn, func):
                sol = _solve_device_loop(func, y0, t, TABLEAUS[method], spec.rtol, spec.atol,
                                         opts, norm.rms_parts)
            else:
                opts.pop("sync_every", None)
                sol = solve_adaptive(func, y0, t, TABLEAUS[method], spec.rtol, spec.atol, norm,
                                     opts, event_fn)
        else:
            fixed = solve_fixed if event_fn is None else solve_fixed_until_event
            sol = fixed(func, y0, t, method, TABLEAUS.get(method), opts, norm, spec.rtol,
                        spec.atol, event_fn)
        sol.backend, sol.method = "torch", method
        return sol


def _check_stiff_options(method: str, options: dict) -> None:
    from ..solvers.autoswitch import check_auto_options
    from ..solvers.esdirk import check_esdirk_options
    from ..solvers.jacobian import check_jacobian_option

    allowed = STIFF_OPTIONS | {"norm", "t_max"} | _STIFF_EXTRA[method]
    bad = sorted(set(options) - allowed)
    if bad:
        raise UnknownOptionError(
            f"option(s) {bad} not understood by method {method!r}; it accepts: "
            f"{', '.join(sorted(allowed))}")
    check_jacobian_option(options, method)
    if method == "kvaerno5":
        check_esdirk_options(method, options)
    if method == "auto":
        check_auto_options(options)


def _solve_stiff(func, y0, t, method, spec, opts, norm, event_fn) -> Solution:
    """The adaptive stiff methods (one flat real state, the host loop of solvers/stiff_loop)."""
    from ..solvers.autoswitch import solve_auto
    from ..solvers.esdirk import solve_esdirk
    from ..solvers.rosenbrock import solve_stiff

    # terminal events search up to t[-1], or t[0] + t_max for one output time; gradients
    # w.r.t. t flow under direct backprop (both in the shared loop, solvers/stiff_loop.py)
    kw = {"event_fn": event_fn, "t_max": float(opts.pop("t_max", math.inf))}
    if method == "auto":
        return solve_auto(func, y0, t, spec.rtol, spec.atol, norm, opts, **kw)
    if method == "kvaerno5":
        return solve_esdirk(func, y0, t, method, spec.rtol, spec.atol, norm, opts, **kw)
    return solve_stiff(func, y0, t, method, spec.rtol, spec.atol, norm, opts, **kw)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / (x.numel() ** 0.5)


_rms.rms_parts = None  # the built-in RMS norm (see _device_loop)


def _device_loop(opts: dict, y0: torch.Tensor, t: torch.Tensor, norm, event_fn,
                 func=None) -> bool:
    """Whether to run the shared-step solve on the branch-free loop of
    :mod:`~pydiffbridge.solvers.batched` (one "sample": the whole state), which never reads a
    value back to the host inside a step; pops the ``loop`` option.

    ``loop="auto"`` (default) takes it on CUDA when the solve needs nothing that only the host
    loop has (events, ``step_t``/``jump_t``, a norm other than the (block) RMS, gradients
    w.r.t. ``t``, complex states); ``"device"`` asks for it anywhere (and raises if one of
    those is asked for); ``"host"`` keeps the host loop (Python floats for times and
    decisions)."""
    loop = opts.pop("loop", "auto")
    if loop not in LOOPS:
        raise InputError(f"options['loop'] must be one of {LOOPS}, got {loop!r}")
    if loop == "host" or (loop == "auto" and y0.device.type != "cuda"):
        return False
    blockers = [why for why, bad in [
        ("event_fn", event_fn is not None),
        ("options step_t/jump_t", bool(opts.get("step_t") or opts.get("jump_t"))),
        ("an error norm other than the (block) RMS (a custom options['norm'], or the adjoint "
         "seminorm: pass adjoint_options={'loop': 'host'})",
         getattr(norm, "rms_parts", False) is False),
        ("gradients w.r.t. t", t.requires_grad and torch.is_grad_enabled()),
        ("a complex state", y0.is_complex()),
        ("callbacks on func (callback_step, ...)", hooks_of(func).any_callback),
    ] if bad]
    if blockers and loop == "device":
        raise InputError(f"options['loop']='device' cannot serve {', '.join(blockers)}; use "
                         "loop='host' (or 'auto')")
    return not blockers


def _solve_device_loop(func, y0, t, tab, rtol, atol, opts, parts) -> Solution:
    from ..solvers.batched import solve_batched  # imported late: it is not needed on the CPU

    def f1(tt, yy):  # the batch loop's (1,) times and (1, n) states
        return func(tt[0], yy[0])[None]

    kw = {k: v for k, v in opts.items() if k not in ("step_t", "jump_t", "t_max", "norm")}
    tdtype = kw.pop("dtype", None) or t.dtype
    sol = solve_batched(f1, y0[None], t[None], tab, rtol, atol, kw, parts, tdtype)
    st = sol.stats
    sol.ys, sol.ts = sol.ys[:, 0], t
    sol.stats = Stats(nfe=int(st.nfe[0]), steps=int(st.steps[0]), accepted=int(st.accepted[0]),
                      rejected=int(st.rejected[0]))
    sol.status = Status(int(sol.status[0]))
    sol.message = sol.message.replace("1 of 1 samples failed: sample 0: ", "")
    return sol
