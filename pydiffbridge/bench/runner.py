"""``python -m pydiffbridge bench`` / ``pydiffbridge-bench``: solvers side by side.

For every problem × solver × method × tolerance: NFE, steps, median wall time over
``--repeats`` runs (after one warm-up), error against the problem's own reference, peak memory
and the solver overhead per step, ``(time - NFE * t_func) / steps`` with ``t_func`` the
measured cost of one call of the right-hand side.  Writes ``results.md``, ``results.json`` and
``work_precision.png`` (error vs time over the tolerance sweep) to ``--out``.

Solvers: ours on each available backend (``torch`` with ``--batch-mode shared`` and/or
``per-sample`` stepping, ``scipy``, ``julia``), and the peers torchdiffeq and torchode when
installed.  NFE and steps of per-sample solvers (ours per-sample, torchode) are those of the
batch loop: the maximum over samples (``steps_mean`` gives the mean).  torchdiffeq reports no
step count: its steps are derived from NFE for FSAL methods, ``(nfe - 2) / 6``.

Memory: on CUDA the peak allocated memory of a timed run; on CPU (no allocator statistics)
the memory that direct backprop saves for backward, measured in one extra run with autograd.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .problems import PROBLEMS, Problem, make_problem
from .report import plot, save_report, to_markdown

__all__ = ["main", "run_bench"]

PRESETS = {
    "mlp": dict(problems="mlp", methods="dopri5,tsit5", tols="1e-3,1e-6,1e-9",
                backends="torch", peers="torchdiffeq,torchode", batch_mode="shared",
                threads=1),
    "vdp": dict(problems="vdp", methods="dopri5,tsit5", tols="1e-5,1e-7", backends="torch",
                peers="torchode", batch_mode="both"),
    # a runner of its own (pydiffbridge/bench/stiff.py); the other arguments go to it
    "stiff": {},
}


PEERS = ("torchdiffeq", "torchode")


def _names(value) -> list:
    """A comma list as parsed by the CLI (a list), or still a string (programmatic use)."""
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    return list(value)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _counting(func: Callable) -> tuple[Callable, list[int]]:
    n = [0]

    def f(t, y):
        n[0] += 1
        return func(t, y)

    return f, n


def _as_int(v, how="max") -> int:
    if isinstance(v, torch.Tensor):
        return int(v.max()) if how == "max" else float(v.float().mean())
    return int(v)


def solver_table(p: Problem, backends: list[str], peers: list[str], batch_mode: str,
                 compile_step: bool = False) -> dict[str, Callable]:
    """``{label: run(method, tol) -> (ys (T, B, d), nfe, steps, steps_mean)}``."""
    import pydiffbridge as pdb

    out: dict[str, Callable] = {}
    big = {"max_num_steps": 10**6}
    for be in backends:
        modes = ["shared", "per-sample"] if batch_mode == "both" else [batch_mode]
        if compile_step and "per-sample" in modes:
            modes.append("per-sample/compiled")  # side by side with the plain per-sample loop
        for mode in modes if be == "torch" else ["shared"]:
            label = f"ours-{be}" + ("" if mode == "shared" else f"/{mode}")

            def run(method, tol, be=be, mode=mode):
                opts = dict(big)
                if mode == "per-sample/compiled":
                    opts["compile"] = True
                s = pdb.solve(p.func, p.y0, p.t, rtol=tol, atol=tol, method=method, backend=be,
                              options=opts, batch_dims=None if mode == "shared" else 1)
                if not s.success:
                    raise RuntimeError(s.message)
                return s.ys, _as_int(s.stats.nfe), _as_int(s.stats.steps), \
                    _as_int(s.stats.steps, "mean")

            out[label] = run
    if "torchdiffeq" in peers:
        try:
            import torchdiffeq
        except ImportError:
            torchdiffeq = None
        if torchdiffeq is not None:
            def run_tdq(method, tol):
                f, n = _counting(p.func)
                ys = torchdiffeq.odeint(f, p.y0, p.t, rtol=tol, atol=tol, method=method)
                steps = (n[0] - 2) / 6 if method in ("dopri5", "tsit5") else float("nan")
                return ys, n[0], steps, steps

            out["torchdiffeq"] = run_tdq
    if "torchode" in peers:
        try:
            import torchode
        except ImportError:
            torchode = None
        if torchode is not None:
            def run_to(method, tol):
                term = torchode.ODETerm(p.func)
                step = {"dopri5": torchode.Dopri5, "tsit5": torchode.Tsit5}[method](term=term)
                ctrl = torchode.IntegralController(atol=tol, rtol=tol, term=term)
                solver = torchode.AutoDiffAdjoint(step, ctrl, max_steps=10**6)
                B = p.y0.shape[0]
                sol = solver.solve(torchode.InitialValueProblem(
                    y0=p.y0, t_eval=p.t.expand(B, -1)))
                if not bool((sol.status == 0).all()):
                    raise RuntimeError(f"torchode status {sol.status.unique().tolist()}")
                return sol.ys.transpose(0, 1), _as_int(sol.stats["n_f_evals"]), \
                    _as_int(sol.stats["n_steps"]), _as_int(sol.stats["n_steps"], "mean")

            out["torchode"] = run_to
    return out


def _func_time(p: Problem, device: str, n: int = 50) -> float:
    y = p.y0
    t = p.t[0]
    with torch.no_grad():
        for _ in range(3):
            p.func(t, y)
        _sync(device)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            p.func(t, y)
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _memory_mb(run: Callable, method: str, tol: float, p: Problem, device: str) -> float | None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            run(method, tol)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    seen: dict[int, int] = {}

    def pack(x):
        try:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return x

    y0 = p.y0
    p.y0 = y0.detach().clone().requires_grad_(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            run(method, tol)
    except Exception:  # noqa: BLE001 - e.g. an engine that cannot backpropagate directly
        return None
    finally:
        p.y0 = y0
    return sum(seen.values()) / 2**20


def run_bench(args: argparse.Namespace) -> dict:
    """Run the configured sweep; returns ``{"meta": ..., "rows": [...]}``."""
    from tqdm.auto import tqdm

    from ..backends.base import available_backends

    if args.threads:
        torch.set_num_threads(args.threads)
    avail = available_backends()
    backends = _names(args.backends)
    skipped = {b: avail.get(b, "unknown backend") for b in backends if avail.get(b, "?") != ""}
    backends = [b for b in backends if b not in skipped]
    peers = _names(args.peers)
    methods = _names(args.methods)
    tols = [float(x) for x in _names(args.tols)]
    rows = []
    dtype = getattr(torch, args.dtype)
    problems = [make_problem(name, args.device, dtype) for name in _names(args.problems)]
    groups = []
    for p in problems:
        table = solver_table(p, backends, peers, args.batch_mode, args.compile)
        for method in methods:
            for tol in tols:
                groups.append((p, method, tol, table))
    # solvers of one (problem, method, tol) group are timed round-robin, so that a change in
    # machine load hits them alike; the cost of one func call is re-measured per group
    for p, method, tol, table in tqdm(groups, desc="bench", disable=args.no_progress):
        res: dict[str, dict] = {}
        times: dict[str, list[float]] = {}
        with torch.no_grad():
            for label, run in table.items():
                res[label] = dict(problem=p.name, solver=label, method=method, tol=tol)
                try:
                    t0 = time.perf_counter()
                    run(method, tol)  # warm-up (and compilation, where asked)
                    res[label]["warmup_s"] = time.perf_counter() - t0
                    times[label] = []
                except Exception as exc:  # noqa: BLE001 - a failing solver is a result
                    res[label]["skipped"] = f"{type(exc).__name__}: {str(exc)[:90]}"
            # func's cost is sampled between the rounds too: one sample would carry a change
            # of machine load into every overhead figure of the group
            ftimes = [_func_time(p, args.device)]
            for _ in range(args.repeats):
                for label in times:
                    run = table[label]
                    _sync(args.device)
                    t0 = time.perf_counter()
                    ys, nfe, steps, steps_mean = run(method, tol)
                    _sync(args.device)
                    times[label].append(time.perf_counter() - t0)
                    res[label].update(nfe=nfe, steps=steps, steps_mean=steps_mean,
                                      error=p.error(ys))
                ftimes.append(_func_time(p, args.device, n=20))
        ftime = statistics.median(ftimes)
        for label, r in res.items():
            if label in times:
                med = statistics.median(times[label])
                steps = r["steps"]
                r["time_s"] = med
                r["func_call_s"] = ftime
                r["overhead_per_step_s"] = ((med - r["nfe"] * ftime) / steps
                                            if steps and steps == steps else None)
                r["mem_mb"] = (_memory_mb(table[label], method, tol, p, args.device)
                               if args.memory else None)
            rows.append(r)
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), device=args.device, repeats=args.repeats,
                dtype=args.dtype,
                skipped_backends=skipped, argv=sys.argv[1:],
                problems={p.name: p.description for p in problems})
    return {"meta": meta, "rows": rows}


def _method_name(text: str) -> str:
    import argparse as _ap

    if not text.replace("_", "").isalnum():
        raise _ap.ArgumentTypeError(f"{text!r} is not a method name (e.g. dopri5, tsit5)")
    return text


def build_parser() -> argparse.ArgumentParser:
    from ..backends.base import BACKEND_NAMES
    from ..cli import (
        choice_list,
        comma_list,
        device_spec,
        nonneg_int,
        output_dir,
        positive_int,
        tolerance,
    )

    ap = argparse.ArgumentParser(prog="pydiffbridge bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration (mlp: "
                    "MLP ours vs torchdiffeq/torchode, one thread; vdp: per-sample vs shared); "
                    "explicit flags override it")
    ap.add_argument("--problems", type=choice_list(tuple(PROBLEMS)), default=",".join(PROBLEMS),
                    help="comma list of: " + ", ".join(PROBLEMS))
    ap.add_argument("--backends", type=choice_list(BACKEND_NAMES, allow_empty=True),
                    default="torch,scipy,julia", help="our backends (missing ones are skipped)")
    ap.add_argument("--peers", type=choice_list(PEERS, allow_empty=True),
                    default="torchdiffeq,torchode", help="peer libraries ('' none)")
    ap.add_argument("--methods", type=comma_list(_method_name), default="dopri5,tsit5")
    ap.add_argument("--tols", type=comma_list(tolerance), default="1e-3,1e-6",
                    help="rtol = atol sweep, each in (0, 1)")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--device", type=device_spec, default="cpu")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                    help="dtype of the state and the right-hand side (errors are measured "
                    "against float64 references)")
    ap.add_argument("--threads", type=nonneg_int, default=0,
                    help="torch threads (0: leave as is)")
    ap.add_argument("--batch-mode", choices=["shared", "per-sample", "both"], default="shared",
                    help="our torch backend: one step size for the batch, or one per sample")
    ap.add_argument("--compile", action="store_true", help="also run our per-sample loop with its "
                    "step compiled by torch.compile (compilation happens in the warm-up run)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="measure memory in one extra run (default: on for CUDA; on CPU it "
                    "records what direct backprop saves, which is slow at tight tolerances)")
    ap.add_argument("--out", type=output_dir, default="runs/bench", help="output directory")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pydiffbridge bench`` and ``pydiffbridge-bench``."""
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--preset=stiff" in argv or any(a == "--preset" and b == "stiff"
                                        for a, b in zip(argv, argv[1:], strict=False)):
        # work-precision vs SciPy Radau/BDF/LSODA, its own arguments (pydiffbridge.bench.stiff)
        from .stiff import main as stiff_main

        rest = [a for i, a in enumerate(argv) if a not in ("--preset", "--preset=stiff")
                and not (i and argv[i - 1] == "--preset")]
        return stiff_main(rest)
    pre = ap.parse_known_args(argv)[0].preset
    if pre:
        ap.set_defaults(**PRESETS[pre])
    args = ap.parse_args(argv)
    if args.memory is None:
        args.memory = args.device.startswith("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run_bench(args)
    md = to_markdown(res)
    paths = save_report(res, md, out, "results")
    plot(res, out / "work_precision.png")
    print(md)
    print(f"wrote {', '.join(map(str, paths))}, {out / 'work_precision.png'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
