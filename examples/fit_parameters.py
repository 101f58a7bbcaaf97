#!/usr/bin/env python
"""Recover the parameters of a known ODE model from noisy, irregularly sampled observations.

The model is known, its parameters θ are not: Lotka–Volterra predator–prey dynamics
(``--model lv``; θ = α, β, δ, γ in ``x' = αx - βxy``, ``y' = δxy - γy``) or the SIR epidemic
(``--model sir``; θ = β, γ in ``S' = -βSI``, ``I' = βSI - γI``, ``R' = γI``).  Several series
with different, known initial states are simulated with the true θ at tight tolerance; each
series is observed at its own random subset of random times, with Gaussian noise
(``--noise`` times each component's spread).

θ is fitted (in log space, so it stays positive) by minimising the squared error at the
observation times, with gradients from the adjoint method (``--gradient adjoint``, the
default): Adam, then optionally LBFGS (``--lbfgs-iters``).  Several random restarts
(``--restarts``) give the confidence: each restart starts from its own log-uniform initial
guess *and* sees its own noise draw on the same series and times (a parametric bootstrap;
``--same-noise`` keeps one draw, and the spread then only measures the optimiser).  The
recovered θ is reported as the mean ± standard deviation over the restarts that converged
(final loss within ``--converged-factor`` of the median), next to the truth.  Every backend
runs the same fit (``--backend torch|scipy|julia``); where Julia is not available the script
says why and exits with status 2.

Outputs in ``--out``: results.json (strict JSON), results.md, fit.png (data vs fit), loss.png
(loss curves), ckpt.pt (``--resume`` continues an interrupted run, mid-restart).  Under
``torchrun --nproc_per_node=N`` the series are sharded over the ranks (gloo on CPU, nccl on
GPU), DDP averages the adjoint gradients, and rank 0 writes the outputs.

Examples::

    python examples/fit_parameters.py                        # Lotka-Volterra, torch backend
    python examples/fit_parameters.py --model sir --backend scipy
    python examples/fit_parameters.py --lbfgs-iters 10 --restarts 5
    torchrun --nproc_per_node=2 examples/fit_parameters.py --series 16
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

from pydiffbridge import distributed as D  # noqa: E402
from pydiffbridge import odeint  # noqa: E402
from pydiffbridge.fit import FitState, Observations, Trajectories, fit  # noqa: E402

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the examples' _*.py helpers, also when imported from elsewhere
    sys.path.insert(0, HERE)

import _common as C  # noqa: E402
import _sciml_fit as S  # noqa: E402
from _sciml_models import (  # noqa: E402, F401  (re-exported for tests and users)
    MODELS,
    SIR,
    T_END,
    LotkaVolterra,
    parametric_data,
    simulate_truth,
)

KEY = ("model", "backend", "method", "gradient", "series", "same_noise", "rtol", "atol",
       "times", "keep", "t_end", "noise", "seed", "init_low",
       "init_high")  # not restarts: --resume may add some


def initial_guess(args: argparse.Namespace, k: int) -> torch.Tensor:
    """Log-uniform in ``[--init-low, --init-high]`` per parameter; the same on every rank."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + 17 + k)
    n = len(MODELS[args.model].names)
    lo, hi = math.log(args.init_low), math.log(args.init_high)
    return torch.exp(lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64))


def check_backend(args: argparse.Namespace, obs: Observations) -> tuple[str, str] | None:
    """A two-point solve on the chosen backend: fails fast (JuliaUnavailableError) if the
    engine cannot run here."""
    rhs = MODELS[args.model](torch.tensor(MODELS[args.model].truth, dtype=torch.float64))
    return S.backend_failure(lambda: odeint(rhs, obs.y0[:1], obs.t[:2], method=args.method,
                                            backend=args.backend, rtol=args.rtol,
                                            atol=args.atol), args.backend)


def restart_data(args: argparse.Namespace, obs: Observations, k: int) -> Observations:
    """Restart ``k``'s observations: a fresh noise draw (unless ``--same-noise``)."""
    if args.same_noise or k == 0:
        return obs
    return obs.with_noise(args.noise, torch.Generator().manual_seed(args.seed * 1000 + 503 + k))


def run_restart(k: int, args, obs: Observations, mine: list[int], resume: dict | None,
                save_ckpt) -> dict:
    """One fit from the ``k``-th initial guess on the ``k``-th noise draw, this rank on its
    series ``mine``; returns its result."""
    cls = MODELS[args.model]
    obs = restart_data(args, obs, k)
    local = obs.select(mine)
    n_global = D.global_count(local.n_obs)
    scale = obs.scale()  # from all series, the same on every rank
    world = D.get_world_size()
    theta0 = initial_guess(args, k)
    # the solver gets the model's right-hand side, DDP wraps the Trajectories module around it
    sim = Trajectories(cls(theta0), method=args.method, rtol=args.rtol, atol=args.atol,
                       gradient=args.gradient, backend=args.backend)
    if resume is not None:
        sim.func.load_state_dict(resume["rhs"])
        sim.nfe_forward_total, sim.nfe_backward_total = resume["nfe"]
    model = C.wrap(sim)

    def loss_fn() -> torch.Tensor:
        pred = model(local.y0, local.t)
        return local.sse(pred, scale) * (world / n_global)

    def save(st: FitState) -> None:
        save_ckpt({"restart": k, "rhs": sim.func.state_dict(), "fit": st.to_dict(),
                   "nfe": list(sim.nfe())})

    st = fit(loss_fn, model.parameters(), S.fit_config(args),
             state=resume["fit"] if resume else None, save=save,
             desc=f"{args.model}/{args.backend} restart {k + 1}/{args.restarts}",
             progress=not args.no_progress)
    theta = torch.exp(sim.func.log_theta.detach())
    return {"restart": k, "theta0": theta0.tolist(), "theta": theta.tolist(),
            **S.fit_record(st, obs.n_series, D.aggregate_nfe(*sim.nfe()))}
def summarise(args, restarts: list[dict]) -> dict:
    cls = MODELS[args.model]
    losses = [r["final_loss"] for r in restarts]
    finite = [x for x in losses if math.isfinite(x)]
    best = min(finite) if finite else math.nan
    med = float(torch.tensor(finite).median()) if finite else math.nan
    conv = [r for r in restarts if math.isfinite(r["final_loss"])
            and r["final_loss"] <= args.converged_factor * med]
    th = torch.tensor([r["theta"] for r in conv], dtype=torch.float64)
    mean = th.mean(0) if len(conv) else torch.full((len(cls.names),), math.nan)
    std = th.std(0) if len(conv) > 1 else torch.zeros(len(cls.names))
    truth = torch.tensor(cls.truth, dtype=torch.float64)
    params = {}
    for i, name in enumerate(cls.names):
        params[name] = {"true": float(truth[i]), "mean": float(mean[i]), "std": float(std[i]),
                        "rel_error": float((mean[i] - truth[i]).abs() / truth[i])}
    return {"params": params, "best_loss": best, "median_loss": med,
            "n_converged": len(conv), "converged": [r["restart"] for r in conv],
            "n_restarts": len(restarts),
            "best_restart": min(range(len(restarts)), key=lambda j: (
                not math.isfinite(restarts[j]["final_loss"]), restarts[j]["final_loss"]))}


def figures(args, obs: Observations, restarts: list[dict], summary: dict, out: Path) -> dict:
    cls = MODELS[args.model]
    best = restarts[summary["best_restart"]]
    dense = torch.linspace(float(obs.t[0]), float(obs.t[-1]), 300, dtype=torch.float64)
    truth_sim = simulate_truth(cls, torch.tensor(cls.truth, dtype=torch.float64))
    fit_sim = simulate_truth(cls, torch.tensor(best["theta"], dtype=torch.float64))
    show = list(range(min(3, obs.n_series)))
    with torch.no_grad():
        yt, yf = truth_sim(obs.y0[show], dense), fit_sim(obs.y0[show], dense)
    d = len(cls.states)
    fig, axes = plt.subplots(1, len(show), figsize=(4.5 * len(show), 3.4), squeeze=False)
    for ax, b in zip(axes[0], show, strict=True):
        m = obs.mask[:, b]
        for j in range(d):
            col = f"C{j}"
            ax.plot(dense, yt[:, b, j], color=col, lw=1, alpha=0.5, ls="--")
            ax.plot(dense, yf[:, b, j], color=col, lw=1.5, label=f"{cls.states[j]} fit")
            ax.scatter(obs.t[m], obs.y[m, b, j], s=12, color=col, edgecolors="k", lw=0.3)
        ax.set_title(f"series {b}: dots observed, dashed truth", fontsize=9)
        ax.set_xlabel("t")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fit.png", dpi=110)
    plt.close(fig)
    S.loss_figure(out / "loss.png", restarts, [f"restart {r['restart'] + 1}" for r in restarts],
                  "iteration (Adam, then LBFGS steps after the dotted line)")
    return {"fit": "fit.png", "loss": "loss.png"}


def write_results(out: Path, args, obs: Observations, restarts: list[dict], summary: dict,
                  status: str = "ok", error: str | None = None) -> None:
    res = {"status": status, "error": error, "args": vars(args),
           "data": {"series": obs.n_series if obs else None,
                    "observed_values": obs.n_obs if obs else None},
           "summary": summary, "restarts": restarts}
    lines = [f"# Parameter recovery: {args.model}, backend {args.backend}, "
             f"gradient {args.gradient}", ""]
    if status != "ok":
        lines += [f"**{status}**: {error}", ""]
    else:
        lines += [f"{summary['n_converged']} of {summary['n_restarts']} restarts converged (final "
                  f"loss within a factor {args.converged_factor} of the median "
                  f"{summary['median_loss']:.4g}); "
                  f"{'one noise draw' if args.same_noise else 'a fresh noise draw per restart'}, "
                  f"noise {args.noise}, {obs.n_series} series, {obs.n_obs} observed values.",
                  "", "| parameter | true | recovered (mean ± std) | rel. error |",
                  "|---|---|---|---|"]
        for name in MODELS[args.model].names:
            p = summary["params"][name]
            lines.append(f"| {name} | {p['true']:.4g} | {p['mean']:.4f} ± {p['std']:.4f} | "
                         f"{100 * p['rel_error']:.2f} % |")
        lines += ["", "| restart | final loss | iterations | evaluations | time (s) | "
                  "samples/s | NFE fwd (sum over ranks) | NFE bwd |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in restarts:
            lines.append(f"| {r['restart'] + 1} | {r['final_loss']:.4g} | {r['iters']} | "
                         f"{r['evals']} | {r['train_time']:.1f} | {r['samples_per_s']:.1f} | "
                         f"{r['nfe']['forward']['sum']:.0f} | {r['nfe']['backward']['sum']:.0f} |")
        lines += ["", "![fit](fit.png)", "", "![loss](loss.png)"]
    C.write_report(out, res, lines, default=str)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, data, opt = S.make_parser(__doc__, out="runs/fit_parameters", rtol=1e-5, atol=1e-7,
                                 series=8, times=30, keep=0.5, noise=0.05, adam_iters=80,
                                 lr=0.1, lbfgs_iters=4, patience=20)
    p.add_argument("--model", choices=sorted(MODELS), default="lv")
    data.add_argument("--t-end", type=float, default=None,
                      help="end of the observation window (default: 6 for lv, 25 for sir)")
    data.add_argument("--same-noise", action="store_true",
                      help="one noise draw for all restarts (spread = optimiser only)")
    opt.add_argument("--restarts", type=int, default=4, help="random initial guesses")
    opt.add_argument("--init-low", type=float, default=0.3, help="initial guesses: lower bound")
    opt.add_argument("--init-high", type=float, default=3.0,
                     help="initial guesses: upper bound")
    opt.add_argument("--converged-factor", type=float, default=2.0,
                     help="restarts whose final loss is within this factor of the median count")
    args = S.parse(p, argv)
    if args.t_end is None:
        args.t_end = T_END[args.model]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with C.distributed(device="cpu") as info:
        return _main(args, info)


def _main(args: argparse.Namespace, info: D.DistInfo) -> dict:
    out = C.make_out(args.out)
    torch.manual_seed(args.seed)
    obs = parametric_data(args)
    failure = check_backend(args, obs)
    if failure is not None:
        if info.is_main:
            write_results(out, args, obs, [], {}, status="backend_unavailable",
                          error=": ".join(failure))
        return {"status": "backend_unavailable", "error": failure[1]}
    mine = S.shard_series(obs.n_series)
    ckpt = out / "ckpt.pt"
    saved, key = S.load_saved(ckpt, args, KEY)
    done: list[dict] = saved["done"] if saved else []
    current = saved.get("current") if saved else None

    def save_ckpt(cur: dict | None) -> None:
        C.save({"key": key, "done": done, "current": cur}, ckpt)

    t_start = time.perf_counter()
    for k in range(len(done), args.restarts):
        resume = current if current is not None and current["restart"] == k else None
        done.append(run_restart(k, args, obs, mine, resume, save_ckpt))
        current = None
        save_ckpt(None)
        r = done[-1]
        th = ", ".join(f"{n}={v:.4f}" for n, v in zip(MODELS[args.model].names, r["theta"],
                                                       strict=True))
        C.log(f"restart {k + 1}/{args.restarts}: {th}  loss {r['final_loss']:.4g}  "
              f"({r['evals']} evals, {r['train_time']:.1f}s, {r['stop_reason']})")
    wall = time.perf_counter() - t_start
    summary = summarise(args, done)
    summary["fit_time_s"] = sum(r["train_time"] for r in done)
    summary["wall_time_s"] = wall
    summary["world_size"] = info.world_size
    total_evals = sum(r["evals"] for r in done)
    summary["samples_per_s"] = (total_evals * obs.n_series / summary["fit_time_s"]
                                if summary["fit_time_s"] > 0 else math.nan)
    if info.is_main:
        summary["figures"] = figures(args, obs, done, summary, out)
        write_results(out, args, obs, done, summary)
        print(f"\n{args.model} on backend {args.backend} ({summary['n_converged']}/"
              f"{summary['n_restarts']} restarts converged, fit time "
              f"{summary['fit_time_s']:.1f}s, {info.world_size} process(es), "
              f"{summary['samples_per_s']:.1f} samples/s):")
        print(f"  {'param':8s} {'true':>8s} {'recovered (mean ± std)':>24s} {'rel err':>8s}")
        for name, p in summary["params"].items():
            print(f"  {name:8s} {p['true']:8.4f} {p['mean']:14.4f} ± {p['std']:<7.4f} "
                  f"{100 * p['rel_error']:7.2f}%")
        print(f"results: {out / 'results.md'}")
    return {"status": "ok", "summary": summary, "restarts": done}


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res.get("status") == "ok" else 2)
