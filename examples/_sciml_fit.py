"""Plumbing of the scientific-ML examples (``fit_parameters``, ``ude``).

Not an example itself (hence the leading underscore).  Both examples fit an ODE model to
:class:`~pydiffbridge.fit.Observations` with :func:`pydiffbridge.fit.fit`; this module holds
what they share on top of :mod:`_common`: the command line (solver, data and optimiser flags
plus :func:`_common.add_run_args`), the fail-fast backend check with its report, the
checkpoint's settings key, the series shard, the record of one fit and the loss figure.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as C
import torch

from pydiffbridge import distributed as D
from pydiffbridge.errors import BackendUnavailableError
from pydiffbridge.fit import FitConfig, FitState


# ----------------------------------------------------------------------------- flags
def make_parser(doc: str, *, out: str, rtol: float, atol: float, series: int, times: int,
                keep: float, noise: float, adam_iters: int, lr: float, lbfgs_iters: int,
                patience: int, patience_help: str = ""
                ) -> tuple[argparse.ArgumentParser, Any, Any]:
    """The parser with the flags both examples have, and its ``data`` and ``fitting`` groups
    for the example's own flags."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s = p.add_argument_group("solver")
    s.add_argument("--backend", choices=["torch", "scipy", "julia"], default="torch")
    s.add_argument("--method", default="dopri5", help="solver (the backend maps the name)")
    s.add_argument("--gradient", choices=["adjoint", "direct"], default="adjoint",
                   help="direct needs --backend torch")
    s.add_argument("--rtol", type=float, default=rtol)
    s.add_argument("--atol", type=float, default=atol)
    d = p.add_argument_group("data")
    d.add_argument("--series", type=int, default=series, help="trajectories (initial states)")
    d.add_argument("--times", type=int, default=times, help="random observation times")
    d.add_argument("--keep", type=float, default=keep,
                   help="probability that a series is observed at each time")
    d.add_argument("--noise", type=float, default=noise,
                   help="noise std as a fraction of each component's spread")
    f = p.add_argument_group("fitting")
    f.add_argument("--adam-iters", type=int, default=adam_iters)
    f.add_argument("--lr", type=float, default=lr)
    f.add_argument("--lbfgs-iters", type=int, default=lbfgs_iters, help="LBFGS steps after Adam")
    f.add_argument("--lbfgs-max-iter", type=int, default=20,
                   help="inner iterations (about as many loss evaluations) per LBFGS step")
    f.add_argument("--patience", type=int, default=patience,
                   help="stop Adam after this many iterations without improvement (0: never"
                   f"{patience_help})")
    C.add_run_args(p.add_argument_group("run"), save_every=25, unit="iterations",
                   prev="ckpt.pt", out=out, out_help="folder for the results and ckpt.pt",
                   dest="ckpt_every", zero_ok=True)
    return p, d, f


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.gradient == "direct" and args.backend != "torch":
        p.error("--gradient direct needs --backend torch (the others differentiate by adjoint)")
    return args


def fit_config(args: argparse.Namespace) -> FitConfig:
    return FitConfig(adam_iters=args.adam_iters, lr=args.lr, lbfgs_iters=args.lbfgs_iters,
                     lbfgs_max_iter=args.lbfgs_max_iter, patience=args.patience,
                     ckpt_every=args.ckpt_every)


# ----------------------------------------------------------------------------- run
def backend_failure(solve: Callable[[], Any], backend: str) -> tuple[str, str] | None:
    """Runs ``solve`` (a tiny solve on ``backend``, no gradients); ``None`` if it works, else
    ``(error type, message)``, also printed to stderr by rank 0 (the engine cannot run here,
    e.g. ``JuliaUnavailableError``)."""
    try:
        with torch.no_grad():
            solve()
    except BackendUnavailableError as exc:
        kind, msg = type(exc).__name__, " ".join(str(exc).split())
        if C.is_main():
            print(f"backend {backend!r} is not available here: {kind}: {msg}", file=sys.stderr)
        return kind, msg
    return None


def shard_series(n_series: int) -> list[int]:
    """This rank's series (every rank needs at least one)."""
    world = D.get_world_size()
    if n_series < world:
        raise SystemExit(f"--series {n_series} < {world} ranks: every rank needs at least one "
                         "series")
    return D.shard_indices(n_series)


def load_saved(ckpt: Path, args: argparse.Namespace, keys: tuple[str, ...]
               ) -> tuple[dict | None, dict]:
    """``(checkpoint or None, settings key)``: with ``--resume`` the checkpoint in ``ckpt``
    (see :func:`_common.resume`), refused if it was written with other values of ``keys``."""
    key = {k: getattr(args, k) for k in keys}
    saved, _ = C.resume(ckpt, args.resume)
    if saved is not None and saved.get("key") != key:
        raise SystemExit(f"{ckpt} was written with other settings ({saved.get('key')}); "
                         "start afresh without --resume or use another --out")
    return saved, key


def fit_record(st: FitState, n_series: int, nfe: dict) -> dict:
    """The numbers of one finished :func:`~pydiffbridge.fit.fit` (for results.json)."""
    samples = st.evals * n_series  # series processed (forward + backward), all ranks
    return {"final_loss": st.losses[-1] if st.losses else math.nan,
            "iters": len(st.losses), "evals": st.evals, "train_time": st.train_time,
            "samples_per_s": samples / st.train_time if st.train_time > 0 else math.nan,
            "stop_reason": st.stop_reason, "losses": st.losses,
            "lbfgs_start": st.lbfgs_start, "nfe": nfe}


# ----------------------------------------------------------------------------- figures
def loss_figure(path: Path, runs: list[dict], labels: list[str] | None, xlabel: str) -> None:
    """Loss curves of :func:`fit_record` ``runs`` (log scale), the start of LBFGS dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, r in enumerate(runs):
        ax.semilogy(range(1, len(r["losses"]) + 1), r["losses"], lw=1,
                    label=labels[i] if labels else None)
        if r["lbfgs_start"] is not None and r["lbfgs_start"] < len(r["losses"]):
            ax.axvline(r["lbfgs_start"] + 0.5, color="0.7", lw=0.6, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean squared scaled error")
    if labels:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
