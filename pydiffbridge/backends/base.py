"""The backend protocol, the registry and the method-name map shared by all engines.

A backend has one job: integrate a right-hand side ``func(t, y)`` on a *flat* state ``y0`` of
shape ``(n,)`` and return a :class:`~pydiffbridge.solution.Solution` whose ``ys`` has shape
``(len(t), n)``, with stats and a status.  Shapes, tuple states, input checks and gradients
live in the API and the adjoint bridge, once for every engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import UnknownBackendError
from ..solution import Solution

__all__ = ["SolveSpec", "Backend", "register", "get_backend", "available_backends",
           "BACKEND_NAMES"]


@dataclass(frozen=True)
class SolveSpec:
    """Everything but the tensors: the method, tolerances, options and the error norm.

    ``rtol``/``atol`` are floats or flat tensors of the state's size; ``norm`` maps a flat
    tensor to a scalar.
    """

    method: str
    rtol: Any = 1e-7
    atol: Any = 1e-9
    options: Mapping[str, Any] = field(default_factory=dict)
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None


@runtime_checkable
class Backend(Protocol):
    name: str
    #: whether gradients can flow through ``solve`` by ordinary autograd (direct backprop)
    supports_direct_grad: bool

    def methods(self) -> list[str]: ...

    def resolve_method(self, method: str | None) -> str: ...

    def solve(self, func: Callable, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec,
              event_fn: Callable | None = None) -> Solution: ...


# name -> "module:attribute" of a zero-argument factory, imported on first use so that an
# optional engine costs nothing until it is asked for.
_FACTORIES: dict[str, str] = {
    "torch": "pydiffbridge.backends.torch:TorchBackend",
    "scipy": "pydiffbridge.backends.scipy:ScipyBackend",
    "julia": "pydiffbridge.backends.julia:JuliaBackend",
}
BACKEND_NAMES = tuple(_FACTORIES)
_INSTANCES: dict[str, Backend] = {}


def register(name: str, factory: str | Callable[[], Backend]) -> None:
    """Register a backend under ``name`` (a factory or a ``"module:attr"`` path)."""
    _INSTANCES.pop(name, None)
    _FACTORIES[name] = factory  # type: ignore[assignment]


def get_backend(name: str | Backend) -> Backend:
    if not isinstance(name, str):
        return name
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name not in _FACTORIES:
        raise UnknownBackendError(
            f"unknown backend {name!r}; available: {', '.join(sorted(_FACTORIES))}")
    factory = _FACTORIES[name]
    if isinstance(factory, str):
        mod, attr = factory.split(":")
        factory = getattr(importlib.import_module(mod), attr)
    inst = factory()
    _INSTANCES[name] = inst
    return inst


def available_backends() -> dict[str, str]:
    """``{name: ""}`` for usable backends and ``{name: reason}`` for the others (cheap: does
    not start external runtimes)."""
    out = {}
    for name in _FACTORIES:
        try:
            b = get_backend(name)
            check = getattr(b, "availability", None)
            out[name] = check() if check else ""
        except Exception as exc:  # noqa: BLE001 - report, never raise
            out[name] = f"{type(exc).__name__}: {exc}"
    return out
