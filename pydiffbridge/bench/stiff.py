"""``python -m pydiffbridge bench --preset stiff``: work-precision of the native stiff methods
against SciPy's Radau, BDF and LSODA on Robertson, Van der Pol (mu = 1000) and HIRES.

Single problems: every method over a tolerance sweep (``rtol``; ``atol = rtol * scale`` per
problem), measuring wall time (median of ``--repeats`` runs after a warm-up), steps, NFE and
the achieved error ``max |y - y_ref| / (rtol_ref-free units: |y_ref| + scale)`` against SciPy
Radau at rtol 1e-10.  SciPy gets the analytic Jacobian (its best case); ours uses autograd.

Batched: ``--batch`` independent copies with perturbed initial states
(:func:`~pydiffbridge.bench.stiff_problems.ensemble`): ours two ways, as one solve of the
``(B, n)`` state with per-sample steps (``batch_dims=1``, methods ``rodas5/per-sample`` and
``auto/per-sample``, the latter switching per sample between tsit5 and rodas5) and with one
shared step size and a block-diagonal Jacobian (``options={"jac_blocks": B}``, method
``rodas5/shared``); the rodas5 runs make ``B`` LU factorisations of ``n x n`` per step.
SciPy solves the ``B`` problems one at a time (its per-problem steps; the time is the sum).
Steps of a per-sample run: the most any sample took; NFE: the sum over samples.  The error is
the worst of the first and last sample against their own Radau references.

Ratios are "at equal achieved error": for each SciPy run, ours' time at the same error is
read off its work-precision curve (log-log linear interpolation, no extrapolation), and the
ratio is ``time ours / time SciPy`` (< 1: ours is faster); outside ours' range, ours' cheapest
run that was at least as accurate gives an upper bound ("<=").  Writes ``stiff.json`` (strict
JSON, atomically) and ``stiff.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .stiff_problems import STIFF_PROBLEMS, StiffProblem, ensemble

__all__ = ["main", "run_stiff_bench"]

OURS = ("rodas4", "rodas5", "kvaerno5", "auto")
SCIPY = ("Radau", "BDF", "LSODA")


def _timed(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _reference(p: StiffProblem, y0: np.ndarray, t: np.ndarray) -> np.ndarray:
    r = solve_ivp(p.rhs_np, (0.0, p.t_end), y0, method="Radau", t_eval=t, rtol=1e-10,
                  atol=1e-12 * p.atol_scale, jac=p.jac_np)
    if not r.success:
        raise RuntimeError(f"reference solve of {p.name} failed: {r.message}")
    return r.y.T


def _error(ys: np.ndarray, ref: np.ndarray, scale: float) -> float:
    """Worst error relative to ``|y_ref| + scale`` (the atol/rtol ratio of the problem)."""
    return float(np.max(np.abs(ys - ref) / (np.abs(ref) + scale)))


def _ours(p, y0, t, method, rtol, opts, batch_dims=None):
    import pydiffbridge as pdb

    def run():
        with torch.no_grad():
            return pdb.solve(p.rhs, y0, t, method=method, rtol=rtol, atol=rtol * p.atol_scale,
                             options=opts, batch_dims=batch_dims)
    return run


def _scipy_one(p, y0, t, method, rtol):
    def run():
        return solve_ivp(p.rhs_np, (0.0, p.t_end), y0, method=method, t_eval=t, rtol=rtol,
                         atol=rtol * p.atol_scale, jac=p.jac_np)
    return run


def run_stiff_bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(max(1, args.threads))
    rows = []
    for name in args.problems:
        p = STIFF_PROBLEMS[name]
        t = p.times(6)
        tn = t.numpy()
        y0 = torch.tensor(p.y0, dtype=torch.float64)
        ref = _reference(p, np.array(p.y0), tn)
        for tol in args.tols:
            for m in OURS:
                sec, sol = _timed(_ours(p, y0, t, m, tol, {}), args.repeats)
                rows.append(dict(problem=name, mode="single", solver="torch", method=m, rtol=tol,
                                 ok=bool(sol.success), time_s=sec, steps=int(sol.stats.steps),
                                 nfe=int(sol.stats.nfe),
                                 error=_error(sol.ys.numpy(), ref, p.atol_scale)))
            for m in SCIPY:
                sec, r = _timed(_scipy_one(p, np.array(p.y0), tn, m, tol), args.repeats)
                rows.append(dict(problem=name, mode="single", solver="scipy", method=m, rtol=tol,
                                 ok=bool(r.success), time_s=sec, steps=None, nfe=int(r.nfev),
                                 error=_error(r.y.T, ref, p.atol_scale)))
            if args.progress:
                print(f"  {name} rtol={tol:g}: single done", flush=True)
        if args.batch:
            B = args.batch
            yb = ensemble(p, B)
            refs = {b: _reference(p, yb[b].numpy(), tn) for b in (0, B - 1)}
            for tol in args.batch_tols:
                for how, run in (
                        ("rodas5/per-sample", _ours(p, yb, t, "rodas5", tol, {}, 1)),
                        ("auto/per-sample", _ours(p, yb, t, "auto", tol, {}, 1)),
                        ("rodas5/shared", _ours(p, yb, t, "rodas5", tol, {"jac_blocks": B}))):
                    sec, sol = _timed(run, 1)
                    err = max(_error(sol.ys[:, b].numpy(), refs[b], p.atol_scale) for b in refs)
                    steps, nfe = torch.as_tensor(sol.stats.steps), torch.as_tensor(sol.stats.nfe)
                    rows.append(dict(problem=name, mode=f"batch{B}", solver="torch",
                                     method=how, rtol=tol, ok=bool(sol.success),
                                     time_s=sec, steps=int(steps.max()), nfe=int(nfe.sum()),
                                     error=err))
                for m in SCIPY:
                    def loop(m=m, tol=tol, p=p, yb=yb, tn=tn, B=B):
                        return [_scipy_one(p, yb[b].numpy(), tn, m, tol)() for b in range(B)]
                    sec, rs = _timed(loop, 1)
                    err = max(_error(rs[b].y.T, refs[b], p.atol_scale) for b in refs)
                    rows.append(dict(problem=name, mode=f"batch{B}", solver="scipy", method=m,
                                     rtol=tol, ok=all(r.success for r in rs), time_s=sec,
                                     steps=None, nfe=int(sum(r.nfev for r in rs)), error=err))
                if args.progress:
                    print(f"  {name} rtol={tol:g}: batch of {B} done", flush=True)
    return dict(rows=rows, ratios=_ratios(rows), batch=args.batch,
                torch_threads=torch.get_num_threads(), torch=torch.__version__)


def _interp_time(curve, err):
    """Time at achieved error ``err`` on a (error, time) curve (log-log, no extrapolation)."""
    pts = sorted((e, s) for e, s in curve if e > 0 and s > 0)
    for (e0, s0), (e1, s1) in zip(pts, pts[1:], strict=False):
        if e0 <= err <= e1 and e1 > e0:
            w = (math.log(err) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(s0) + w * (math.log(s1) - math.log(s0)))
    return None


def _ratios(rows):
    out = []
    for key in sorted({(r["problem"], r["mode"]) for r in rows}):
        sub = [r for r in rows if (r["problem"], r["mode"]) == key and r["ok"]]
        for ours in sorted({r["method"] for r in sub if r["solver"] == "torch"}):
            curve = [(r["error"], r["time_s"]) for r in sub if r["method"] == ours
                     and r["solver"] == "torch"]
            for r in sub:
                if r["solver"] != "scipy":
                    continue
                t_ours, how = _interp_time(curve, r["error"]), "interpolated"
                if t_ours is None:  # outside ours' range: ours' cheapest run at least as
                    better = [s for e, s in curve if e <= r["error"]]  # accurate (an upper
                    t_ours, how = (min(better), "bound") if better else (None, "none")  # bound)
                out.append(dict(problem=key[0], mode=key[1], ours=ours, scipy=r["method"],
                                rtol_scipy=r["rtol"], error=r["error"], time_scipy_s=r["time_s"],
                                time_ours_s=t_ours, how=how,
                                ratio=None if t_ours is None else t_ours / r["time_s"]))
    return out


def to_markdown(res: dict) -> str:
    lines = ["| problem | mode | solver/method | rtol | error | time (s) | steps | NFE |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['problem']} | {r['mode']} | {r['solver']}/{r['method']} | "
                     f"{r['rtol']:g} | {r['error']:.2e} | {r['time_s']:.4f} | "
                     f"{r['steps'] if r['steps'] is not None else '-'} | {r['nfe']} |"
                     + ("" if r["ok"] else " FAILED"))
    lines += ["", "Time ratio ours / SciPy at equal achieved error (< 1: ours faster; "
              "'<= r': "
              "SciPy's error lies outside ours' measured range, r uses ours' cheapest run that "
              "was at least as accurate; '-': none was):", "",
              "| problem | mode | ours | SciPy (rtol) | error | ratio |",
              "|---|---|---|---|---|---|"]
    for q in res["ratios"]:
        ratio = "-" if q["ratio"] is None else (
            ("<= " if q["how"] == "bound" else "") + f"{q['ratio']:.2f}")
        lines.append(f"| {q['problem']} | {q['mode']} | {q['ours']} | {q['scipy']} "
                     f"({q['rtol_scipy']:g}) | {q['error']:.2e} | {ratio} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from ..cli import choice_list, comma_list, nonneg_int, output_dir, positive_int, tolerance

    ap = argparse.ArgumentParser(prog="pydiffbridge bench --preset stiff",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--problems", type=choice_list(tuple(STIFF_PROBLEMS)),
                    default=",".join(STIFF_PROBLEMS))
    ap.add_argument("--tols", type=comma_list(tolerance), default="1e-4,1e-6,1e-8")
    ap.add_argument("--batch", type=nonneg_int, default=64, help="0: no batched runs")
    ap.add_argument("--batch-tols", type=comma_list(tolerance), default="1e-4,1e-6")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    ap.add_argument("--out", type=output_dir, default="runs/bench_stiff")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def main(argv: list[str] | None = None) -> int:
    from .report import save_report

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run_stiff_bench(args)
    md = to_markdown(res)
    paths = save_report(res, md, out, "stiff")
    print(md)
    print(f"wrote {', '.join(map(str, paths))}")
    return 0
