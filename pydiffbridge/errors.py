"""One exception hierarchy for the whole library.

Every error a user can trigger inherits :class:`PyDiffBridgeError`.  Where a built-in
exception type is the natural expectation (``ValueError`` for bad input, ``ImportError`` for
a missing optional dependency, ``RuntimeError`` for a solver failure) the class inherits it
too, so ``except ValueError`` keeps working.  Where torchdiffeq raises something else for the
same failure (an ``AssertionError`` for too many steps, a step-size underflow, a non-finite
state or non-monotonic times; a ``TypeError`` for a non-floating ``y0`` or ``t``) the class
inherits that as well, so code written against torchdiffeq catches our errors unchanged.

Messages follow one pattern: what was wrong, where (argument, time ``t``, step size ``dt``,
step count, batch sample), and what to try.
"""

from __future__ import annotations

import torch

__all__ = [
    "PyDiffBridgeError",
    "InputError",
    "TimeGridError",
    "DTypeError",
    "UnknownMethodError",
    "UnknownOptionError",
    "UnknownBackendError",
    "RHSError",
    "NonFiniteError",
    "SolverError",
    "StepSizeUnderflowError",
    "MaxStepsExceededError",
    "SolverMemoryError",
    "BackendUnavailableError",
    "JuliaUnavailableError",
    "GradientWarning",
    "UnknownOptionWarning",
]


class PyDiffBridgeError(Exception):
    """Base class of every exception raised by pydiffbridge."""


class InputError(PyDiffBridgeError, ValueError):
    """An argument has a wrong value, shape, dtype or device."""


class TimeGridError(InputError, AssertionError):
    """The output times ``t`` are not a 1-D strictly monotonic, finite tensor."""


class DTypeError(InputError, TypeError):
    """A tensor has a dtype the solve cannot use (e.g. an integer ``y0`` or ``t``)."""


class UnknownMethodError(InputError):
    """The requested method is not known to the chosen backend."""


class UnknownOptionError(InputError):
    """An entry of ``options`` is not understood by the chosen method."""


class UnknownBackendError(InputError):
    """The requested backend is not registered."""


class RHSError(PyDiffBridgeError, TypeError):
    """The user's right-hand side ``func(t, y)`` returned something unusable
    (wrong type, shape, dtype or device)."""


class NonFiniteError(PyDiffBridgeError, FloatingPointError, AssertionError):
    """NaN or Inf appeared in the initial state or in the solution."""


class SolverError(PyDiffBridgeError, RuntimeError):
    """The integration could not be completed."""


class StepSizeUnderflowError(SolverError, AssertionError):
    """The adaptive step size fell below the smallest usable value."""


class MaxStepsExceededError(SolverError, AssertionError):
    """More than ``max_num_steps`` steps were needed."""


_OOM_BASES: tuple[type, ...] = (MemoryError,)
if isinstance(getattr(torch, "OutOfMemoryError", None), type):
    _OOM_BASES = (MemoryError, torch.OutOfMemoryError)


class SolverMemoryError(SolverError, *_OOM_BASES):
    """The solve ran out of memory (host or device).  Also a ``MemoryError`` and a
    ``torch.OutOfMemoryError``, so existing ``except`` clauses keep working."""


class BackendUnavailableError(PyDiffBridgeError, ImportError):
    """A backend's optional dependency is missing or could not start."""


class JuliaUnavailableError(BackendUnavailableError):
    """Julia (via juliacall) is not installed or could not be started/installed."""


class GradientWarning(UserWarning):
    """Gradients will not reach some tensors the user may expect them to reach."""


class UnknownOptionWarning(UserWarning):
    """``odeint``/``odeint_adjoint`` ignored an option the method does not know (torchdiffeq
    warns and goes on; :func:`~pydiffbridge.solve` raises :class:`UnknownOptionError`).  Make it
    an error with ``warnings.simplefilter("error", UnknownOptionWarning)``."""
