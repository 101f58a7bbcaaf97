"""One object for how a solve is differentiated: :class:`GradientSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _options as O
from .. import _validate as V
from .. import errors as E

__all__ = ["GRADIENTS", "GradientSettings"]

GRADIENTS = ("direct", "adjoint", "checkpointed", "interpolated", "auto")


@dataclass(frozen=True)
class GradientSettings:
    """How :func:`pydiffbridge.solve` computes gradients; pass it as ``solve(...,
    gradient=GradientSettings(...))``.  ``solve``'s ``adjoint_*`` keywords (and torchdiffeq's,
    on ``odeint_adjoint``) are shorthands that build one.

    Args:
        mode: ``"direct"`` (backprop through the solver's operations), ``"adjoint"``,
            ``"checkpointed"``, ``"interpolated"`` or ``"auto"`` (see :func:`~pydiffbridge.solve`).
        rtol, atol: tolerances of the backward solve (default: the forward's).
        method: the backward solve's method (default: the forward's); a stiff one for stiff
            problems.
        options: the backward solve's options (default: the forward's, less ``jump_t``/
            ``step_t``), plus ``"norm"`` (``"seminorm"`` or a callable on torchdiffeq's tuple).
        params: the tensors to differentiate (default: ``func.parameters()`` of an
            ``nn.Module``).
        checkpoints: forward states kept by ``"checkpointed"`` (``options["checkpoints"]``).
    """

    mode: str = "direct"
    rtol: Any = None
    atol: Any = None
    method: str | None = None
    options: dict | None = None
    params: Any = None
    checkpoints: Any = None

    def __post_init__(self) -> None:
        if self.mode not in GRADIENTS:
            raise E.InputError(f"gradient must be one of {GRADIENTS}, got {self.mode!r}")
        for name, v in (("adjoint_rtol", self.rtol), ("adjoint_atol", self.atol)):
            if v is not None:  # checked here even where no adjoint ends up running
                V.check_tolerance(v, name)
        if self.options is not None:
            O.check_option_values(O.check_options_arg(self.options, "adjoint_options"),
                                  "adjoint_options")
        V.check_method_arg(self.method)

    @property
    def adjoint_options(self) -> dict | None:
        """``options`` with ``checkpoints`` merged in (what the backward solve is given)."""
        if self.checkpoints is None:
            return self.options
        return {**(self.options or {}), "checkpoints": self.checkpoints}

    @classmethod
    def of(cls, gradient: Any, **shorthand: Any) -> GradientSettings:
        """``gradient`` (a mode name or settings) with ``solve``'s ``adjoint_*`` shorthands."""
        given = {k: v for k, v in shorthand.items() if v is not None}
        if isinstance(gradient, cls):
            if given:
                raise E.InputError(f"give the gradient settings either as GradientSettings or "
                                   f"as solve's adjoint_* keywords, not both (got "
                                   f"{sorted('adjoint_' + k for k in given)} as well)")
            return gradient
        if not isinstance(gradient, str):
            raise E.InputError(f"gradient must be one of {GRADIENTS} or a GradientSettings, got "
                               f"{type(gradient).__name__}")
        return cls(mode=gradient, **given)
