"""Every gradient mode of a solve that is not plain backprop through the solver's operations.

- :mod:`~pydiffbridge.gradients.bridge`: the one bridge ``torch.autograd.Function`` of the
  adjoint method (``gradient="adjoint"``, and ``"checkpointed"``, which re-solves forward from
  saved states); the forward solve and the backward augmented solve ``[z, a, ∂L/∂θ]`` both run
  on a backend, so SciPy and Julia solves are differentiable through it.
- :mod:`~pydiffbridge.gradients.interpolated`: the interpolating adjoint
  (``gradient="interpolated"``): a dense record of the forward states, and a backward solve of
  ``[a, ∂L/∂θ]`` only.
- :mod:`~pydiffbridge.gradients.batched`: per-sample forward stepping (``batch_dims``) plugged
  into the bridge, with one joint backward solve.
- :mod:`~pydiffbridge.gradients.common`: what they share: the augmented state's norm, time
  gradients, the end of ``backward``, event-time gradients, the adjoint's options.

Imports run one way: :mod:`pydiffbridge.api` → here → :mod:`pydiffbridge.backends` →
:mod:`pydiffbridge.solvers` → the core types (solution, errors, tree).
"""

from .batched import bridge_batched
from .bridge import DEFAULT_CHECKPOINTS, bridge_solve
from .interpolated import interp_solve

__all__ = ["DEFAULT_CHECKPOINTS", "bridge_batched", "bridge_solve", "interp_solve"]
