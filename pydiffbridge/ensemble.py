"""Ensembles: many initial conditions and parameters of one right-hand side written in Julia.

When the right-hand side is small and cheap and you need thousands of trajectories, crossing
the Python boundary at every call costs more than the arithmetic.  :func:`solve_ensemble`
sends Julia *source* instead: it is compiled once and every trajectory runs in Julia, with
``EnsembleThreads`` on the CPU or DiffEqGPU's ``EnsembleGPUKernel`` (one GPU thread per
trajectory) when ``device="cuda"``.  There are no gradients through this path.

Example::

    rhs = '''
    f(u, p, t) = SVector(p[1] * u[1] - u[1] * u[2], u[1] * u[2] - p[2] * u[2])
    '''
    sol = solve_ensemble(rhs, y0s, torch.linspace(0, 10, 50), params=ps, method="Tsit5")
    sol.ys.shape  # (50, n_trajectories, 2)
"""

from __future__ import annotations

import numpy as np
import torch

from . import _options as O
from . import _validate as V
from .backends._marshal import to_numpy, to_torch
from .backends.julia import retcode_status
from .backends.methods import resolve
from .errors import InputError, TimeGridError
from .solution import Solution, Stats

__all__ = ["solve_ensemble"]


def _check(y0s, t, params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not isinstance(y0s, torch.Tensor) or y0s.ndim != 2 or y0s.shape[0] < 1:
        raise InputError("solve_ensemble: y0s must be a 2-D tensor [n_trajectories, state_size]"
                         f", got {getattr(y0s, 'shape', type(y0s).__name__)}")
    if not y0s.dtype.is_floating_point:
        raise InputError(f"solve_ensemble: y0s must be float32 or float64, got {y0s.dtype}")
    V.check_not_meta(y0s, "solve_ensemble: y0s")
    V.check_not_meta(t, "solve_ensemble: t")
    V.check_not_meta(params, "solve_ensemble: params")
    t = torch.as_tensor(t, dtype=y0s.dtype)
    if t.ndim != 1 or t.numel() < 2:
        raise TimeGridError("solve_ensemble: t must be a 1-D tensor of at least 2 output times")
    d = t[1:] - t[:-1]
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise TimeGridError("solve_ensemble: t must be strictly monotonic")
    if params is not None:
        params = torch.as_tensor(params, dtype=y0s.dtype)
        if params.ndim == 1:
            params = params.expand(y0s.shape[0], -1) if params.numel() else params
        if params.ndim != 2 or params.shape[0] != y0s.shape[0]:
            raise InputError("solve_ensemble: params must be [n_trajectories, n_params] (or one "
                             f"row shared by all), got shape {tuple(params.shape)} for "
                             f"{y0s.shape[0]} trajectories")
    for name, v in (("y0s", y0s), ("t", t), ("params", params)):
        if v is not None and not bool(torch.isfinite(v).all()):
            raise InputError(f"solve_ensemble: {name} contains NaN or Inf")
    return y0s, t, params


def solve_ensemble(rhs: str, y0s: torch.Tensor, t, *, params: torch.Tensor | None = None,
                   func_name: str = "f", method: str = "Tsit5", rtol: float = 1e-6,
                   atol: float = 1e-8, device: str = "cpu", max_num_steps: int = 100_000
                   ) -> Solution:
    """Solve ``du/dt = f(u, p, t)`` for every row of ``y0s`` (and of ``params``) in Julia.

    Args:
        rhs: Julia source defining ``func_name(u, p, t)``, out of place, returning an
            ``SVector`` (StaticArrays is loaded), a tuple, or (CPU only) a vector.
        y0s: ``[n_trajectories, state_size]`` initial states.
        t: output times (1-D, monotonic), shared by all trajectories.
        params: ``[n_trajectories, n_params]`` (or one row for all); ``p`` inside ``f``.
        method: an OrdinaryDiffEq method (any spelling of :mod:`pydiffbridge.backends.methods`);
            on a GPU one of Tsit5, Vern7, Vern9, Rosenbrock23, Rodas4, Rodas5P.
        device: ``"cpu"`` (EnsembleThreads) or ``"cuda"`` (EnsembleGPUKernel; needs
            ``python -m pydiffbridge julia install --gpu``).

    Returns:
        A :class:`Solution` with ``ys`` of shape ``[len(t), n_trajectories, state_size]``,
        ``status`` a tensor of :class:`Status` codes per trajectory and ``stats.nfe`` per
        trajectory.  Trajectories that failed have NaN rows past the failure.

    Raises:
        InputError: bad shapes or values (checked before Julia starts).
        JuliaUnavailableError: Julia cannot be started or installed.
    """
    if not isinstance(rhs, str) or func_name not in rhs:
        raise InputError(f"solve_ensemble: rhs must be Julia source text defining "
                         f"{func_name}(u, p, t)")
    y0s, t, params = _check(y0s, t, params)
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, torch.Tensor) or V.real_number(v) is None:  # Julia: one number each
            raise InputError(f"solve_ensemble: {name} must be a number, got {V.show(v)}")
        V.check_tolerance(v, name)
    V.check_tolerance_pair(float(rtol), float(atol))
    if not O.is_positive_int(max_num_steps):
        raise InputError(f"solve_ensemble: max_num_steps must be a positive integer, got "
                         f"{V.show(max_num_steps)}; e.g. max_num_steps=100000")
    dev = str(device)
    if dev.split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"solve_ensemble: device must be 'cpu' or 'cuda', got {device!r}")
    alg = resolve("julia", method)
    from ._julia import runtime

    jl = runtime.get_module()
    ndt = np.float64 if y0s.dtype == torch.float64 else np.float32
    u0s = np.ascontiguousarray(to_numpy(y0s, np.dtype(ndt)).T)
    ps = None if params is None else np.ascontiguousarray(to_numpy(params, np.dtype(ndt)).T)
    res = jl.solve_ensemble_src(rhs, func_name, u0s, ps, to_numpy(t, np.dtype(ndt)), alg,
                                reltol=rtol, abstol=atol, gpu=dev.startswith("cuda"),
                                maxiters=int(max_num_steps))
    u = np.asarray(res.u)  # (n, len(t), ntraj)
    ys = to_torch(np.ascontiguousarray(u.transpose(1, 2, 0)), y0s.dtype, y0s.device)
    codes = [str(c) for c in res.retcodes]
    status = torch.tensor([int(retcode_status(c)) for c in codes])
    nfe = torch.as_tensor(np.asarray(res.nf, dtype=np.int64))
    bad = [(i, c) for i, c in enumerate(codes) if not retcode_status(c).ok]
    message = "" if not bad else (f"{len(bad)} of {len(codes)} trajectories failed; first: "
                                  f"#{bad[0][0]} with Julia retcode {bad[0][1]}")
    return Solution(ys=ys, ts=t, stats=Stats(nfe=nfe), status=status, message=message,
                    backend="julia", method=alg)

