"""``odeint_dense``: torchdiffeq's continuous solution on ``[t0, t1]``.

One adaptive solve records every accepted step (its start, end, state and stages); the
returned function evaluates the method's own dense output (for ``dopri5`` Shampine's
4th-order interpolant) on the step that holds each requested time.  The interpolant is
differentiable with respect to ``y0``, the parameters of ``func`` and the evaluation times.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import torch

from . import errors as E
from ._prepare import Prepared, raise_for
from .backends.torch import ADAPTIVE_METHODS
from .solvers.interp import interp_weights
from .solvers.rk import solve_adaptive
from .solvers.tableaus import TABLEAUS

__all__ = ["odeint_dense"]


def odeint_dense(func: Callable, y0: torch.Tensor, t0, t1, *, rtol: Any = 1e-7,
                 atol: Any = 1e-9, method: str | None = None,
                 options: dict | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Solve ``dy/dt = func(t, y)`` from ``t0`` to ``t1`` and return ``dense(t_eval)``: the
    solution at any times ``t_eval`` (a scalar or 1-D tensor) inside ``[t0, t1]``, with shape
    ``t_eval.shape + y0.shape``.  Adaptive torch methods only (torchdiffeq: ``dopri5``).

    Raises:
        InputError: a tuple ``y0``, a fixed-grid method, or ``t_eval`` outside ``[t0, t1]``.
    """
    if not isinstance(y0, torch.Tensor):
        raise E.InputError("odeint_dense: y0 must be a tensor (tuple states are not supported, "
                           "as in torchdiffeq); use odeint with the output times you need")
    t0 = torch.as_tensor(t0)
    dtype = t0.dtype if t0.dtype.is_floating_point else torch.float64
    t = torch.stack([t0.reshape(()).to(dtype), torch.as_tensor(t1, dtype=dtype).reshape(())])
    p = Prepared(func, y0, t, rtol, atol, method, options, None, "torch")
    if p.method not in ADAPTIVE_METHODS:
        raise E.InputError(f"odeint_dense needs an adaptive method ({', '.join(ADAPTIVE_METHODS)})"
                           f", got {p.method!r}")
    if p.y0.numel() == 0:  # an empty state: nothing to integrate
        def empty(t_eval) -> torch.Tensor:
            te = torch.as_tensor(t_eval, dtype=p.t.dtype)
            return y0.new_zeros((*te.shape, *y0.shape))

        return empty
    record: list = []
    sol = solve_adaptive(p.func, p.y0, p.t, TABLEAUS[p.method], p.spec.rtol, p.spec.atol,
                         p.spec.norm, {**p.spec.options, "record": record})
    sol.backend, sol.method = "torch", p.method
    raise_for(sol)
    tab = TABLEAUS[p.method]
    ta, tb = float(p.t[0]), float(p.t[-1])
    direction = 1.0 if tb >= ta else -1.0
    starts = [direction * r[0] for r in record]
    shape = y0.shape

    def dense(t_eval) -> torch.Tensor:
        te = torch.as_tensor(t_eval, dtype=p.t.dtype, device=p.y0.device)
        flat_t = te.reshape(-1)
        out = []
        for i, tv in enumerate(flat_t.tolist()):
            if (tv - ta) * direction < -1e-12 * max(1.0, abs(ta)) or \
                    (tv - tb) * direction > 1e-12 * max(1.0, abs(tb)):
                raise E.InputError(f"odeint_dense: t_eval={tv:.6g} lies outside the solved "
                                   f"interval [{min(ta, tb):.6g}, {max(ta, tb):.6g}]")
            if not record:  # t0 == t1
                out.append(p.y0)
                continue
            k = max(0, min(len(record) - 1, bisect.bisect_right(starts, direction * tv) - 1))
            s0, _, hs, y, K = record[k]
            theta = (flat_t[i].to(y.real.dtype) - s0) / hs
            W = interp_weights(tab, theta.reshape(1).to(K.dtype))
            out.append(y + hs * (W @ K)[0])
        return torch.stack(out).reshape(*te.shape, *shape)

    dense.stats = sol.stats
    return dense
