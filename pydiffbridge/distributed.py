"""Multi-process training of ODE models with ``torch.distributed`` (DDP).

Why DDP works with the adjoint
------------------------------
The adjoint bridge (:mod:`pydiffbridge.gradients.bridge`) is one ``torch.autograd.Function``
whose inputs
include the parameters to differentiate (``adjoint_params``, by default the parameters of the
``func`` module).  Its ``backward`` returns ``dL/dθ`` as the gradients of those inputs, so
autograd accumulates them into ``θ.grad`` through the parameters' ordinary ``AccumulateGrad``
nodes, which is exactly where DistributedDataParallel's reducer hooks sit.  DDP therefore
all-reduces (averages) adjoint gradients like any other gradient; nothing adjoint-specific is
needed (tested in ``tests/test_ddp.py`` with ``odeint_adjoint`` and with :class:`ODEBlock`).

The pattern
-----------
Wrap the *model* in DDP, and let the model call the solver with the *inner* ODE function::

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.func = ODEFunc()                       # a plain nn.Module
        def forward(self, y0, t):
            return odeint_adjoint(self.func, y0, t)     # not the DDP wrapper

    model = wrap_ddp(Model())                           # DDP(Model()) when WORLD_SIZE > 1
    loss = model(y0, t)...; loss.backward()             # one DDP forward, one backward

(:class:`~pydiffbridge.nn.ODEBlock` inside a DDP-wrapped network is this pattern already: the
block passes its own counter-wrapped ``func`` to ``odeint_adjoint``.)

Do **not** pass the DDP wrapper itself as ``func`` (``odeint_adjoint(ddp_model, ...)``).  The
solver calls ``func`` once per right-hand-side evaluation, so ``DDP.forward`` would run
hundreds of times per iteration, including inside the adjoint's backward solve, where each
call re-arms the reducer (``prepare_for_backward``) in the middle of a backward pass and, for
modules with buffers (BatchNorm's running statistics, ...), broadcasts them once per
evaluation: a collective whose count is the rank's NFE, which differs between ranks with an
adaptive solver on different data, so the ranks can deadlock.  It happens to give correct
gradients for buffer-free modules today, but relies on DDP internals.  ``odeint_adjoint``'s
parameters are the same tensors either way (``ddp.parameters()`` are the inner module's), so
the pattern above loses nothing.  :func:`unwrap` returns the inner module of a DDP/DataParallel
wrapper; :func:`check_func` warns about the wrong pattern.

Launching
---------
``torchrun --nproc_per_node=N script.py ...`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` initialises the process group from
them when ``WORLD_SIZE > 1`` (gloo on CPU, nccl when CUDA is available) and is a no-op for a
plain ``python script.py`` run, so one script serves both.  Shard the data by rank
(:func:`shard_indices`, or ``torch.utils.data.DistributedSampler``), and let rank 0 alone write
outputs (:func:`is_main_process`).

Statistics
----------
:func:`aggregate_nfe` all-reduces the function-evaluation counts of every rank (forward and
backward; sum, mean, max and min over ranks), since with an adaptive solver each rank's solve
takes its own number of steps.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "init_from_env",
    "cleanup",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "shard_indices",
    "global_count",
    "mean_across_ranks",
    "reduce_across_ranks",
    "barrier",
    "wrap_ddp",
    "unwrap",
    "check_func",
    "aggregate_nfe",
    "nfe_of",
]


@dataclass(frozen=True)
class DistInfo:
    """What :func:`init_from_env` set up."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(backend: str | None = None, device: str | torch.device | None = None,
                  timeout_s: float = 300.0) -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment variables.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised and rank 0 of 1 is returned.  With
    ``WORLD_SIZE > 1`` the process group is created with ``init_method="env://"`` and
    ``backend`` (default: ``"nccl"`` if CUDA is available and ``device`` is not CPU, else
    ``"gloo"``); on CUDA the process uses GPU ``LOCAL_RANK``.  If a process group exists
    already, it is used as it is.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or None for the default above.
        device: ``"cpu"``, ``"cuda"`` or None (CUDA if available).
        timeout_s: collective timeout of the process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = (torch.cuda.is_available() if device is None
                 else torch.device(device).type == "cuda")
    if want_cuda:
        if world > 1:
            torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev,
                        dist.get_backend(), False)
    if world <= 1:
        return DistInfo(0, 1, local_rank, dev, None, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                           "`torchrun --nproc_per_node=N script.py ...`")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    dist.init_process_group(backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, True)


def cleanup(info: DistInfo | None = None) -> None:
    """Destroy the process group if :func:`init_from_env` created it (or, with no ``info``,
    if one exists)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if info is None or info.initialized_here:
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that prints and writes outputs."""
    return get_rank() == 0


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Indices ``rank, rank + W, rank + 2W, ...`` of ``n`` items: this rank's share.

    Shards differ in size by at most one; every item belongs to exactly one rank.  (With
    ``torch.utils.data`` use ``DistributedSampler`` instead; it pads to equal shard sizes.)
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(range(rank, n, world_size))


def _device_for_collectives() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_count(local: float | int) -> float:
    """Sum of ``local`` over ranks (``local`` itself in a single process).

    DDP averages gradients over ranks.  For the exact gradient of a loss averaged over *all*
    observations when shards differ in size, make each rank's loss
    ``local_sum * world_size / global_count(local_n)``: the DDP average of the ranks'
    gradients is then the gradient of ``global_sum / global_n``.
    """
    if not is_distributed():
        return float(local)
    v = torch.tensor([float(local)], dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return float(v.item())


def mean_across_ranks(x: torch.Tensor | float) -> float:
    """The mean over ranks of a scalar (``x`` itself in a single process), as a float.

    With the scaling of :func:`global_count` the mean of the ranks' losses is the global loss;
    an optimizer that uses loss values (LBFGS's line search, early stopping) must see this
    global value so that every rank takes the same decisions.
    """
    val = float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
    if not is_distributed():
        return val
    v = torch.tensor([val], dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return float(v.item()) / dist.get_world_size()


def reduce_across_ranks(values: Sequence[float], op: str = "sum") -> list[float]:
    """Element-wise ``"sum"``, ``"mean"``, ``"max"`` or ``"min"`` over ranks of a few numbers,
    in one collective (every rank must call it with as many values); in a single process the
    values themselves (as floats).  E.g. one call per training step for the step's loss and
    NFE counts, so that every rank logs (and checkpoints) the same global statistics.
    """
    ops = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}
    if op not in ops:
        raise ValueError(f"reduce_across_ranks(op={op!r}): use one of {sorted(ops)}")
    vals = [float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in values]
    if not is_distributed() or not vals:
        return vals
    v = torch.tensor(vals, dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(v, op=getattr(dist.ReduceOp, ops[op]))
    out = [float(x) for x in v.cpu()]
    return [x / dist.get_world_size() for x in out] if op == "mean" else out


def barrier() -> None:
    """Wait for every rank (nothing in a single process), e.g. after rank 0 alone downloaded
    a data set that the others then read."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def wrap_ddp(model: nn.Module, device: torch.device | None = None, **ddp_kwargs: Any
             ) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` unchanged.

    On CUDA ``device_ids=[device]`` is passed (the module must already be on ``device``); on
    CPU none.  Extra keyword arguments go to DDP.  Wrap the whole model, not the ODE function
    that the solver calls (see the module docstring).
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device is not None and torch.device(device).type == "cuda":
        ddp_kwargs.setdefault("device_ids", [torch.device(device)])
    return DDP(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP or DataParallel wrapper (``model`` itself otherwise): the one
    to save with ``state_dict()`` and to pass as ``func`` to the solver."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def check_func(func: Any) -> Any:
    """Warn if ``func`` (about to be handed to a solver) is a DDP wrapper; return the module
    to use instead (its inner module) so that callers can write
    ``odeint_adjoint(check_func(f), ...)``."""
    inner = unwrap(func) if isinstance(func, nn.Module) else func
    if inner is not func:
        warnings.warn(
            "a DistributedDataParallel wrapper is used as the ODE right-hand side: DDP.forward "
            "would run once per function evaluation (also inside the adjoint's backward solve); "
            "wrap the model that calls the solver in DDP and pass the inner module as func. "
            "Using the inner module.", stacklevel=2)
    return inner


def nfe_of(model: nn.Module) -> tuple[int, int]:
    """``(forward, backward)`` function evaluations counted by every
    :class:`~pydiffbridge.nn.NFECounter` inside ``model`` (its ODE blocks), summed."""
    from .nn.odeblock import NFECounter

    fwd = bwd = 0
    for m in unwrap(model).modules():
        if isinstance(m, NFECounter):
            fwd += int(m.nfe_forward)
            bwd += int(m.nfe_backward)
    return fwd, bwd


def aggregate_nfe(nfe_forward: float | int | nn.Module | Sequence[float] = 0,
                  nfe_backward: float | int | Sequence[float] = 0) -> dict[str, Any]:
    """NFE statistics over all ranks (a collective: every rank must call it).

    Args:
        nfe_forward: this rank's forward evaluations (a number, or a sequence such as one
            count per iteration, which is summed), or a model whose
            :class:`~pydiffbridge.nn.NFECounter` s are read with :func:`nfe_of` (then
            ``nfe_backward`` is taken from it too).
        nfe_backward: this rank's backward (adjoint) evaluations.

    Returns:
        ``{"world_size": W, "forward": {"sum", "mean", "max", "min"}, "backward": {...},
        "total": {...}}`` with ``total = forward + backward`` per rank; identical on every
        rank.  In a single process every statistic is the rank's own count.
    """
    if isinstance(nfe_forward, nn.Module):
        nfe_forward, nfe_backward = nfe_of(nfe_forward)

    def num(v: Any) -> float:
        if isinstance(v, torch.Tensor):
            return float(v.detach().sum())
        if isinstance(v, Iterable):
            return float(sum(float(x) for x in v))
        return float(v)

    f, b = num(nfe_forward), num(nfe_backward)
    local = torch.tensor([f, b, f + b], dtype=torch.float64, device=_device_for_collectives())
    world = get_world_size()
    if is_distributed():
        s, mx, mn = local.clone(), local.clone(), local.clone()
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        dist.all_reduce(mn, op=dist.ReduceOp.MIN)
    else:
        s = mx = mn = local
    out: dict[str, Any] = {"world_size": world}
    for i, key in enumerate(("forward", "backward", "total")):
        out[key] = {"sum": float(s[i]), "mean": float(s[i]) / world, "max": float(mx[i]),
                    "min": float(mn[i])}
    return out
