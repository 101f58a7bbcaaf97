#!/usr/bin/env python
"""A universal differential equation: known physics plus a neural network for what is missing.

Lotka–Volterra data (``x' = αx - βxy``, ``y' = -γy + δxy``; α, β, γ, δ = 1.5, 1, 3, 1) from
several initial states are observed, noisy and at irregular times, over a training window
``[0, --t-train]`` (about one period).  This is the setting of Rackauckas et al. 2020,
"Universal Differential Equations for Scientific Machine Learning", Sec. 2.1, with the
classic parameters.  The model knows the linear growth and decay terms ``αx`` and ``-γy``
(with their values) and learns the interaction terms with a small network ``U_θ(x, y)``::

    x' = αx + U_θ(x, y)[0]        (truth: -βxy)
    y' = -γy + U_θ(x, y)[1]       (truth: +δxy)

trained on the squared error at the observation times, with adjoint gradients (``--gradient
adjoint``, the default): Adam, then optionally LBFGS.  The model starts as the known physics
alone, which grows without bound; fitted over the whole window at once, Adam stalled on a
plateau far above the noise level in our runs, so the fitted window grows during the first
``--grow-iters`` Adam iterations from ``--window0`` times the training window to all of it (a
common curriculum for trajectory fitting; ``--grow-iters 0`` fits the whole window from the
start).  Afterwards the learned term is compared with the true one on a grid over the region
the training data cover (relative RMS error printed and plotted), and the model is
extrapolated to ``--t-extrap``, beyond the training window, next to the truth and to the
known-physics-only model (``U = 0``).

Outputs in ``--out``: results.json (strict JSON), results.md, trajectories.png,
interaction.png, loss.png, ckpt.pt (``--resume`` continues an interrupted run).  Under
``torchrun --nproc_per_node=N`` the series are sharded over the ranks and rank 0 writes outputs.

Examples::

    python examples/ude.py
    python examples/ude.py --backend scipy
    python examples/ude.py --noise 0 --lbfgs-iters 20
    torchrun --nproc_per_node=2 examples/ude.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pydiffbridge import distributed as D  # noqa: E402
from pydiffbridge import odeint  # noqa: E402
from pydiffbridge.fit import FitState, Observations, Trajectories, fit  # noqa: E402

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the examples' _*.py helpers, also when imported from elsewhere
    sys.path.insert(0, HERE)

import _common as C  # noqa: E402
import _sciml_fit as S  # noqa: E402
from _sciml_models import (  # noqa: E402, F401  (re-exported for tests and users)
    ALPHA,
    BETA,
    DELTA,
    GAMMA,
    UDE,
    TrueLV,
    known_physics,
    true_interaction,
    truth_solve,
    ude_data,
)

KEY = ("backend", "method", "gradient", "rtol", "atol", "series", "times", "keep", "t_train",
       "noise", "hidden", "seed", "grow_iters", "window0")


def grid_comparison(model: UDE, obs: Observations, n: int = 41) -> dict:
    """Learned vs true interaction on an ``n x n`` grid over the bounding box of the clean
    training trajectories, and along the trajectories themselves."""
    pts = obs.clean.reshape(-1, 2)
    lo, hi = pts.min(0).values, pts.max(0).values
    xs = torch.linspace(float(lo[0]), float(hi[0]), n, dtype=torch.float64)
    ys = torch.linspace(float(lo[1]), float(hi[1]), n, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([X, Y], -1)
    with torch.no_grad():
        learned, true = model.interaction(grid), true_interaction(grid)
        on_traj = model.interaction(pts) - true_interaction(pts)

    def rel(err: torch.Tensor, ref: torch.Tensor) -> float:
        return float(err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())

    return {"xs": xs, "ys": ys, "learned": learned, "true": true,
            "rel_rms_grid": rel(learned - true, true),
            "rel_rms_grid_components": [rel(learned[..., j] - true[..., j], true[..., j])
                                        for j in range(2)],
            "rel_rms_on_trajectories": rel(on_traj, true_interaction(pts)),
            "box": [lo.tolist(), hi.tolist()]}


def extrapolation(model: UDE, obs: Observations, args) -> dict:
    t = torch.linspace(0.0, args.t_extrap, 301, dtype=torch.float64)
    baseline = UDE(4, model.scale, physics_only=True)
    with torch.no_grad():
        truth = truth_solve(obs.y0, t)
        pred = odeint(model, obs.y0, t, method="dopri5", rtol=1e-8, atol=1e-10)
        base = odeint(baseline, obs.y0, t, method="dopri5", rtol=1e-8, atol=1e-10)
    train = t <= args.t_train

    def rms(a: torch.Tensor, sel: torch.Tensor) -> float:
        return float((a[sel] - truth[sel]).pow(2).mean().sqrt())

    scale = float(truth.pow(2).mean().sqrt())
    return {"t": t, "truth": truth, "pred": pred, "base": base,
            "rms_train_window": rms(pred, train), "rms_extrap_window": rms(pred, ~train),
            "physics_only_rms_train_window": rms(base, train),
            "physics_only_rms_extrap_window": rms(base, ~train), "truth_rms": scale}


def figures(args, obs: Observations, cmp: dict, ext: dict, fit_res: dict, out: Path
            ) -> dict:
    show = list(range(min(2, obs.n_series)))
    fig, axes = plt.subplots(1, len(show), figsize=(5.5 * len(show), 3.6), squeeze=False)
    t = ext["t"]
    for ax, b in zip(axes[0], show, strict=True):
        m = obs.mask[:, b]
        for j, name in enumerate(("prey x", "predator y")):
            col = f"C{j}"
            ax.plot(t, ext["truth"][:, b, j], color=col, lw=1, ls="--", alpha=0.6)
            ax.plot(t, ext["pred"][:, b, j], color=col, lw=1.6, label=f"{name} UDE")
            ax.plot(t, ext["base"][:, b, j], color=col, lw=0.8, ls=":",
                    label=f"{name} physics only")
            ax.scatter(obs.t[m], obs.y[m, b, j], s=12, color=col, edgecolors="k", lw=0.3)
        ax.axvline(args.t_train, color="0.4", lw=0.8)
        ax.set_ylim(-0.5, 1.5 * float(ext["truth"][:, b].max()))
        ax.set_title(f"series {b}: dashed truth, dots data; extrapolation right of the line",
                     fontsize=8)
        ax.set_xlabel("t")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trajectories.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    ext_box = [float(cmp["xs"][0]), float(cmp["xs"][-1]), float(cmp["ys"][0]),
               float(cmp["ys"][-1])]
    pts = obs.clean
    for j, name in enumerate(("-βxy (prey)", "+δxy (predator)")):
        tr, le = cmp["true"][..., j], cmp["learned"][..., j]
        vmin, vmax = float(tr.min()), float(tr.max())
        panels = ((tr, f"true {name}"), (le, f"learned U[{j}]"), ((le - tr).abs(), "|error|"))
        for k, (img, title) in enumerate(panels):
            ax = axes[j, k]
            kw = dict(vmin=vmin, vmax=vmax) if k < 2 else {}
            im = ax.imshow(img.numpy(), origin="lower", extent=ext_box, aspect="auto",
                           cmap="viridis" if k < 2 else "magma", **kw)
            fig.colorbar(im, ax=ax, fraction=0.046)
            for b in range(pts.shape[1]):
                ax.plot(pts[:, b, 0], pts[:, b, 1], color="w", lw=0.6, alpha=0.7)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("x")
            ax.set_ylabel("y")
    fig.suptitle(f"interaction term on the training region (white: training trajectories); "
                 f"relative RMS error {cmp['rel_rms_grid']:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "interaction.png", dpi=110)
    plt.close(fig)

    S.loss_figure(out / "loss.png", [fit_res], None,
                  "iteration (Adam, then LBFGS after the dotted line)")
    return {"trajectories": "trajectories.png", "interaction": "interaction.png",
            "loss": "loss.png"}


def write_results(out: Path, res: dict) -> None:
    a = res["args"]
    lines = [f"# Universal differential equation (Lotka–Volterra), backend {a['backend']}, "
             f"gradient {a['gradient']}", ""]
    if res["status"] != "ok":
        lines += [f"**{res['status']}**: {res['error']}"]
        C.write_report(out, res, lines, default=str)
        return
    c, e, f = res["interaction"], res["extrapolation"], res["fit"]
    lines += [f"{a['series']} series, noise {a['noise']}, training window [0, {a['t_train']}], "
              f"extrapolation to {a['t_extrap']}; {f['iters']} iterations "
              f"({f['evals']} loss evaluations) in {f['train_time']:.1f} s "
              f"({f['samples_per_s']:.1f} samples/s, {res['world_size']} process(es)).", "",
              "| learned interaction vs truth | relative RMS error |", "|---|---|",
              f"| grid over the training region | {c['rel_rms_grid']:.4f} |",
              f"| prey term -βxy | {c['rel_rms_grid_components'][0]:.4f} |",
              f"| predator term +δxy | {c['rel_rms_grid_components'][1]:.4f} |",
              f"| along the training trajectories | {c['rel_rms_on_trajectories']:.4f} |", "",
              "| state RMS error vs truth | UDE | known physics only |", "|---|---|---|",
              f"| training window | {e['rms_train_window']:.4f} | "
              f"{e['physics_only_rms_train_window']:.4f} |",
              f"| extrapolation window | {e['rms_extrap_window']:.4f} | "
              f"{e['physics_only_rms_extrap_window']:.4f} |", "",
              f"(RMS of the true states: {e['truth_rms']:.3f})", "",
              "![trajectories](trajectories.png)", "", "![interaction](interaction.png)", "",
              "![loss](loss.png)"]
    C.write_report(out, res, lines, default=str)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, data, opt = S.make_parser(
        __doc__, out="runs/ude", rtol=1e-4, atol=1e-6, series=4, times=20, keep=0.7,
        noise=0.02, adam_iters=150, lr=0.02, lbfgs_iters=5, patience=0,
        patience_help="; counted from the start, so keep it above --grow-iters")
    data.add_argument("--t-train", type=float, default=3.0, help="end of the training window")
    data.add_argument("--t-extrap", type=float, default=6.0, help="end of the extrapolation")
    p.add_argument("--hidden", type=int, default=32, help="width of the network's layers")
    opt.add_argument("--grow-iters", type=int, default=100,
                     help="Adam iterations over which the fitted window grows to --t-train")
    opt.add_argument("--window0", type=float, default=0.3,
                     help="initial fitted window, as a fraction of --t-train")
    args = S.parse(p, argv)
    if args.t_extrap <= args.t_train:
        p.error("--t-extrap must be after --t-train")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with C.distributed(device="cpu") as info:
        return _main(args, info)


def _main(args: argparse.Namespace, info: D.DistInfo) -> dict:
    out = C.make_out(args.out)
    torch.manual_seed(args.seed)
    obs = ude_data(args)
    scale = obs.scale()
    torch.manual_seed(args.seed)
    model = UDE(args.hidden, scale).double()
    sim = Trajectories(model, method=args.method, rtol=args.rtol, atol=args.atol,
                       gradient=args.gradient, backend=args.backend)
    failure = S.backend_failure(lambda: odeint(model, obs.y0[:1], obs.t[:2], method=args.method,
                                               backend=args.backend), args.backend)
    if failure is not None:
        msg = ": ".join(failure)
        if info.is_main:
            write_results(out, {"status": "backend_unavailable", "error": msg,
                                "args": vars(args)})
        return {"status": "backend_unavailable", "error": msg}
    local_all = obs.select(S.shard_series(obs.n_series))
    ckpt = out / "ckpt.pt"
    saved, key = S.load_saved(ckpt, args, KEY)
    if saved is not None:
        model.load_state_dict(saved["model"])
        sim.nfe_forward_total, sim.nfe_backward_total = saved["nfe"]
    ddp = C.wrap(sim)
    world = info.world_size

    def window(it: int) -> float:
        """End of the fitted window at iteration ``it`` (0-based; LBFGS: the whole window)."""
        if it >= min(args.grow_iters, args.adam_iters):
            return args.t_train
        return args.t_train * (args.window0 + (1 - args.window0) * it / args.grow_iters)

    current = {"it": len(saved["fit"]["losses"]) if saved else 0}

    def loss_fn() -> torch.Tensor:
        t_max = window(current["it"])
        local = local_all.until(t_max)
        n_global = obs.until(t_max).n_obs  # every rank holds all series: no collective needed
        return local.sse(ddp(local.y0, local.t), scale) * (world / n_global)

    def on_iter(st: FitState) -> None:
        current["it"] = len(st.losses)

    def save(st: FitState) -> None:
        C.save({"key": key, "model": model.state_dict(), "fit": st.to_dict(),
                "nfe": list(sim.nfe())}, ckpt)

    t0 = time.perf_counter()
    st = fit(loss_fn, ddp.parameters(), S.fit_config(args),
             state=saved["fit"] if saved else None, save=save, on_iter=on_iter,
             desc=f"UDE/{args.backend}", progress=not args.no_progress)
    wall = time.perf_counter() - t0
    model.eval()
    cmp = grid_comparison(model, obs)
    ext = extrapolation(model, obs, args)
    fit_res = {**S.fit_record(st, obs.n_series, D.aggregate_nfe(*sim.nfe())),
               "wall_time": wall}
    res = {"status": "ok", "error": None, "args": vars(args), "world_size": world,
           "fit": fit_res,
           "interaction": {k: v for k, v in cmp.items() if k.startswith("rel_") or k == "box"},
           "extrapolation": {k: v for k, v in ext.items() if k.startswith(("rms", "physics",
                                                                              "truth_rms"))}}
    if info.is_main:
        res["figures"] = figures(args, obs, cmp, ext, fit_res, out)
        write_results(out, res)
        print(f"UDE on backend {args.backend}: {fit_res['iters']} iterations in "
              f"{st.train_time:.1f}s ({world} process(es), {fit_res['samples_per_s']:.1f} "
              f"samples/s), final loss {fit_res['final_loss']:.4g}")
        print(f"  learned interaction vs truth, relative RMS error on the training region: "
              f"{cmp['rel_rms_grid']:.4f} (prey {cmp['rel_rms_grid_components'][0]:.4f}, "
              f"predator {cmp['rel_rms_grid_components'][1]:.4f}); along the training "
              f"trajectories {cmp['rel_rms_on_trajectories']:.4f}")
        print(f"  state RMS error: training window {ext['rms_train_window']:.4f}, "
              f"extrapolation window (t in ({args.t_train}, {args.t_extrap}]) "
              f"{ext['rms_extrap_window']:.4f}; known physics only: "
              f"{ext['physics_only_rms_train_window']:.4f} / "
              f"{ext['physics_only_rms_extrap_window']:.4f}")
        print(f"results: {out / 'results.md'}")
    return res


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res.get("status") == "ok" else 2)
