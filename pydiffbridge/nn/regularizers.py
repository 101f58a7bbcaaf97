"""Regularisers for continuous normalizing flows, as extra integrated channels.

From "How to train your neural ODE" (Finlay et al., 2020): penalising the kinetic energy
``∫‖f(t, z)‖² dt`` and the Jacobian Frobenius norm ``∫‖∂f/∂z‖_F² dt`` along the trajectory
makes the learned dynamics straighter and smoother, so adaptive solvers need fewer
function evaluations at equal likelihood.

Each regulariser is a small frozen object with a ``name``, a ``weight`` and a ``rate``
method giving the per-sample integrand; :class:`pydiffbridge.nn.cnf.CNF` integrates every
rate as one more channel of its augmented state and reports the integrals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import InputError
from ._checks import check_nonneg

__all__ = [
    "RateContext",
    "Regularizer",
    "KineticEnergy",
    "JacobianFrobenius",
    "RegularizerSpec",
    "parse_regularizers",
    "regularization_loss",
]


class RateContext:
    """What a regulariser's rate may look at, computed lazily at one evaluation.

    Attributes:
        t: the current time (0-d tensor).
        z: the state, shape ``[batch, D]``.
        dz: ``f(t, z)``, shape ``[batch, D]``.
    """

    def __init__(
        self,
        t: torch.Tensor,
        z: torch.Tensor,
        dz: torch.Tensor,
        noise_vjp: Callable[[], torch.Tensor],
        jacobian_rows: torch.Tensor | None = None,
    ) -> None:
        self.t = t
        self.z = z
        self.dz = dz
        self._noise_vjp = noise_vjp
        self._noise_vjp_value: torch.Tensor | None = None
        self.jacobian_rows = jacobian_rows

    def noise_vjp(self) -> torch.Tensor:
        """``εᵀ ∂f/∂z`` for the solve's fixed noise ``ε``, shape ``[batch, D]`` (cached)."""
        if self._noise_vjp_value is None:
            self._noise_vjp_value = self._noise_vjp()
        return self._noise_vjp_value


@dataclass(frozen=True)
class Regularizer:
    """Base class: a weighted integral ``weight · mean_batch ∫ rate dt``.

    Subclasses override :meth:`rate`, returning one value per sample (shape ``[batch]``).
    """

    weight: float = 1.0
    name: str = "regularizer"

    def __post_init__(self) -> None:
        check_nonneg(self.weight, f"{type(self).__name__}(weight)")
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"{type(self).__name__}(name={self.name!r}): need a non-empty "
                             "string (the name of its integrated channel).")

    def rate(self, ctx: RateContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def needs_noise(self) -> bool:
        """Whether the rate uses the Hutchinson noise (CNF then draws it even for exact trace)."""
        return False


@dataclass(frozen=True)
class KineticEnergy(Regularizer):
    """Kinetic energy: rate ``‖f(t, z)‖²`` per sample."""

    name: str = "kinetic"

    def rate(self, ctx: RateContext) -> torch.Tensor:
        return ctx.dz.pow(2).sum(dim=1)


@dataclass(frozen=True)
class JacobianFrobenius(Regularizer):
    """Squared Frobenius norm of ``∂f/∂z``: rate ``‖εᵀ ∂f/∂z‖²`` (Hutchinson, unbiased for
    ``E[εεᵀ] = I``), or the exact ``Σ_ij J_ij²`` when the CNF computes the full Jacobian
    anyway (``trace="exact"``)."""

    name: str = "jacobian"

    def rate(self, ctx: RateContext) -> torch.Tensor:
        if ctx.jacobian_rows is not None:
            return ctx.jacobian_rows.pow(2).sum(dim=(1, 2))
        return ctx.noise_vjp().pow(2).sum(dim=1)

    @property
    def needs_noise(self) -> bool:
        return True


_BY_NAME: dict[str, type[Regularizer]] = {
    "kinetic": KineticEnergy,
    "kinetic_energy": KineticEnergy,
    "jacobian": JacobianFrobenius,
    "jacobian_frobenius": JacobianFrobenius,
    "frobenius": JacobianFrobenius,
}

RegularizerSpec = Mapping[str, float] | Iterable[Regularizer] | None


def parse_regularizers(spec: RegularizerSpec) -> tuple[Regularizer, ...]:
    """Normalise a regulariser specification.

    Accepts ``None``, a mapping ``{"kinetic": 0.01, "jacobian": 0.01}`` (names:
    ``kinetic``, ``jacobian``; zero weights are dropped), or an iterable of
    :class:`Regularizer` instances.
    """
    if spec is None:
        return ()
    out: list[Regularizer] = []
    if isinstance(spec, Mapping):
        for key, weight in spec.items():
            cls = _BY_NAME.get(str(key).lower())
            if cls is None:
                raise InputError(
                    f"regularizers: unknown name {key!r}; known names are "
                    f"{sorted(set(_BY_NAME))}. Pass e.g. {{'kinetic': 0.01}}."
                )
            w = float(weight)
            if not (w >= 0.0) or w == float("inf"):
                raise InputError(
                    f"regularizers[{key!r}]: weight must be a finite number >= 0, got {weight!r}."
                )
            if w > 0.0:
                out.append(cls(weight=w))
    else:
        for item in spec:
            if not isinstance(item, Regularizer):
                raise InputError(
                    f"regularizers: expected Regularizer instances (KineticEnergy, "
                    f"JacobianFrobenius) or a dict of weights, got {type(item).__name__}."
                )
            out.append(item)
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise InputError(f"regularizers: duplicate names {names}; give each channel once.")
    return tuple(out)


def regularization_loss(
    values: Mapping[str, torch.Tensor], regularizers: Iterable[Regularizer]
) -> torch.Tensor | float:
    """``Σ weight · mean(value)`` over the regularisers, for integrals ``values[name]``
    of shape ``[batch]``. Returns ``0.0`` when there are none."""
    total: torch.Tensor | float = 0.0
    for reg in regularizers:
        total = total + reg.weight * values[reg.name].mean()
    return total
