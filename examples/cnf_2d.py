#!/usr/bin/env python
"""Continuous normalizing flows on 2-D toy densities (Chen et al. 2018; FFJORD).

Trains a density model by maximum likelihood on fresh samples of a toy dataset (two moons,
8 Gaussians, checkerboard, pinwheel; generated in code) and reports the held-out test
log-likelihood (nats, mean ± standard error), the number of function evaluations (NFE) per
forward/backward pass and the training time.

Models:

* ``cnf``        -- FFJORD-style CNF: a time-gated MLP vector field (``ConcatSquashMLP``),
  trace of the Jacobian exact (one vector-Jacobian product per dimension) or Hutchinson
  (``--trace hutchinson``), optional kinetic-energy / Jacobian-Frobenius regularisers
  (``--kinetic W``, ``--jacobian W``; Finlay et al. 2020);
* ``--compare-planar`` instead trains the planar normalizing flow (Rezende & Mohamed 2015,
  ``K`` layers) and the planar CNF (``M`` time-gated units, closed-form trace) at equal
  parameter budgets: ``K (2D+1) = M (2D+3)`` (``K = 7M/5`` in 2-D).

The test log-likelihood of every CNF is evaluated with the exact (or closed-form) trace at
``--eval-tol``, whatever trace it was trained with.  Figures: learned density next to the
data and samples, and the noise-to-data transformation at several times.

Examples::

    python examples/cnf_2d.py --data moons --iters 300
    python examples/cnf_2d.py --data 8gaussians --trace hutchinson --kinetic 0.05
    python examples/cnf_2d.py --data moons --compare-planar --planar-width 20
    torchrun --nproc_per_node=2 examples/cnf_2d.py --data moons --iters 300

Under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on CUDA) each iteration's batch of
``--batch-size`` points is split over the processes and the model is wrapped in
DistributedDataParallel: N processes train on the same batches, with the same loss, as one
process does (except for the Hutchinson noise, drawn per process).  NFE are means over the
processes per iteration (``nfe_*_max`` in the checkpoint's history: the slowest one); rank 0
alone evaluates, writes outputs and checkpoints, and ``--resume`` works with any N.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pydiffbridge import distributed as D  # noqa: E402
from pydiffbridge.checkpoint import write_json_atomic, write_text_atomic  # noqa: E402
from pydiffbridge.cli import (  # noqa: E402
    comma_list,
    int_at_least,
    nonneg_float,
    positive_float,
    positive_int,
    tolerance,
)
from pydiffbridge.nn.cnf import CNF, ConcatSquashMLP  # noqa: E402
from pydiffbridge.nn.planar import PlanarCNF, PlanarFlow, planar_cnf_params  # noqa: E402
from pydiffbridge.nn.toy2d import TOY_DATASETS, sample_toy  # noqa: E402

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the examples' _*.py helpers, also when imported from elsewhere
    sys.path.insert(0, HERE)

import _common as C  # noqa: E402

LIM = 4.0  # plotting window [-LIM, LIM]^2


# ----------------------------------------------------------------------------- models
def build(kind: str, args: argparse.Namespace) -> nn.Module:
    """Return a model with ``log_prob``: a :class:`CNF` or a :class:`PlanarFlow`."""
    regs = {"kinetic": args.kinetic, "jacobian": args.jacobian}
    common = dict(method=args.method, rtol=args.tol, atol=args.tol, gradient=args.gradient,
                  regularizers=regs)
    if kind == "cnf":
        hidden = tuple(args.hidden)
        return CNF(ConcatSquashMLP(2, hidden, args.activation), trace=args.trace,
                   noise=args.noise, **common)
    if kind == "planar-cnf":
        return CNF(PlanarCNF(2, args.planar_width), trace="closed_form", noise=args.noise,
                   **common)
    if kind == "planar-nf":
        layers = math.ceil(planar_cnf_params(args.planar_width, 2) / 5)
        return PlanarFlow(2, layers)
    raise ValueError(kind)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def evaluation(model: nn.Module, tol: float) -> Iterator[None]:
    """Exact/closed-form trace, tight tolerance, no grad, direct solve (restored after)."""
    saved = None
    if isinstance(model, CNF):
        saved = (model.trace, model.rtol, model.atol)
        if model.trace == "hutchinson":
            model.trace = "exact"
        model.rtol = model.atol = tol
    try:
        with torch.no_grad():
            yield
    finally:
        if saved is not None:
            model.trace, model.rtol, model.atol = saved


def batched_log_prob(model: nn.Module, x: torch.Tensor, bs: int = 2000) -> tuple[np.ndarray, int]:
    out, nfe = [], 0
    for i in range(0, len(x), bs):
        out.append(model.log_prob(x[i:i + bs]))
        nfe = max(nfe, getattr(model, "last_nfe", 0))
    return torch.cat(out).numpy(), nfe


# ----------------------------------------------------------------------------- training
def train(kind: str, args: argparse.Namespace, out: Path) -> dict | None:
    """Train (or resume) one model; its results row on rank 0 (None on the other ranks)."""
    torch.manual_seed(args.seed)
    model = build(kind, args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpt_path = out / f"ckpt_{kind}.pt"
    start, history, elapsed = 0, [], 0.0
    ck, src = C.resume(ckpt_path, args.resume)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start, history, elapsed = ck["iter"], ck["history"], ck["train_time_s"]
        torch.set_rng_state(ck["rng"])  # rank 0's stream (it wrote the checkpoint)
        C.log(f"[{kind}] resumed from {src} at iteration {start}")
    C.decorrelate_rng(args.seed, start)  # own Hutchinson noise on ranks > 0
    cnf = isinstance(model, CNF)
    log_prob = C.wrap(model, "log_prob")  # DDP with several processes

    def save(it: int) -> None:
        C.save({"model": model.state_dict(), "opt": opt.state_dict(), "iter": it,
                "history": history, "train_time_s": elapsed, "rng": torch.get_rng_state(),
                "args": vars(args), "world_size": D.get_world_size()}, ckpt_path)

    iters = args.nf_iters if (kind == "planar-nf" and args.nf_iters) else args.iters
    bar = C.progress(range(start, iters), f"{kind} ({args.data})", args.no_progress,
                     initial=start, total=iters, dynamic_ncols=True)
    mine = C.shard(args.batch_size) if D.is_distributed() else None
    scale = C.loss_scale(len(mine), args.batch_size) if mine else 1.0
    for it in bar:
        x = sample_toy(args.data, args.batch_size, seed=args.seed * 10_000_000 + it)
        x = x if mine is None else x[mine]  # this process's share of the global batch
        t0 = time.perf_counter()
        nfe_f = nfe_b = 0
        if cnf:
            model.reset_nfe()
            logp, regs = log_prob(x, return_regularization=True)
            nll = -logp.mean()
            loss = nll + model.regularization_loss(regs)
            nfe_f = model.last_nfe
        else:
            nll = -log_prob(x).mean()
            loss = nll
        if mine is not None:  # DDP averages over ranks: make it the global batch's loss
            loss, nll = loss * scale, nll * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cnf:
            nfe_b = model.total_nfe - nfe_f
        step_time = time.perf_counter() - t0
        elapsed += step_time
        st = C.step_stats({"nll": nll.item(), "loss": float(loss.detach())},
                          {"nfe_forward": nfe_f, "nfe_backward": nfe_b})
        history.append({"iter": it + 1, **st, "time_s": step_time})
        bar.set_postfix(nll=f"{st['nll']:.3f}", nfe=f"{st['nfe_forward']}/{st['nfe_backward']}")
        if (it + 1) % args.save_every == 0 and it + 1 < iters:
            save(it + 1)
    if start < iters:  # (a resumed run already past --iters keeps its checkpoint)
        save(iters)
    if not C.is_main():  # rank 0 evaluates (on all the test points) and writes outputs
        return None
    row = evaluate(kind, model, history, elapsed, args, out)
    row["world_size"] = D.get_world_size()
    row["samples_per_s"] = (len(history) * args.batch_size / elapsed if elapsed > 0
                            else math.nan)
    if D.is_distributed():
        tail = history[-max(1, len(history) // 10):]
        for key in ("nfe_forward", "nfe_backward"):
            vals = [h.get(f"{key}_max", h[key]) for h in tail]
            row[f"{key}_max_last10pct"] = float(np.mean(vals))
    return row


# ----------------------------------------------------------------------------- evaluation
def evaluate(kind: str, model: nn.Module, history: list, elapsed: float,
             args: argparse.Namespace, out: Path) -> dict:
    x_test = sample_toy(args.data, args.n_test, seed=2**31 - 1 - args.seed)
    t0 = time.perf_counter()
    with evaluation(model, args.eval_tol):
        ll, eval_nfe = batched_log_prob(model, x_test)
        if isinstance(model, CNF):
            gen = torch.Generator().manual_seed(args.seed)
            base = torch.randn(args.n_samples, 2, generator=gen)
            times = torch.linspace(model.t1, model.t0, 6)
            traj = model.transform(base, times).trajectory.numpy()
            samples = traj[-1]
        else:
            samples = model.sample(args.n_samples, generator=torch.Generator().manual_seed(1))
            samples, traj, times = samples.numpy(), None, None
        grid = torch.linspace(-LIM, LIM, args.grid)
        gx, gy = torch.meshgrid(grid, grid, indexing="xy")
        dens = np.exp(batched_log_prob(model, torch.stack([gx, gy], -1).reshape(-1, 2))[0])
    eval_time = time.perf_counter() - t0
    figs = [plot_density(kind, x_test.numpy(), dens.reshape(args.grid, args.grid), samples,
                         out / f"density_{kind}.png", args.data)]
    if traj is not None:
        figs.append(plot_transform(kind, traj, times.numpy(), out / f"transform_{kind}.png"))
    tail = history[-max(1, len(history) // 10):]
    return {
        "model": kind, "data": args.data, "params": n_params(model),
        "trace": getattr(model, "trace", "closed-form log-det"),
        "iters": len(history), "train_time_s": round(elapsed, 2),
        "time_per_iter_s": round(elapsed / max(1, len(history)), 4),
        "median_iter_s": float(np.nanmedian([h.get("time_s", np.nan) for h in history])),
        "test_ll": float(ll.mean()), "test_ll_se": float(ll.std() / math.sqrt(len(ll))),
        "train_nll_last10pct": float(np.mean([h["nll"] for h in tail])),
        "nfe_forward_last10pct": float(np.mean([h["nfe_forward"] for h in tail])),
        "nfe_backward_last10pct": float(np.mean([h["nfe_backward"] for h in tail])),
        "nfe_forward_total": int(sum(h["nfe_forward"] for h in history)),
        "eval_nfe": int(eval_nfe), "eval_time_s": round(eval_time, 2),
        "kinetic": args.kinetic, "jacobian": args.jacobian, "figures": figs,
    }


def plot_density(kind: str, data: np.ndarray, dens: np.ndarray, samples: np.ndarray,
                 path: Path, name: str) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    rng = [[-LIM, LIM], [-LIM, LIM]]
    axes[0].hist2d(data[:, 0], data[:, 1], bins=100, range=rng, cmap="viridis")
    axes[0].set_title(f"data ({name})")
    axes[1].imshow(dens, origin="lower", extent=(-LIM, LIM, -LIM, LIM), cmap="viridis")
    axes[1].set_title(f"learned density ({kind})")
    axes[2].hist2d(samples[:, 0], samples[:, 1], bins=100, range=rng, cmap="viridis")
    axes[2].set_title("samples")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_transform(kind: str, traj: np.ndarray, times: np.ndarray, path: Path) -> str:
    fig, axes = plt.subplots(1, len(times), figsize=(2.6 * len(times), 2.8))
    color = np.arctan2(traj[0][:, 1], traj[0][:, 0])  # colour by angle of the base draw
    for ax, z, t in zip(axes, traj, times, strict=True):
        ax.scatter(z[:, 0], z[:, 1], s=1, c=color, cmap="hsv", alpha=0.6)
        ax.set_xlim(-LIM, LIM)
        ax.set_ylim(-LIM, LIM)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t = {t:.2f}")
    fig.suptitle(f"noise (t=1) to data (t=0): {kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_results(results: list[dict], args: argparse.Namespace, out: Path) -> None:
    write_json_atomic({"args": vars(args), "results": results}, out / "results.json")
    lines = [f"# CNF 2-D density estimation: {args.data}", "",
             f"{args.iters} iterations (planar NF: {args.nf_iters or args.iters}), batch "
             f"{args.batch_size}, lr {args.lr}, solver "
             f"{args.method} tol {args.tol} ({args.gradient} gradients), test set "
             f"{args.n_test} points evaluated at tol {args.eval_tol} with exact trace."
             + (f" {D.get_world_size()} processes (torchrun), each on its share of the batch;"
                " NFE are means over them." if D.is_distributed() else ""), "",
             "| model | trace | params | test log-lik (nats) | NFE fwd | NFE bwd | "
             "train time (s) | s/iter |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['trace']} | {r['params']} | {r['test_ll']:.3f} ± "
            f"{r['test_ll_se']:.3f} | {r['nfe_forward_last10pct']:.1f} | "
            f"{r['nfe_backward_last10pct']:.1f} | {r['train_time_s']:.1f} | "
            f"{r['time_per_iter_s']:.3f} |")
    lines += ["", "NFE: mean over the last 10% of training iterations. Figures: "
              + ", ".join(f for r in results for f in r["figures"]), ""]
    write_text_atomic("\n".join(lines), out / "results.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=TOY_DATASETS, default="moons")
    p.add_argument("--trace", choices=("exact", "hutchinson"), default="exact")
    p.add_argument("--noise", choices=("rademacher", "gaussian"), default="rademacher")
    p.add_argument("--kinetic", type=nonneg_float, default=0.0, help="kinetic-energy weight")
    p.add_argument("--jacobian", type=nonneg_float, default=0.0,
                   help="Jacobian-Frobenius weight")
    p.add_argument("--iters", type=positive_int, default=400)
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="points per iteration, over all processes under torchrun")
    p.add_argument("--lr", type=positive_float, default=5e-3)
    p.add_argument("--hidden", type=comma_list(positive_int), default="64,64,64",
                   help="MLP widths, comma separated")
    p.add_argument("--activation", default="tanh", choices=("tanh", "softplus", "elu", "swish"))
    p.add_argument("--method", type=C.method_type(), default="dopri5")
    p.add_argument("--tol", type=tolerance, default=1e-4, help="training rtol = atol")
    p.add_argument("--eval-tol", type=tolerance, default=1e-5)
    p.add_argument("--gradient", choices=("adjoint", "direct"), default="adjoint")
    p.add_argument("--compare-planar", action="store_true",
                   help="train planar NF vs planar CNF at equal parameter budgets instead")
    p.add_argument("--planar-width", type=positive_int, default=20,
                   help="planar CNF units M; the planar NF gets ceil(7M/5) layers")
    p.add_argument("--nf-iters", type=positive_int, default=None,
                   help="iterations for the planar NF (default --iters; it is much cheaper)")
    p.add_argument("--n-test", type=positive_int, default=5000)
    p.add_argument("--n-samples", type=positive_int, default=5000)
    p.add_argument("--grid", type=int_at_least(2), default=100, help="density grid resolution")
    C.add_run_args(p, save_every=50, unit="iterations", prev="ckpt_<model>.pt", out=None,
                   out_help="output dir (default runs/cnf_2d/<config>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.out is None:
        tag = "planar" if args.compare_planar else args.trace
        tag += f"_kin{args.kinetic:g}" if args.kinetic else ""
        args.out = str(Path("runs") / "cnf_2d" / f"{args.data}_{tag}")
    with C.distributed(device="cpu"):
        return _main(args)


def _main(args: argparse.Namespace) -> list[dict]:
    out = C.make_out(args.out)
    kinds = ["planar-nf", "planar-cnf"] if args.compare_planar else ["cnf"]
    results = [train(kind, args, out) for kind in kinds]
    if not C.is_main():
        return []
    write_results(results, args, out)
    for r in results:
        print(f"{r['model']:>10s} {r['data']}: test log-lik {r['test_ll']:.3f} ± "
              f"{r['test_ll_se']:.3f} nats, params {r['params']}, NFE fwd/bwd "
              f"{r['nfe_forward_last10pct']:.1f}/{r['nfe_backward_last10pct']:.1f}, "
              f"train {r['train_time_s']:.1f} s")
    print(f"results: {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
