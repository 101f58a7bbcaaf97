"""pydiffbridge: neural differential equations for PyTorch.

Native torch solvers, O(1)-memory adjoint gradients through one bridge autograd.Function, and
interchangeable engines (torch, SciPy, DifferentialEquations.jl) behind one API.  This module
only re-exports; it never imports juliacall.
"""

from . import errors
from .api import odeint, odeint_adjoint, odeint_event, solve
from .ensemble import solve_ensemble
from .errors import *  # noqa: F403
from .solution import Solution, Stats, Status

__version__ = "0.1.0"

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "solve", "solve_ensemble",
           "Solution", "Stats", "Status",
           "errors", "__version__", *errors.__all__]
