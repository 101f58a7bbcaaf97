"""Resources: running out of memory becomes :class:`~pydiffbridge.errors.SolverMemoryError`
with the sizes asked for (:func:`memory_guard`), and a state without elements is solved at once
(:func:`empty_solution`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from . import errors as E
from .solution import Solution, Stats, Status

__all__ = ["memory_guard", "empty_solution"]

SolverMemoryError = E.SolverMemoryError


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:.3g} MiB"


_OOM_TEXT = ("out of memory", "not enough memory", "can't allocate memory",
             "cannot allocate memory", "failed to allocate", "unable to allocate")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, E.PyDiffBridgeError):
        return False
    if isinstance(exc, E._OOM_BASES):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _OOM_TEXT)


@contextlib.contextmanager
def memory_guard(shape, dtype: torch.dtype, n_times: int, device, batch: int | None = None
                 ) -> Iterator[None]:
    """Re-raise running out of memory inside the block as :class:`SolverMemoryError` with the
    size asked for and what to try.  ``shape``: the state's shape (or a list of shapes)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        shapes = shape if isinstance(shape, list) else [shape]
        numel = sum(math.prod(s) for s in shapes)
        item = torch.empty((), dtype=dtype).element_size()
        state = " + ".join(str(tuple(s)) for s in shapes)
        per = f" ({batch} samples)" if batch is not None else ""
        raise SolverMemoryError(
            f"out of memory on {device} solving a state of {numel:,} elements{per}, shape "
            f"{state}, {dtype}: {_gib(numel * item)} per copy of the state, "
            f"{_gib(numel * item * n_times)} for the {n_times} output times alone, and each "
            "step holds one copy per stage (more with autograd). Try a smaller batch (split "
            "y0 along its batch dimension), float32, fewer output times, gradient='adjoint' "
            f"(memory independent of the step count), or a device with more memory [{exc}]"
        ) from exc


# -- empty states -------------------------------------------------------------------------
def empty_solution(y0_flat: torch.Tensor, t: torch.Tensor, also=(), n_times: int | None = None
                   ) -> Solution:
    """The solution of a state without elements: nothing to integrate, so no step and no
    evaluation.  ``ys`` has shape ``(n_times, 0)`` (default ``len(t)``; the caller restores the
    state's shape) and stays connected to ``y0`` (and to the tensors in ``also``: ``t``,
    parameters) so that backward gives them zero gradients."""
    ys = y0_flat.reshape(1, 0).expand(t.shape[0] if n_times is None else n_times, 0)
    for x in also:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            ys = ys + x.reshape(-1)[:0].sum().to(ys.dtype)
    return Solution(ys=ys, ts=t, stats=Stats(), status=Status.SUCCESS)
