"""FFJORD-style time-dependent vector fields for continuous normalizing flows
(Grathwohl et al. 2018): :class:`ConcatSquashLinear` layers stacked into
:class:`ConcatSquashMLP`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import InputError
from ._checks import check_size

__all__ = ["ConcatSquashLinear", "ConcatSquashMLP"]


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-gated linear layer: ``(W x + b) · σ(g t + c) + h t``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        dim_in = check_size(dim_in, "ConcatSquashLinear(dim_in)")
        dim_out = check_size(dim_out, "ConcatSquashLinear(dim_out)")
        self.linear = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1, dim_out)
        self.shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "swish": nn.SiLU,
}


class ConcatSquashMLP(nn.Module):
    """An FFJORD-style vector field ``f(t, z)``: a stack of :class:`ConcatSquashLinear`
    layers (time-dependent gating) with smooth activations.

    Args:
        dim: state dimension ``D``.
        hidden: widths of the hidden layers.
        activation: ``"tanh"`` (default), ``"softplus"``, ``"elu"`` or ``"swish"``; use a
            smooth one, the trace's parameter gradient needs second derivatives.
    """

    def __init__(
        self, dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh"
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise InputError(
                f"ConcatSquashMLP(activation={activation!r}): unknown; use one of "
                f"{sorted(_ACTIVATIONS)}."
            )
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise InputError(f"ConcatSquashMLP(hidden={hidden!r}): expected a sequence of "
                             "layer widths, e.g. (64, 64, 64).")
        self.dim = check_size(dim, "ConcatSquashMLP(dim)")
        widths = [self.dim, *(check_size(h, f"ConcatSquashMLP(hidden[{i}])")
                              for i, h in enumerate(hidden)), self.dim]
        self.layers = nn.ModuleList(
            ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.acts = nn.ModuleList(_ACTIVATIONS[activation]() for _ in widths[1:-1])

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h
