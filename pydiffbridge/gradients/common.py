"""What the two adjoint bridges share (:mod:`~pydiffbridge.gradients.bridge` for ``"adjoint"`` and
``"checkpointed"``, :mod:`~pydiffbridge.gradients.interpolated` for ``"interpolated"``): the block
norm of the augmented state, option and checkpoint parsing, time gradients, the differentiable
event time and the common end of backward."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .. import errors as E
from ..solution import Stats

__all__ = ["block_norm", "forward_part", "eval", "time_grads", "finish_backward",
           "grad_params", "parse_checkpoints", "adjoint_options", "event_time", "adjoint_vjp"]


def block_norm(sizes: list[int], keep: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Max over blocks of the RMS of each block; only the first ``keep`` elements count."""
    sizes_t: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def norm(x: torch.Tensor) -> torch.Tensor:
        x = x[:keep]
        sq = x.real * x.real + x.imag * x.imag if x.is_complex() else x * x
        if len(sizes) == 1:
            return torch.sqrt(sq.mean())
        key = (sq.device, sq.dtype)
        if key not in sizes_t:
            idx = torch.repeat_interleave(torch.arange(len(sizes), device=sq.device),
                                          torch.tensor(sizes, device=sq.device))
            sizes_t[key] = (idx, torch.tensor(sizes, dtype=sq.dtype, device=sq.device))
        idx, cnt = sizes_t[key]
        sums = torch.zeros(len(sizes), dtype=sq.dtype, device=sq.device).index_add_(0, idx, sq)
        return torch.sqrt((sums / cnt).max())

    if keep == sum(sizes):  # a plain block RMS: the branch-free loop computes the same norm
        norm.rms_parts = list(sizes)
    return norm


def adjoint_vjp(f: torch.Tensor, z: torch.Tensor, params: tuple, cot: torch.Tensor,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """``[cotᵀ ∂f/∂z, cotᵀ ∂f/∂θ_1, ...]`` flattened (zeros for what ``f`` does not use, or all
    zeros when ``f`` needs no gradient): the adjoint parts of every augmented right-hand side."""
    vj = (torch.autograd.grad(f, (z, *params), cot, allow_unused=True) if f.requires_grad
          else (None,) * (1 + len(params)))
    parts = [vj[0].reshape(-1) if vj[0] is not None else z.new_zeros(z.numel())]
    for v, q in zip(vj[1:], params, strict=True):
        parts.append(torch.zeros(q.numel(), dtype=dtype, device=z.device) if v is None
                     else v.reshape(-1).to(dtype))
    return parts


def forward_part(s: Stats) -> Stats:
    return Stats(nfe=s.nfe, steps=s.steps, accepted=s.accepted, rejected=s.rejected)


def eval(cfg: Any, t: torch.Tensor, y: torch.Tensor, counter) -> torch.Tensor:
    counter[0] += 1
    with torch.no_grad():
        return cfg.func(t, y)


def time_grads(cfg, ts, ys, grad_ys, a, counter) -> torch.Tensor:
    """``dL/dt_i = ⟨∂L/∂y_i, f(t_i, y_i)⟩`` (i ≥ 1), ``dL/dt_0 = -⟨a(t_0⁺), f(t_0, y_0)⟩``."""
    out = torch.zeros(len(ts), dtype=ts.dtype, device=ts.device)
    for i in range(len(ts)):
        w = -a if i == 0 else grad_ys[i]
        if bool((w != 0).any()):
            fi = eval(cfg, ts[i], ys[i], counter)
            out[i] = torch.sum(w * fi).real.to(ts.dtype)
    return out


def finish_backward(ctx, cfg, ts, ys, grad_ys, a, g, params, counter) -> tuple:
    """Common end of every bridge backward: time gradients, the last incoming gradient, the
    backward stats and the parameter gradients in each parameter's shape and dtype."""
    grad_t = None
    if ctx.needs_input_grad[2]:
        grad_t = time_grads(cfg, ts, ys, grad_ys, a, counter)
        if ctx.event:  # times are [t0, T]: only t0 is an input (the rest of t is a limit)
            grad_t = torch.cat([grad_t[:1], grad_t.new_zeros(ctx.t_len - 1)])
    a = a + grad_ys[0]
    cfg.stats.nfe_backward += counter[0]
    cfg.stats.steps_backward += counter[1]
    grads = [(gp.real if gp.is_complex() and not q.is_complex() else gp)
             .reshape(q.shape).to(q.dtype)
             for gp, q in zip(torch.split(g, list(cfg.param_sizes)), params, strict=True)]
    return (None, a, grad_t, *grads)


def grad_params(params: tuple) -> tuple[torch.Tensor, ...]:
    """Check that every adjoint parameter is a tensor; return those that require grad."""
    for i, q in enumerate(params):
        if not isinstance(q, torch.Tensor):
            raise E.InputError(f"adjoint_params[{i}] is a {type(q).__name__}, not a tensor; pass "
                               "the tensors func uses (e.g. tuple(module.parameters()))")
    return tuple(q for q in params if q.requires_grad)


def parse_checkpoints(value: Any, accepted: str) -> Any:
    """``adjoint_options['checkpoints']``: an int >= 0 passes through, anything else must
    become a list of float times (``accepted`` names the valid forms for the message)."""
    if not isinstance(value, int):
        try:
            return [float(v) for v in torch.as_tensor(value).reshape(-1).tolist()]
        except (TypeError, ValueError, RuntimeError) as exc:
            raise E.InputError(f"adjoint_options['checkpoints'] must be {accepted}, got "
                               f"{value!r}") from exc
    if value < 0:
        raise E.InputError(f"adjoint_options['checkpoints'] must be >= 0, got {value}")
    return value


def adjoint_options(p: Any, method: str, opts: dict) -> dict:
    """Validate the backward solve's options.  Options inherited from the forward solve that
    the adjoint method does not take (``step_size`` when ``adjoint_method`` is adaptive, ...) are
    dropped; the forward's ``jump_t``/``step_t`` are passed on where the method takes them (the
    backward solve meets the same discontinuities)."""
    check = getattr(p.backend, "check_options", None)
    fwd = p.spec.options
    for key in ("jump_t", "step_t"):
        if key in fwd and key not in opts:
            opts[key] = fwd[key]
    if check is None:
        return opts
    inherited = [k for k in opts if k in fwd and opts[k] is fwd[k]]
    for k in inherited:
        try:
            check(method, {k: opts[k]})
        except E.UnknownOptionError:
            del opts[k]
    check(method, opts)
    return opts


def event_time(p: Any, T: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable event time by the implicit function theorem (see
    :mod:`~pydiffbridge.gradients.bridge`): value ``T``, derivative ``-(dg/dθ) / (dg/dt)``.
    ``event_fn`` is called as :func:`~pydiffbridge.solvers.events.call_event` calls it
    (autograd works through its ``t`` and ``y``); one whose value depends on neither nor on any
    parameter (``zeros_like(t)``) gives a constant event time, as torchdiffeq's zero vjp does."""
    from ..solvers.events import call_event

    T = T.detach().to(p.t.dtype)
    y_T = ys[-1]
    with torch.no_grad():
        f_T = p.func(T, y_T.detach())
        g_T = call_event(p.event_fn, T, y_T)
    c = int(torch.argmin(g_T.abs()))
    g_val = call_event(p.event_fn, T, y_T)[c]
    if not g_val.requires_grad:
        return T, ys
    with torch.enable_grad():
        tt = T.clone().requires_grad_(True)
        yy = y_T.detach().requires_grad_(True)
        gc = call_event(p.event_fn, tt, yy)[c]
        g_t, g_y = (torch.autograd.grad(gc, (tt, yy), allow_unused=True) if gc.requires_grad
                    else (None, None))
    slope = torch.sum(g_y * f_T) if g_y is not None else y_T.new_zeros(())
    if g_t is not None:
        slope = slope + g_t.to(slope.dtype)
    if not math.isfinite(float(slope)) or float(slope) == 0.0:
        raise E.SolverError(f"event at t={float(T):.6g}: the event function's time derivative "
                            "dg/dt = ∂g/∂t + ∂g/∂y·f is zero there (a tangential crossing), so the "
                            "event time is not differentiable")
    t_ev = T - (g_val - g_val.detach()).to(T.dtype) / slope.to(T.dtype)
    y_ev = y_T + f_T * (t_ev - T).to(y_T.dtype)
    return t_ev, torch.cat([ys[:-1], y_ev[None]])
