"""Plumbing shared by the training examples (``odenet_mnist``, ``cnf_2d``, ``latent_ode``,
``fit_parameters``, ``ude``).

Not an example itself (hence the leading underscore): the command-line flags every training
example has, the progress bar, checkpoint/resume, and the multi-process (DDP) setup.

One script serves ``python examples/X.py`` and ``torchrun --nproc_per_node=N examples/X.py``
(see :mod:`pydiffbridge.distributed`): :func:`distributed` initialises the process group from
torchrun's environment (gloo on CPU, nccl on CUDA) and is a no-op otherwise.  Every example
keeps the meaning of ``--batch-size`` as the *global* batch: each step draws the same batch on
every rank (same seeds), each rank takes its share (:func:`shard`), and the loss on a share is
scaled by :func:`loss_scale` so that DDP's average of the ranks' gradients is the gradient of
the loss on the whole batch.  In a single process the share is the whole batch and the scale
exactly 1.0, so results are the same as without any of this.  Rank 0 alone prints, shows the
progress bar and writes files (:func:`log`, :func:`progress`, :func:`save`); every rank reads
a checkpoint on ``--resume`` (:func:`resume`), before the model is wrapped in DDP.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pydiffbridge import distributed as D
from pydiffbridge.backends.base import get_backend
from pydiffbridge.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from pydiffbridge.cli import nonneg_int, output_dir, positive_int
from pydiffbridge.errors import PyDiffBridgeError

RESUME_HELP = ("continue from checkpoints in --out (from the previous one if the latest is "
               "unreadable); also under torchrun, with any number of processes")


# ----------------------------------------------------------------------------- flags
def add_run_args(p: argparse.ArgumentParser, *, save_every: int, unit: str, prev: str,
                 out: str | None, out_help: str | None = None, dest: str = "save_every",
                 zero_ok: bool = False) -> None:
    """``--seed``, ``--save-every``/``--ckpt-every``, ``--resume``, ``--out``,
    ``--no-progress``: the flags of every training example.  The interval is stored as
    ``dest``; with ``zero_ok``, ``0`` means "only at the end"."""
    p.add_argument("--seed", type=nonneg_int, default=0)
    end = "after the last" if unit == "epochs" else "at the end"
    zero = "; 0: only at the end" if zero_ok else ""
    p.add_argument("--save-every", "--ckpt-every", dest=dest,
                   type=nonneg_int if zero_ok else positive_int, default=save_every,
                   metavar="N", help=f"checkpoint every N {unit} and {end} (the one before is "
                   f"kept as {prev}.prev; rank 0 writes them){zero}")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--out", type=output_dir, default=out, help=out_help)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def method_type(backend: str = "torch"):
    """An ``argparse`` type: a method name that ``backend`` knows."""
    def parse(text: str) -> str:
        try:
            get_backend(backend).resolve_method(text)
        except PyDiffBridgeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return parse


# ----------------------------------------------------------------------------- processes
@contextlib.contextmanager
def distributed(device: str | torch.device | None = None) -> Iterator[D.DistInfo]:
    """The process group for the body (from torchrun's environment; none for a plain
    ``python`` run), destroyed afterwards."""
    info = D.init_from_env(device=device)
    try:
        yield info
        if D.is_distributed():
            # leave together: rank 0 evaluates and writes alone at the end, and a gloo group
            # torn down while a peer is still connected can abort that peer at exit
            D.barrier()
    finally:
        D.cleanup(info)


def is_main() -> bool:
    return D.is_main_process()


def log(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if D.is_main_process():
        print(*args, **kwargs)


def progress(iterable: Iterable, desc: str, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on rank 0 (none on the other ranks, or with ``disable``)."""
    return tqdm(iterable, desc=desc, disable=disable or not D.is_main_process(), **kwargs)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (a download into a shared folder), then the others."""
    if not D.is_main_process():
        D.barrier()
    try:
        yield
    finally:
        if D.is_main_process():
            D.barrier()


def shard(n: int) -> list[int]:
    """This rank's rows ``rank, rank + W, ...`` of a global batch of ``n`` rows."""
    if n < D.get_world_size():
        raise SystemExit(f"a batch of {n} cannot be shared by {D.get_world_size()} processes: "
                         "use a larger batch (or training set) or fewer processes")
    return D.shard_indices(n)


def loss_scale(local: float, global_: float) -> float:
    """Factor for a loss *averaged* over this rank's ``local`` items (rows, observed
    entries) so that DDP's mean over ranks of the scaled losses' gradients is the gradient of
    the average over all ``global_`` items: ``local * W / global_`` (exactly 1.0 in a
    single process, and with equal shares)."""
    return float(local) * D.get_world_size() / float(global_)


def decorrelate_rng(seed: int, step: int = 0) -> None:
    """Give ranks > 0 their own stream of the global torch RNG (noise draws inside models:
    Hutchinson probes, reparameterisation); rank 0 keeps its stream, so a single process is
    unaffected.  Every rank starts from the same seed, so without this every rank would draw
    the same noise for its different rows."""
    rank = D.get_rank()
    if rank > 0:
        torch.manual_seed(int(seed) * 1_000_003 + 7_919 * rank + int(step) + 1)


def step_stats(values: Mapping[str, float], nfe: Mapping[str, float] | None = None
               ) -> dict[str, float]:
    """One training step's numbers, the same on every rank: means over ranks of ``values``
    (the scaled losses' mean is the global loss) and of ``nfe``, plus, with several ranks,
    the maxima of ``nfe`` as ``<key>_max`` (the slowest rank sets the step time).  In a
    single process the numbers themselves, unchanged."""
    nfe = dict(nfe or {})
    merged = {**values, **nfe}
    if not D.is_distributed():
        return merged
    keys = list(merged)
    out = dict(zip(keys, D.reduce_across_ranks([merged[k] for k in keys], "mean"),
                   strict=True))
    if nfe:
        mx = D.reduce_across_ranks(list(nfe.values()), "max")
        out.update({f"{k}_max": v for k, v in zip(nfe, mx, strict=True)})
    return out


# ----------------------------------------------------------------------------- checkpoints
def resume(path: Path, enabled: bool, map_location: Any = None) -> tuple[Any, Path | None]:
    """``(checkpoint, the file it came from)`` when ``enabled`` and one exists, else
    ``(None, None)``.  Every rank reads the file (rank 0 wrote it); call it before the model
    is wrapped in DDP, whose construction is a collective, so that rank 0 cannot overwrite
    the file before the others have read it."""
    if not enabled:
        return None, None
    return load_checkpoint(path, map_location=map_location, missing_ok=True, return_path=True)


def save(obj: Any, path: Path) -> None:
    """Atomic checkpoint (:func:`pydiffbridge.checkpoint.save_checkpoint`), by rank 0 only."""
    if D.is_main_process():
        save_checkpoint(obj, path)


def write_report(out: Path, results: Any, lines: list[str], **json_kwargs: Any) -> None:
    """``out/results.json`` (strict JSON, :func:`~pydiffbridge.checkpoint.write_json_atomic`
    with ``json_kwargs``) and ``out/results.md`` (the Markdown ``lines``), both atomic."""
    write_json_atomic(results, out / "results.json", **json_kwargs)
    write_text_atomic("\n".join(lines) + "\n", out / "results.md")


def make_out(path: str | Path) -> Path:
    """``--out`` as a Path, created by rank 0."""
    out = Path(path)
    if D.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    return out


class Objective(nn.Module):
    """``forward(*a, **kw)`` = ``model.<method>(*a, **kw)``: lets DDP wrap a model whose
    training loss is not its ``forward`` (``CNF.log_prob``, ``LatentODE.loss``), so that a
    step is one DDP forward and one backward."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method)(*args, **kwargs)


def wrap(model: nn.Module, method: str | None = None, device: torch.device | None = None,
         **ddp_kwargs: Any) -> nn.Module:
    """``model`` (or its ``method`` as :class:`Objective`) in DDP with several processes; in
    a single process ``model`` itself (its ``method`` is then called directly)."""
    if not D.is_distributed():
        return getattr(model, method) if method else model
    return D.wrap_ddp(Objective(model, method) if method else model, device, **ddp_kwargs)
