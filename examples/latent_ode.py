#!/usr/bin/env python
"""Latent ODEs on irregularly sampled time series (Chen et al. 2018 sec. 5; Rubanova et al. 2019).

Two data sets, both sampled at random, per-series times:

* ``spirals``  -- clockwise and counter-clockwise Archimedean spirals generated in code
  (``--noise`` adds Gaussian observation noise), conditioning window ``[0, 1]``,
  extrapolation window ``(1, 2]``;
* ``sunspots`` / ``elnino`` / ``co2`` -- a real series shipped with ``statsmodels``, cut into
  windows, a random fraction of each window's points kept, standardised with training-span
  statistics; train and test windows come from disjoint time spans (test = the most recent).

Two models, trained on the same batches with the same objective (condition on a random subset
of the points in the conditioning window, predict every point of the series):

* ``latent``  -- :class:`pydiffbridge.nn.latent.LatentODE` (GRU-with-gaps encoder by default,
  ``--encoder odernn`` for the ODE-RNN; negative ELBO with KL annealing);
* ``rnn``     -- :class:`pydiffbridge.nn.latent.RNNBaseline`, an autoregressive GRU that gets the
  time gaps as input (mean squared error).

Test metrics (standardised units): extrapolation MSE (condition on the conditioning window,
predict the points after it) and interpolation MSE (condition on a random half of the points
in the conditioning window, predict the other half).  Also: training time, and the latent
ODE's function evaluations (NFE) per training iteration.  Outputs in ``--out``: results.json,
results.md, one figure per data set, checkpoints (``--resume`` continues from them).

Examples::

    python examples/latent_ode.py                      # spirals and sunspots, defaults
    python examples/latent_ode.py --data spirals --iters 800 --encoder odernn
    python examples/latent_ode.py --data elnino --gradient adjoint --iters 300
    torchrun --nproc_per_node=2 examples/latent_ode.py --data spirals

Under ``torchrun --nproc_per_node=N`` (gloo) every process draws the same batch of
``--batch-size`` series and the same conditioning subsets, takes its share of the series and
trains the model wrapped in DistributedDataParallel, with the loss scaled so that the ranks'
averaged gradient is that of the whole batch's loss (the reparameterisation noise is drawn
per process).  NFE are means over the processes (``nfe_*_max`` in the checkpoints: the
slowest one); rank 0 alone evaluates, writes outputs and checkpoints, and ``--resume`` works
with any N.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pydiffbridge import distributed as D  # noqa: E402
from pydiffbridge.backends.base import BACKEND_NAMES  # noqa: E402
from pydiffbridge.checkpoint import write_json_atomic, write_text_atomic  # noqa: E402
from pydiffbridge.cli import (  # noqa: E402
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    tolerance,
)
from pydiffbridge.nn.latent import (  # noqa: E402
    LatentODE,
    RNNBaseline,
    SolverConfig,
    extrapolate,
    interpolate,
    masked_mse,
)
from pydiffbridge.nn.timeseries import (  # noqa: E402
    SpiralConfig,
    TimeSeries,
    collate,
    load_real_series,
    make_spirals,
    make_windows,
    random_split,
    spiral_points,
    split_at,
)

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the examples' _*.py helpers, also when imported from elsewhere
    sys.path.insert(0, HERE)

import _common as C  # noqa: E402

# real series: (window length, end of conditioning window, stride, last time of training span)
REAL = {"sunspots": (4.0, 3.0, 0.1, 22.0), "elnino": (4.0, 3.0, 0.25, 45.0),
        "co2": (3.0, 2.0, 0.25, 33.0)}
FIXED_STEP = ("euler", "midpoint", "heun2", "heun3", "rk4")


def load_data(name: str, args: argparse.Namespace) -> tuple[list, list, float, float, dict]:
    """``(train, test, t_split, t_end, info)`` for a data set name."""
    if name == "spirals":
        cfg = SpiralConfig(noise_std=args.noise)
        train = make_spirals(args.n_train, cfg, seed=args.seed + 1)
        test = make_spirals(args.n_test, cfg, seed=args.seed + 2)
        return train, test, cfg.t_obs, cfg.t_total, {"cfg": cfg}
    window, t_split, stride, t_train = REAL[name]
    t, y = load_real_series(name)
    train, mean, std = make_windows(t, y, window, stride, args.keep, float(t[0]), t_train,
                                    seed=args.seed + 1)
    test, _, _ = make_windows(t, y, window, stride, args.keep, t_train, float(t[-1]),
                              seed=args.seed + 2, mean=mean, std=std)
    return train, test, t_split, window, {"mean": mean, "std": std}


def build(kind: str, args: argparse.Namespace) -> nn.Module:
    if kind == "rnn":
        return RNNBaseline(args.dim, args.hidden, args.hidden)
    solver = SolverConfig(method=args.method, rtol=args.rtol, atol=args.atol,
                          gradient=args.gradient, backend=args.backend)
    fixed = args.encoder_method in FIXED_STEP
    enc = SolverConfig(method=args.encoder_method, rtol=args.rtol, atol=args.atol,
                       options={"step_size": args.encoder_step} if fixed else None,
                       gradient=args.gradient, backend=args.backend)
    return LatentODE(args.dim, args.latent_dim, args.hidden, args.hidden, args.hidden,
                     encoder=args.encoder, obs_std=args.obs_std, solver=solver,
                     encoder_solver=enc)


def train_model(kind: str, model: nn.Module, train: list[TimeSeries], t_split: float,
                args: argparse.Namespace, ckpt: Path) -> dict:
    """Adam on minibatches; checkpoints every ``--save-every`` iterations and at the end.
    Under torchrun each rank trains on its share of every (global) batch."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = {"iter": 0, "train_time": 0.0, "losses": [], "nfe_fwd": [], "nfe_total": []}
    saved, src = C.resume(ckpt, args.resume)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        C.log(f"{args.current}/{kind}: resumed from {src} at iteration {state['iter']}")
    C.decorrelate_rng(args.seed, state["iter"])  # own z0 noise on ranks > 0
    # DDP with several processes; the GRU encoder keeps an ODE function it never calls
    loss_fn = C.wrap(model, "loss", find_unused_parameters=(kind == "latent"
                                                            and args.encoder == "rnn"))
    dist = D.is_distributed()
    if dist:
        C.shard(min(args.batch_size, len(train)))  # fail fast if a batch cannot be shared
    g = torch.Generator().manual_seed(args.seed + 1000 * state["iter"])
    bar = C.progress(range(state["iter"], args.iters), f"{args.current}/{kind}",
                     args.no_progress, leave=False)
    for it in bar:
        t0 = time.perf_counter()
        idx = torch.randperm(len(train), generator=g)[: args.batch_size]
        batch = collate([train[int(i)] for i in idx])
        keep = 0.5 + 0.5 * float(torch.rand((), generator=g))
        cond = random_split(split_at(batch, t_split)[0], keep, g)[0].select(slice(None))
        scale = 1.0
        if dist:  # this rank's series; the loss is a mean over observed target entries
            mine = torch.tensor(C.shard(len(idx)))
            n_all = float(batch.mask.sum())
            batch, cond = batch.select(mine), cond.select(mine)
            scale = C.loss_scale(float(batch.mask.sum()), n_all)
        if kind == "latent":
            model.reset_nfe()
            kl_w = min(1.0, (it + 1) / args.kl_anneal) if args.kl_anneal > 0 else 1.0
            loss = loss_fn(cond, batch, n_samples=1, kl_weight=kl_w)
            nfe_fwd = sum(model.nfe().values())
        else:
            loss = loss_fn(cond, batch)
        if dist:
            loss = loss * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        nfe = ({"nfe_fwd": nfe_fwd, "nfe_total": sum(model.nfe().values())}
               if kind == "latent" else None)
        st = C.step_stats({"loss": float(loss.detach())}, nfe)
        for key in ("nfe_fwd", "nfe_total", "nfe_fwd_max", "nfe_total_max"):
            if key in st:
                state.setdefault(key, []).append(st[key])
        state["train_time"] += time.perf_counter() - t0
        state["losses"].append(st["loss"])
        state["iter"] = it + 1
        bar.set_postfix(loss=f"{state['losses'][-1]:.3f}")
        if state["iter"] % args.save_every == 0 or state["iter"] == args.iters:
            C.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state,
                    "world_size": D.get_world_size()}, ckpt)
    return state


def evaluate(model: nn.Module, test: list[TimeSeries], t_split: float, args) -> dict:
    batch = collate(test)
    pred, _, fut = extrapolate(model, batch, t_split, n_samples=args.n_samples)
    gen = torch.Generator().manual_seed(args.seed + 7)
    window = split_at(batch, t_split)[0].select(slice(None))
    pred_i, _, held = interpolate(model, window, 0.5, n_samples=args.n_samples, generator=gen)
    return {"extrap_mse": masked_mse(pred.mean, fut), "interp_mse": masked_mse(pred_i.mean, held)}


def figure(name: str, models: dict, test: list, t_split: float, t_end: float, info: dict,
           path: Path, args) -> None:
    """Observations, truth, both models' extrapolations (latent: mean +- 2 std over z0 draws),
    and the latent ODE's learned latent trajectories (2-D PCA)."""
    show = list(range(0, len(test), max(1, len(test) // 4)))[:4]
    dense = torch.linspace(0.0, t_end, 200)
    fig, axes = plt.subplots(1, len(show) + 1, figsize=(4 * (len(show) + 1), 3.6))
    latent, rnn = models["latent"], models["rnn"]
    for ax, i in zip(axes[: len(show)], show, strict=True):
        s = test[i]
        cond = split_at(collate([s]), t_split)[0].select(0)
        pl = latent.predict(cond, dense, n_samples=max(args.n_samples, 2))
        # the RNN is autoregressive, so its predictions depend on the query set: ask it at the
        # series' own times, as in the metrics
        pr = rnn.predict(cond, s.t)
        m, sd, r = pl.mean[0], pl.std[0], pr.mean[0]
        obs_m = s.t <= t_split
        if name == "spirals":
            truth = spiral_points(s.info["theta0"], s.info["direction"], dense.double(),
                                  info["cfg"])
            ax.plot(truth[:, 0], truth[:, 1], color="0.75", lw=1, label="truth")
            ax.plot(m[:, 0], m[:, 1], color="C0", label="latent ODE")
            ax.plot(r[:, 0], r[:, 1], color="C3", ls="--", marker=".", ms=3, label="RNN-Δt")
            ax.scatter(s.x[obs_m, 0], s.x[obs_m, 1], s=10, color="k", label="observed")
            ax.scatter(s.x[~obs_m, 0], s.x[~obs_m, 1], s=10, facecolors="none",
                       edgecolors="k", label="to extrapolate")
            ax.set_aspect("equal")
        else:
            ax.fill_between(dense, m[:, 0] - 2 * sd[:, 0], m[:, 0] + 2 * sd[:, 0], color="C0",
                            alpha=0.2, lw=0)
            ax.plot(dense, m[:, 0], color="C0", label="latent ODE (±2σ)")
            ax.plot(s.t, r[:, 0], color="C3", ls="--", marker=".", ms=3, label="RNN-Δt")
            ax.scatter(s.t[obs_m], s.x[obs_m, 0], s=10, color="k", label="observed")
            ax.scatter(s.t[~obs_m], s.x[~obs_m, 0], s=10, facecolors="none", edgecolors="k",
                       label="to extrapolate")
            ax.axvline(t_split, color="0.5", lw=0.8)
            ax.set_xlabel("t")
        ax.set_title(f"test series {i}", fontsize=9)
    axes[0].legend(fontsize=7)
    # learned latent trajectories of the posterior means, projected on 2 principal axes
    ax = axes[-1]
    sub = test[: min(len(test), 16)]
    with torch.no_grad():
        cond = split_at(collate(sub), t_split)[0].select(slice(None))
        mu, _ = latent.encode(cond)
        z = latent.trajectory(mu, dense)  # [B, T, latent]
    flat = z.reshape(-1, z.shape[-1])
    _, _, v = torch.pca_lowrank(flat, q=min(2, flat.shape[-1]), center=True)
    proj = ((z - flat.mean(0)) @ v).numpy()
    k = int((dense <= t_split).sum())
    for b in range(proj.shape[0]):
        col = "C0" if sub[b].info.get("direction", 1) > 0 else "C1"
        ax.plot(proj[b, :k, 0], proj[b, :k, -1], color=col, lw=1)
        ax.plot(proj[b, k - 1:, 0], proj[b, k - 1:, -1], color=col, lw=1, ls=":")
    ax.set_title("latent z(t), PCA (dotted: extrapolation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, results: dict, args: argparse.Namespace) -> None:
    write_json_atomic({"args": vars(args), "results": results}, out / "results.json",
                      default=str)
    lines = ["# Latent ODE vs RNN-Δt baseline (test MSE, standardised units)", "",
             "| data | model | extrap MSE | interp MSE | train time (s) | iters | "
             "NFE/iter fwd | NFE/iter fwd+bwd |", "|---|---|---|---|---|---|---|---|"]
    for data, res in results.items():
        for kind, r in res["models"].items():
            nf = "-" if r["nfe_fwd"] is None else f"{r['nfe_fwd']:.0f}"
            nt = "-" if r["nfe_total"] is None else f"{r['nfe_total']:.0f}"
            lines.append(f"| {data} | {kind} | {r['extrap_mse']:.4f} | {r['interp_mse']:.4f} | "
                         f"{r['train_time']:.1f} | {r['iters']} | {nf} | {nt} |")
    lines += [""] + [f"![{d}]({r['figure']})" for d, r in results.items()]
    write_text_atomic("\n".join(lines) + "\n", out / "results.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", default=["spirals", "sunspots"],
                   choices=["spirals", *REAL])
    p.add_argument("--iters", type=positive_int, default=300,
                   help="training iterations per model")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="series per iteration, over all processes under torchrun")
    p.add_argument("--lr", type=positive_float, default=1e-2)
    p.add_argument("--hidden", type=positive_int, default=64, help="width of all hidden layers")
    p.add_argument("--latent-dim", type=positive_int, default=4)
    p.add_argument("--encoder", choices=["rnn", "odernn"], default="rnn")
    p.add_argument("--encoder-method", default="euler",
                   help="ODE-RNN gap solver (fixed-step ones use --encoder-step)")
    p.add_argument("--encoder-step", type=fraction, default=0.5,
                   help="fixed step on the normalised gap time s in [0, 1], in (0, 1]")
    p.add_argument("--method", default="dopri5", help="latent ODE solver")
    p.add_argument("--rtol", type=tolerance, default=1e-3)
    p.add_argument("--atol", type=tolerance, default=1e-4)
    p.add_argument("--gradient", choices=["direct", "adjoint"], default="direct")
    p.add_argument("--backend", default="torch", choices=BACKEND_NAMES)
    p.add_argument("--obs-std", type=positive_float, default=0.1, help="likelihood noise scale")
    p.add_argument("--kl-anneal", type=nonneg_int, default=100,
                   help="iterations of KL warm-up (0: none)")
    p.add_argument("--n-samples", type=nonneg_int, default=8,
                   help="z0 draws for predictions (0: the posterior mean only)")
    p.add_argument("--noise", type=nonneg_float, default=0.0, help="spiral observation noise std")
    p.add_argument("--n-train", type=positive_int, default=256, help="spirals for training")
    p.add_argument("--n-test", type=positive_int, default=64, help="spirals for testing")
    p.add_argument("--keep", type=fraction, default=0.6,
                   help="real series: fraction of points kept at random in each window")
    C.add_run_args(p, save_every=50, unit="iterations", prev="<checkpoint>",
                   out="runs/latent_ode")
    args = p.parse_args(argv)
    for flag, method in (("--method", args.method), ("--encoder-method", args.encoder_method)):
        try:
            C.method_type(args.backend)(method)
        except argparse.ArgumentTypeError as exc:
            p.error(f"argument {flag}: {exc}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with C.distributed(device="cpu"):
        return _main(args)


def _main(args: argparse.Namespace) -> dict:
    out = C.make_out(args.out)
    results = {}
    for name in args.data:
        torch.manual_seed(args.seed)
        args.current = name
        train, test, t_split, t_end, info = load_data(name, args)
        args.dim = train[0].x.shape[-1]
        models, res = {}, {}
        for kind in ("latent", "rnn"):
            torch.manual_seed(args.seed)
            model = build(kind, args)
            st = train_model(kind, model, train, t_split, args, out / f"ckpt_{name}_{kind}.pt")
            if not C.is_main():  # rank 0 evaluates and writes outputs
                continue
            model.eval()
            metrics = evaluate(model, test, t_split, args)
            nfe = st["nfe_fwd"][-50:], st["nfe_total"][-50:]
            res[kind] = {**metrics, "train_time": st["train_time"], "iters": st["iter"],
                         "nfe_fwd": sum(nfe[0]) / len(nfe[0]) if nfe[0] else None,
                         "nfe_total": sum(nfe[1]) / len(nfe[1]) if nfe[1] else None,
                         "final_loss": st["losses"][-1] if st["losses"] else math.nan,
                         "world_size": D.get_world_size(),
                         "samples_per_s": (st["iter"] * min(args.batch_size, len(train))
                                           / st["train_time"] if st["train_time"] > 0
                                           else math.nan)}
            for key in ("nfe_fwd_max", "nfe_total_max"):
                if st.get(key):
                    res[kind][key] = sum(st[key][-50:]) / len(st[key][-50:])
            models[kind] = model
            print(f"{name:9s} {kind:6s} extrap MSE {metrics['extrap_mse']:.4f}  interp MSE "
                  f"{metrics['interp_mse']:.4f}  train {st['train_time']:.1f}s")
        if not C.is_main():
            continue
        fig_path = out / f"{name}.png"
        figure(name, models, test, t_split, t_end, info, fig_path, args)
        results[name] = {"models": res, "figure": fig_path.name, "n_train": len(train),
                         "n_test": len(test), "t_split": t_split, "t_end": t_end}
        write_results(out, results, args)
    C.log(f"results: {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
