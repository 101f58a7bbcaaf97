"""Results of a solve: :class:`Solution`, :class:`Stats` and :class:`Status`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = ["Status", "Stats", "Solution"]


class Status(enum.IntEnum):
    """Why a solve stopped.  Only ``SUCCESS`` and ``EVENT`` mean the result is complete."""

    SUCCESS = 0
    EVENT = 1
    MAX_STEPS = 2
    STEP_UNDERFLOW = 3
    NONFINITE = 4
    FAILED = 5

    @property
    def ok(self) -> bool:
        return self in (Status.SUCCESS, Status.EVENT)

    def __str__(self) -> str:
        return self.name


@dataclass
class Stats:
    """Work done by a solve.

    ``nfe`` counts evaluations of the user's right-hand side in the forward solve, ``steps``
    the attempted steps (``accepted + rejected``).  The ``*_backward`` fields count the work
    of the adjoint (or checkpointed) backward pass; they stay 0 until ``backward`` runs.
    For per-sample (batched) stepping the fields are integer tensors of shape ``[batch]``.
    ``switches`` counts the switches between the explicit and the stiff method of
    ``method="auto"`` (0 for every other method).
    """

    nfe: Any = 0
    steps: Any = 0
    accepted: Any = 0
    rejected: Any = 0
    nfe_backward: Any = 0
    steps_backward: Any = 0
    switches: Any = 0

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, torch.Tensor) else int(v)
        return out

    def __iadd__(self, other: Stats) -> Stats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass
class Solution:
    """The outcome of :func:`pydiffbridge.solve`.

    Attributes:
        ys: states at ``ts`` stacked on a new first dimension (a tuple for tuple states).
            When the solve stopped early (non-success status), rows for times never reached
            are NaN.
        ts: the output times.
        stats: :class:`Stats`.
        status: :class:`Status` (a tensor of ``Status`` codes for per-sample stepping).
        message: human-readable reason for a non-success status ('' on success).
        event_t: time of the terminal event (only for solves with ``event_fn``).
        backend, method: what actually ran.
    """

    ys: Any
    ts: torch.Tensor
    stats: Stats = field(default_factory=Stats)
    status: Any = Status.SUCCESS
    message: str = ""
    event_t: torch.Tensor | None = None
    backend: str = "torch"
    method: str = ""

    @property
    def success(self) -> bool:
        if isinstance(self.status, torch.Tensor):
            return bool(((self.status == Status.SUCCESS) | (self.status == Status.EVENT)).all())
        return Status(self.status).ok
