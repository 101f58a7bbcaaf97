"""Continuous-depth blocks: ``ODEBlock`` and the time-dependent layers of ODE-Nets.

An :class:`ODEBlock` replaces a stack of residual blocks ``h <- h + f(h)`` by the solution
``z(t1)`` of ``dz/dt = f(t, z)``, ``z(t0) = x`` (Chen et al., 2018, Sec. 3).  The solver picks
the depth: with an adaptive method the number of function evaluations (NFE) follows from the
tolerances, which remain plain attributes so that a trained model can be evaluated more
cheaply (looser tolerance) or more precisely (tighter one).

Gradients come either from the adjoint method (``gradient="adjoint"``: O(1) memory in the
number of solver steps, via :func:`pydiffbridge.odeint_adjoint`) or from backpropagating
through the solver's operations (``gradient="direct"``, via :func:`pydiffbridge.odeint`;
memory grows with the number of steps, this is the paper's RK-Net when the method is a
fixed-step Runge-Kutta scheme).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ._checks import check_positive, check_size

__all__ = ["ODEBlock", "NFECounter", "ConcatConv2d", "ConcatLinear", "ConvODEFunc", "group_norm"]

_GRADIENTS = ("adjoint", "direct")


class NFECounter(nn.Module):
    """Wrap ``func(t, y)`` and count its calls, split into forward and backward phases.

    The owning block sets :attr:`phase` to ``"forward"`` while it solves and to
    ``"backward"`` afterwards, so every later call (the adjoint's reverse solve) is counted
    as a backward evaluation.  Direct backpropagation does not call ``func`` again (autograd
    replays the recorded operations), so its ``nfe_backward`` is 0.
    """

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func = func
        self.phase = "forward"
        self.nfe_forward = 0
        self.nfe_backward = 0

    def reset(self) -> None:
        """Zero both counters and enter the forward phase."""
        self.phase = "forward"
        self.nfe_forward = 0
        self.nfe_backward = 0

    def forward(self, t: torch.Tensor, y: Any) -> Any:
        if self.phase == "forward":
            self.nfe_forward += 1
        else:
            self.nfe_backward += 1
        return self.func(t, y)


class ODEBlock(nn.Module):
    """Map ``x`` to ``z(t1)`` where ``dz/dt = func(t, z)`` and ``z(t0) = x``.

    Args:
        func: the dynamics, a module called as ``func(t, z)`` with a scalar tensor ``t``.
        t: integration interval ``(t0, t1)``.
        method: solver name (``"dopri5"``, ``"rk4"``, ...), see :func:`pydiffbridge.odeint`.
        rtol, atol: tolerances of adaptive methods; plain attributes, change them any time.
        gradient: ``"adjoint"`` (O(1) memory) or ``"direct"`` (backprop through the solver).
        backend: solver engine passed on as ``backend=``.
        options: method options, e.g. ``{"step_size": 0.25}`` for fixed-step methods.
        adjoint_kwargs: extra keyword arguments for :func:`pydiffbridge.odeint_adjoint`
            (``adjoint_rtol``, ``adjoint_method``, ...).

    Attributes:
        nfe_forward: evaluations of ``func`` during the last forward pass.
        nfe_backward: evaluations of ``func`` since then, i.e. during the last backward pass
            (0 for ``gradient="direct"``).  Each call of the block resets both counters, so
            read them before running the block again.

    Under ``torch.no_grad()`` the block solves with :func:`pydiffbridge.odeint` whatever
    ``gradient`` says, since no backward pass will follow.
    """

    def __init__(self, func: nn.Module, t: Sequence[float] = (0.0, 1.0), method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-3, gradient: str = "adjoint",
                 backend: str = "torch", options: dict[str, Any] | None = None,
                 adjoint_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise InputError(f"ODEBlock: func must be an nn.Module (got {type(func).__name__}) so "
                             "that its parameters are registered; wrap plain functions in a "
                             "Module.")
        if gradient not in _GRADIENTS:
            raise InputError(f"ODEBlock: gradient={gradient!r} is not one of {_GRADIENTS}; use "
                             "'adjoint' for O(1) memory or 'direct' to backprop through the "
                             "solver.")
        t = tuple(float(v) for v in t)
        if len(t) != 2 or t[0] == t[1]:
            raise InputError(f"ODEBlock: t={t} must be two distinct times (t0, t1), e.g. (0, 1).")
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if not isinstance(tol, torch.Tensor):  # per-component tensors: the solver checks
                check_positive(tol, f"ODEBlock({name})")
        if not isinstance(method, str):
            raise InputError(f"ODEBlock(method={method!r}): expected a method name such as "
                             "'dopri5' or 'rk4'.")
        self.counter = NFECounter(func)
        self.t = t
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.gradient = gradient
        self.backend = backend
        self.options = dict(options) if options else None
        self.adjoint_kwargs = dict(adjoint_kwargs) if adjoint_kwargs else {}

    @property
    def func(self) -> nn.Module:
        """The user's dynamics module."""
        return self.counter.func

    @property
    def nfe_forward(self) -> int:
        return self.counter.nfe_forward

    @property
    def nfe_backward(self) -> int:
        return self.counter.nfe_backward

    def _times(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return torch.tensor(self.t, dtype=dtype, device=x.device)

    def trajectory(self, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """Return ``z`` at the times ``ts`` (stacked on dim 0), with the block's settings."""
        return self._solve(x, ts.to(dtype=x.dtype, device=x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._solve(x, self._times(x))[-1]

    def _solve(self, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        from .. import odeint, odeint_adjoint  # late import: nn is loaded by the package root

        kwargs: dict[str, Any] = dict(rtol=self.rtol, atol=self.atol, method=self.method,
                                      options=self.options, backend=self.backend)
        self.counter.reset()
        if isinstance(x, torch.Tensor) and x.numel() == 0:  # an empty batch: nothing to solve
            self.counter.phase = "backward"
            return x.unsqueeze(0).expand(ts.numel(), *x.shape) + 0
        try:
            if self.gradient == "adjoint" and torch.is_grad_enabled():
                return odeint_adjoint(self.counter, x, ts, **kwargs, **self.adjoint_kwargs)
            return odeint(self.counter, x, ts, **kwargs)
        finally:
            self.counter.phase = "backward"

    def extra_repr(self) -> str:
        return (f"t={self.t}, method={self.method!r}, rtol={self.rtol:g}, atol={self.atol:g}, "
                f"gradient={self.gradient!r}, backend={self.backend!r}")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``min(32, channels)`` groups, the normalisation of the paper's code."""
    channels = check_size(channels, "group_norm(channels)")
    if channels > 32 and channels % 32:
        raise InputError(f"group_norm(channels={channels}): with 32 groups the channels must be "
                         "a multiple of 32 (or at most 32), e.g. 64.")
    return nn.GroupNorm(min(32, channels), channels)


class ConcatConv2d(nn.Module):
    """2-D convolution of ``[t, z]``: the time is appended as a constant input channel.

    This is the paper's time-dependent layer ``NeuralNet([z, t], θ)`` for images.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, bias: bool = True) -> None:
        super().__init__()
        in_channels = check_size(in_channels, "ConcatConv2d(in_channels)")
        out_channels = check_size(out_channels, "ConcatConv2d(out_channels)")
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, stride, padding,
                              bias=bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(
            x.shape[0], 1, x.shape[2], x.shape[3])
        return self.conv(torch.cat([tt, x], dim=1))


class ConcatLinear(nn.Module):
    """Linear layer of ``[t, z]`` for vector states of shape ``(batch, features)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        in_features = check_size(in_features, "ConcatLinear(in_features)")
        out_features = check_size(out_features, "ConcatLinear(out_features)")
        self.linear = nn.Linear(in_features + 1, out_features, bias=bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(*x.shape[:-1], 1)
        return self.linear(torch.cat([tt, x], dim=-1))


class ConvODEFunc(nn.Module):
    """The ODE-Net dynamics of the paper's MNIST model.

    ``norm -> relu -> ConcatConv2d -> norm -> relu -> ConcatConv2d -> norm``, with the same
    number of channels throughout so that the state keeps its shape.
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = ConcatConv2d(channels, channels, 3, 1, 1)
        self.norm2 = group_norm(channels)
        self.conv2 = ConcatConv2d(channels, channels, 3, 1, 1)
        self.norm3 = group_norm(channels)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(t, torch.relu(self.norm1(x)))
        h = self.conv2(t, torch.relu(self.norm2(h)))
        return self.norm3(h)
