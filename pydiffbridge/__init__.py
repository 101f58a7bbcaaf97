"""pydiffbridge: neural differential equations for PyTorch.

Native torch solvers, O(1)-memory adjoint gradients through one bridge autograd.Function, and
interchangeable engines (torch, SciPy, DifferentialEquations.jl) behind one API.  This module
only re-exports; it never imports juliacall.
"""

from . import errors
from .api import odeint, odeint_adjoint, odeint_event, solve
from .dense import odeint_dense
from .ensemble import solve_ensemble
from .errors import *  # noqa: F403
from .gradients.settings import GradientSettings
from .solution import Solution, Stats, Status
from .solvers.hooks import Perturb

__version__ = "0.1.0"

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "solve",
           "solve_ensemble", "GradientSettings", "Solution", "Stats", "Status", "Perturb",
           "errors", "__version__", *errors.__all__]
