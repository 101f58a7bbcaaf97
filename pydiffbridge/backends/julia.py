"""The Julia backend: OrdinaryDiffEq.jl through juliacall.

The torch right-hand side crosses the boundary as a Python callable that Julia calls with
its own vectors; :class:`~pydiffbridge.backends._marshal.NumpyRHS` reads ``u`` and writes
``du`` through numpy views of them (no copies).  Julia's return codes become a
:class:`Status` (``MaxIters`` -> ``MAX_STEPS``, ``DtLessThanMin`` -> ``STEP_UNDERFLOW``,
``Unstable``/``DtNaN`` -> ``NONFINITE``, anything else that is not a success -> ``FAILED``);
the API turns them into exceptions.  Julia itself is started (and installed) lazily by
:mod:`pydiffbridge._julia.runtime`, which raises
:class:`~pydiffbridge.errors.JuliaUnavailableError` fast when it cannot be had.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..errors import UnknownOptionError
from ..solution import Solution, Stats, Status
from ._marshal import NumpyRHS, engine_dtype, to_numpy, to_torch, tol_to_numpy
from .base import SolveSpec
from .methods import native_methods, resolve

__all__ = ["JuliaBackend", "RETCODES", "retcode_status"]

RETCODES: dict[str, Status] = {
    "Success": Status.SUCCESS,
    "Default": Status.SUCCESS,
    "Terminated": Status.EVENT,
    "MaxIters": Status.MAX_STEPS,
    "DtLessThanMin": Status.STEP_UNDERFLOW,
    "Unstable": Status.NONFINITE,
    "DtNaN": Status.NONFINITE,
    "InitialFailure": Status.FAILED,
    "ConvergenceFailure": Status.FAILED,
    "Failure": Status.FAILED,
    "Infeasible": Status.FAILED,
}
_HINTS = {
    Status.STEP_UNDERFLOW: "the step size fell below dtmin; the problem may be stiff here: try "
                           "method='Rodas5', 'KenCarp4' or 'FBDF', or a larger rtol/atol",
    Status.NONFINITE: "the solution became NaN/Inf (or unstable); check func, or try a stiff "
                      "method such as 'Rodas5'",
    Status.MAX_STEPS: "raise options['max_num_steps'] or loosen rtol/atol",
}
OPTIONS = {"first_step", "max_step", "min_step", "max_num_steps", "jump_t", "step_t",
           "step_size", "t_max", "dtype", "norm"}
FIXED = {"Euler", "Midpoint", "RK4"}


def retcode_status(code: str, with_event: bool = False) -> Status:
    """Our :class:`Status` for a SciML return code name."""
    st = RETCODES.get(str(code).split(".")[-1], Status.FAILED)
    if st == Status.EVENT and not with_event:
        return Status.FAILED
    return st


class JuliaBackend:
    """``backend="julia"``: DifferentialEquations.jl solvers (OrdinaryDiffEq)."""

    name = "julia"
    supports_direct_grad = False

    def methods(self) -> list[str]:
        return native_methods("julia")

    def availability(self) -> str:
        from .._julia import runtime

        return runtime.availability()

    def resolve_method(self, method: str | None) -> str:
        return "DP5" if method is None else resolve("julia", method)

    def check_options(self, method: str, options: dict) -> None:
        bad = sorted(set(options) - OPTIONS)
        if bad:
            raise UnknownOptionError(f"option(s) {bad} not understood by backend 'julia'; it "
                                     f"accepts: {', '.join(sorted(OPTIONS))}")
        if method in FIXED and "step_size" not in options:
            raise UnknownOptionError(f"method {method!r} is fixed-step on backend 'julia': "
                                     "give options={'step_size': h}")

    def solve(self, func: Callable, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec,
              event_fn: Callable | None = None) -> Solution:
        from .._julia import runtime

        method = self.resolve_method(spec.method)
        opts = dict(spec.options)
        self.check_options(method, opts)
        jl = runtime.get_module()  # raises JuliaUnavailableError fast when Julia is missing
        ts = [float(v) for v in t.tolist()]
        t_end = ts[-1] if len(ts) > 1 else ts[0] + float(opts.get("t_max", math.inf))
        n = y0.numel()
        rhs = NumpyRHS(func, y0.dtype, y0.device, t.dtype)
        errors: list[BaseException] = []

        def jl_rhs(du, u, tt):
            try:
                np.asarray(du)[...] = rhs(tt, np.asarray(u))
            except BaseException as exc:
                errors.append(exc)
                raise

        kwargs = dict(reltol=tol_to_numpy(spec.rtol), abstol=tol_to_numpy(spec.atol),
                      maxiters=int(opts.get("max_num_steps", 100_000)),
                      dt=opts.get("step_size", opts.get("first_step")),
                      dtmax=opts.get("max_step"), dtmin=opts.get("min_step"),
                      tstops=np.asarray(opts.get("step_t", ()), dtype=np.float64).reshape(-1),
                      jumps=np.asarray(opts.get("jump_t", ()), dtype=np.float64).reshape(-1),
                      fixed=method in FIXED)
        if event_fn is not None:
            with torch.no_grad():
                g0 = torch.as_tensor(event_fn(t[:1].reshape(()), y0)).reshape(-1)

            def jl_event(out, u, tt):
                try:
                    with torch.no_grad():
                        g = event_fn(torch.tensor(float(tt), dtype=t.dtype, device=y0.device),
                                     rhs.tensor(np.asarray(u)))
                    np.asarray(out)[...] = to_numpy(torch.as_tensor(g).reshape(-1),
                                                    np.dtype(np.float64))
                except BaseException as exc:
                    errors.append(exc)
                    raise

            kwargs.update(event=jl_event, nevent=int(g0.numel()))
        y0_np = to_numpy(y0, engine_dtype(y0.dtype)).copy()
        try:
            res = jl.solve_ode(jl_rhs, y0_np, np.asarray(ts, dtype=np.float64), t_end, method,
                               **kwargs)
        except Exception as exc:  # noqa: BLE001 - a Julia error: the user's or the solver's
            if errors:
                raise errors[0] from None
            nan = torch.full((len(ts), n), float("nan"), dtype=y0.dtype, device=y0.device)
            nan[0] = y0
            return Solution(ys=nan, ts=t, stats=Stats(nfe=rhs.calls), status=Status.FAILED,
                            message=f"Julia {method} raised {type(exc).__name__}: {exc}",
                            backend="julia", method=method)
        return self._solution(res, y0, t, ts, method, rhs, event_fn is not None)

    @staticmethod
    def _solution(res, y0, t, ts, method, rhs, with_event) -> Solution:
        code = str(res.retcode)
        status = retcode_status(code, with_event)
        tj = np.asarray(res.t, dtype=np.float64)
        u = np.asarray(res.u).T  # (len(tj), n)
        stats = Stats(nfe=rhs.calls or int(res.nf), accepted=int(res.naccept),
                      rejected=int(res.nreject))
        stats.steps = stats.accepted + stats.rejected
        message = ""
        if with_event:
            if status == Status.SUCCESS:
                status = Status.FAILED
                message = f"the event function never crossed zero up to t={tj[-1]:.6g}"
            ys = to_torch(np.stack([u[0], u[-1]]), y0.dtype, y0.device)
            event_t = torch.tensor(tj[-1], dtype=t.dtype, device=t.device)
            ts_out = torch.stack([t[0], event_t])
            sol = Solution(ys=ys, ts=ts_out, stats=stats, status=status, message=message,
                           event_t=event_t if status == Status.EVENT else None,
                           backend="julia", method=method)
            return sol
        out = np.full((len(ts), u.shape[1] if u.ndim == 2 else y0.numel()), np.nan,
                      dtype=u.dtype if u.size else engine_dtype(y0.dtype))
        k = min(len(tj), len(ts))
        out[:k] = u[:k]
        if not status.ok:
            where = f" at t={tj[-1]:.6g}" if len(tj) else ""
            message = f"Julia retcode {code}{where}: {_HINTS.get(status, 'the solver failed')}"
        return Solution(ys=to_torch(out, y0.dtype, y0.device), ts=t, stats=stats, status=status,
                        message=message, backend="julia", method=method)
