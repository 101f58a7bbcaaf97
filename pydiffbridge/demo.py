"""The main demo: fit a small neural ODE to a spiral trajectory.

The data come from the cubic spiral of the neural-ODE paper's demo, dy/dt = (y**3) A with
A = [[-0.1, 2], [-2, -0.1]]; a 2-50-2 tanh MLP learns the vector field from random
sub-trajectories.  Prints the loss, NFE (forward and backward) and time; saves a figure and a
checkpoint every ``--save-every`` iterations, crash-safe (``--resume`` continues from it, or
from the one before it if it is unreadable).

    python -m pydiffbridge demo --help
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from . import odeint, odeint_adjoint
from .backends.base import BACKEND_NAMES, get_backend
from .checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from .cli import int_at_least
from .errors import PyDiffBridgeError

BACKENDS = tuple(BACKEND_NAMES)

TRUE_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


class Lambda(nn.Module):
    def forward(self, t, y):
        return (y**3) @ TRUE_A.to(y)


class ODEFunc(nn.Module):
    """A 2-50-2 MLP vector field that counts its evaluations."""

    def __init__(self, hidden: int = 50):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.net(y**3)


def _progress(n: int, quiet: bool):
    try:
        from tqdm import trange

        return trange(n, disable=quiet, desc="demo", leave=False)
    except ImportError:  # tqdm is an optional extra
        return range(n)


def parse_args(argv=None) -> argparse.Namespace:
    from .cli import nonneg_int, output_dir, positive_float, positive_int, tolerance

    p = argparse.ArgumentParser(prog="python -m pydiffbridge demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--niters", type=positive_int, default=1000,
                   help="training iterations, >= 1 (default 1000)")
    p.add_argument("--data-size", type=int_at_least(3), default=1000,
                   help="points on the true trajectory (> --batch-time)")
    p.add_argument("--batch-time", type=int_at_least(2), default=10,
                   help="length of sub-trajectories, >= 2")
    p.add_argument("--batch-size", type=positive_int, default=20,
                   help="sub-trajectories per batch")
    p.add_argument("--method", default="dopri5", help="solver (default dopri5)")
    p.add_argument("--rtol", type=tolerance, default=1e-5, help="in (0, 1)")
    p.add_argument("--atol", type=tolerance, default=1e-6, help="in (0, 1)")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="torch | scipy | julia")
    p.add_argument("--adjoint", action="store_true", help="train with the adjoint method")
    p.add_argument("--lr", type=positive_float, default=1e-2,
                   help="initial Adam rate (cosine decay)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", type=output_dir, default="runs/demo",
                   help="output folder (figure, checkpoint, JSON)")
    p.add_argument("--save-every", type=positive_int, default=100, metavar="N",
                   help="write the checkpoint every N iterations and at the end (default 100); "
                   "the one before is kept as checkpoint.pt.prev")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (from checkpoint.pt.prev if that one "
                   "is unreadable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.data_size <= args.batch_time:
        p.error(f"argument --data-size: must exceed --batch-time ({args.batch_time}), got "
                f"{args.data_size}")
    try:
        get_backend(args.backend).resolve_method(args.method)
    except PyDiffBridgeError as exc:
        p.error(f"argument --method: {exc}")
    return args


def _save(path: Path, func, opt, sched, it: int) -> None:
    save_checkpoint({"func": func.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "iter": it, "rng": torch.get_rng_state()},
                    path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    y0 = torch.tensor([[2.0, 0.0]])
    t = torch.linspace(0.0, 25.0, args.data_size)
    with torch.no_grad():
        true_y = odeint(Lambda(), y0, t, method="dopri5", rtol=1e-7, atol=1e-9)

    func = ODEFunc()
    opt = torch.optim.Adam(func.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.niters))
    start_it = 0
    ckpt = out / "checkpoint.pt"
    state = load_checkpoint(ckpt, missing_ok=True, return_path=True) if args.resume else None
    if state is not None and state[0] is not None:
        state, src = state
        func.load_state_dict(state["func"])
        opt.load_state_dict(state["opt"])
        start_it = state["iter"]
        if "sched" in state:
            sched.load_state_dict(state["sched"])
        else:  # a checkpoint from before the schedule was saved: replay it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(start_it):
                    sched.step()
        if "rng" in state:  # the same batches as an uninterrupted run
            torch.set_rng_state(state["rng"])
        if not args.quiet:
            print(f"resumed from {src} at iteration {start_it}")
    elif args.resume and not args.quiet:
        print(f"no checkpoint in {out}: starting from iteration 0")
    solver = odeint_adjoint if args.adjoint else odeint
    kw = dict(rtol=args.rtol, atol=args.atol, method=args.method, backend=args.backend)

    def get_batch():
        s = torch.randperm(args.data_size - args.batch_time)[: args.batch_size]
        return true_y[s], t[: args.batch_time], torch.stack(
            [true_y[s + i] for i in range(args.batch_time)], dim=0)

    nfe_f = nfe_b = 0
    t_start = time.perf_counter()
    loss_v = None
    it = start_it
    if start_it >= args.niters:
        print(f"the checkpoint is at iteration {start_it} >= --niters {args.niters}: nothing "
              "to train (raise --niters to continue)")
    for _ in _progress(max(0, args.niters - start_it), args.quiet):
        opt.zero_grad()
        by0, bt, by = get_batch()
        func.nfe = 0
        pred = solver(func, by0, bt, **kw)
        nfe_f += func.nfe
        loss = (pred - by).abs().mean()
        func.nfe = 0
        loss.backward()
        nfe_b += func.nfe
        opt.step()
        sched.step()
        loss_v = loss.item()
        it += 1
        if it % args.save_every == 0 or it == args.niters:
            _save(ckpt, func, opt, sched, it)
    train_time = time.perf_counter() - t_start
    iters = it - start_it

    with torch.no_grad():
        func.nfe = 0
        pred_y = odeint(func, y0, t, **{**kw, "backend": "torch"})
        full_nfe = func.nfe
        full_loss = float((pred_y - true_y).abs().mean())
    result = {
        "iterations": it, "final_batch_loss": loss_v, "trajectory_l1": full_loss,
        "mean_nfe_forward": nfe_f / iters if iters else None,
        "mean_nfe_backward": nfe_b / iters if iters else None,
        "nfe_full_trajectory": full_nfe, "train_seconds": round(train_time, 2),
        "method": args.method, "adjoint": args.adjoint, "backend": args.backend,
    }
    _figure(out / "spiral.png", true_y, pred_y, func)
    write_json_atomic(result, out / "result.json")
    per_iter = (f"NFE/iter forward {nfe_f / iters:.1f} backward {nfe_b / iters:.1f}" if iters
                else "no iterations trained")
    print(f"trajectory L1 error {full_loss:.4f} | {per_iter} | full-trajectory NFE {full_nfe} "
          f"| train time {train_time:.1f}s for {iters} iterations")
    print(f"figure: {out / 'spiral.png'}  checkpoint: {ckpt}  results: {out / 'result.json'}")
    return result


def _figure(path: Path, true_y, pred_y, func) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figure (pip install 'pydiffbridge[examples]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    ax = axes[0]
    ax.plot(true_y[:, 0, 0], true_y[:, 0, 1], "g-", label="true")
    ax.plot(pred_y[:, 0, 0], pred_y[:, 0, 1], "b--", label="learned")
    ax.set_title("Trajectories")
    ax.legend()
    ax = axes[1]
    g = torch.linspace(-2, 2, 21)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    with torch.no_grad():
        dv = func(0, pts)
    dv = dv / dv.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    ax.quiver(pts[:, 0], pts[:, 1], dv[:, 0], dv[:, 1], color="k")
    ax.set_title("Learned vector field")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
