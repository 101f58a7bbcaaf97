"""The main demo: fit a small neural ODE to a spiral trajectory.

The data come from the cubic spiral of the neural-ODE paper's demo, dy/dt = (y**3) A with
A = [[-0.1, 2], [-2, -0.1]]; a 2-50-2 tanh MLP learns the vector field from random
sub-trajectories.  Prints the loss, NFE (forward and backward) and time; saves a figure and a
checkpoint (``--resume`` continues from it).

    python -m pydiffbridge demo --help
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from . import odeint, odeint_adjoint

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
    p = argparse.ArgumentParser(prog="python -m pydiffbridge demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--niters", type=int, default=1000, help="training iterations (default 1000)")
    p.add_argument("--data-size", type=int, default=1000, help="points on the true trajectory")
    p.add_argument("--batch-time", type=int, default=10, help="length of sub-trajectories")
    p.add_argument("--batch-size", type=int, default=20, help="sub-trajectories per batch")
    p.add_argument("--method", default="dopri5", help="solver (default dopri5)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--backend", default="torch", help="torch | scipy | julia")
    p.add_argument("--adjoint", action="store_true", help="train with the adjoint method")
    p.add_argument("--lr", type=float, default=1e-2, help="initial Adam rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output folder (figure, checkpoint, JSON)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


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
    if args.resume and ckpt.exists():
        state = torch.load(ckpt)
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
    solver = odeint_adjoint if args.adjoint else odeint
    kw = dict(rtol=args.rtol, atol=args.atol, method=args.method, backend=args.backend)

    def get_batch():
        s = torch.randperm(args.data_size - args.batch_time)[: args.batch_size]
        return true_y[s], t[: args.batch_time], torch.stack(
            [true_y[s + i] for i in range(args.batch_time)], dim=0)

    nfe_f = nfe_b = 0
    t_start = time.perf_counter()
    loss_v = float("nan")
    for _ in _progress(args.niters - start_it, args.quiet):
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
    train_time = time.perf_counter() - t_start
    iters = max(1, args.niters - start_it)
    torch.save({"func": func.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "iter": args.niters}, ckpt)

    with torch.no_grad():
        func.nfe = 0
        pred_y = odeint(func, y0, t, **{**kw, "backend": "torch"})
        full_nfe = func.nfe
        full_loss = float((pred_y - true_y).abs().mean())
    result = {
        "iterations": args.niters, "final_batch_loss": loss_v, "trajectory_l1": full_loss,
        "mean_nfe_forward": nfe_f / iters, "mean_nfe_backward": nfe_b / iters,
        "nfe_full_trajectory": full_nfe, "train_seconds": round(train_time, 2),
        "method": args.method, "adjoint": args.adjoint, "backend": args.backend,
    }
    _figure(out / "spiral.png", true_y, pred_y, func)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"trajectory L1 error {full_loss:.4f} | NFE/iter forward {result['mean_nfe_forward']:.1f}"
          f" backward {result['mean_nfe_backward']:.1f} | full-trajectory NFE {full_nfe} | "
          f"train time {train_time:.1f}s for {iters} iterations")
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
