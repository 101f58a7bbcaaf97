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
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pydiffbridge.backends.base import get_backend  # noqa: E402
from pydiffbridge.checkpoint import (  # noqa: E402
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from pydiffbridge.cli import (  # noqa: E402
    comma_list,
    int_at_least,
    nonneg_float,
    nonneg_int,
    output_dir,
    positive_float,
    positive_int,
    tolerance,
)
from pydiffbridge.errors import PyDiffBridgeError  # noqa: E402
from pydiffbridge.nn.cnf import CNF, ConcatSquashMLP  # noqa: E402
from pydiffbridge.nn.planar import PlanarCNF, PlanarFlow, planar_cnf_params  # noqa: E402
from pydiffbridge.nn.toy2d import TOY_DATASETS, sample_toy  # noqa: E402

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
def train(kind: str, args: argparse.Namespace, out: Path) -> dict:
    torch.manual_seed(args.seed)
    model = build(kind, args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpt_path = out / f"ckpt_{kind}.pt"
    start, history, elapsed = 0, [], 0.0
    ck, src = load_checkpoint(ckpt_path, missing_ok=True, return_path=True) if args.resume \
        else (None, None)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start, history, elapsed = ck["iter"], ck["history"], ck["train_time_s"]
        torch.set_rng_state(ck["rng"])
        print(f"[{kind}] resumed from {src} at iteration {start}")

    def save(it: int) -> None:
        save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "iter": it,
                         "history": history, "train_time_s": elapsed,
                         "rng": torch.get_rng_state(), "args": vars(args)}, ckpt_path)

    iters = args.nf_iters if (kind == "planar-nf" and args.nf_iters) else args.iters
    bar = tqdm(range(start, iters), desc=f"{kind} ({args.data})", initial=start,
               total=iters, dynamic_ncols=True)
    for it in bar:
        x = sample_toy(args.data, args.batch_size, seed=args.seed * 10_000_000 + it)
        t0 = time.perf_counter()
        nfe_f = nfe_b = 0
        if isinstance(model, CNF):
            model.reset_nfe()
            logp, regs = model.log_prob(x, return_regularization=True)
            nll = -logp.mean()
            loss = nll + model.regularization_loss(regs)
            nfe_f = model.last_nfe
        else:
            nll = -model.log_prob(x).mean()
            loss = nll
        opt.zero_grad()
        loss.backward()
        opt.step()
        if isinstance(model, CNF):
            nfe_b = model.total_nfe - nfe_f
        step_time = time.perf_counter() - t0
        elapsed += step_time
        history.append({"iter": it + 1, "nll": nll.item(), "loss": float(loss.detach()),
                        "nfe_forward": nfe_f, "nfe_backward": nfe_b, "time_s": step_time})
        bar.set_postfix(nll=f"{nll.item():.3f}", nfe=f"{nfe_f}/{nfe_b}")
        if (it + 1) % args.save_every == 0 and it + 1 < iters:
            save(it + 1)
    if start < iters:  # (a resumed run already past --iters keeps its checkpoint)
        save(iters)
    return evaluate(kind, model, history, elapsed, args, out)


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
             f"{args.n_test} points evaluated at tol {args.eval_tol} with exact trace.", "",
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


def _method(text: str) -> str:
    try:
        get_backend("torch").resolve_method(text)
    except PyDiffBridgeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--lr", type=positive_float, default=5e-3)
    p.add_argument("--hidden", type=comma_list(positive_int), default="64,64,64",
                   help="MLP widths, comma separated")
    p.add_argument("--activation", default="tanh", choices=("tanh", "softplus", "elu", "swish"))
    p.add_argument("--method", type=_method, default="dopri5")
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
    p.add_argument("--save-every", "--ckpt-every", dest="save_every", type=positive_int,
                   default=50, metavar="N",
                   help="checkpoint every N iterations and at the end (the one before is kept "
                   "as ckpt_<model>.pt.prev)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue from checkpoints in --out (from the previous one if the "
                   "latest is unreadable)")
    p.add_argument("--out", type=output_dir, default=None,
                   help="output dir (default runs/cnf_2d/<config>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.out is None:
        tag = "planar" if args.compare_planar else args.trace
        tag += f"_kin{args.kinetic:g}" if args.kinetic else ""
        args.out = str(Path("runs") / "cnf_2d" / f"{args.data}_{tag}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = ["planar-nf", "planar-cnf"] if args.compare_planar else ["cnf"]
    results = [train(kind, args, out) for kind in kinds]
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
