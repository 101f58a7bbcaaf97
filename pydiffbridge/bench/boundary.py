"""What crossing the engine boundary costs: per backend and method, NFE, steps, wall time and
the per-call overhead ``(time - NFE * t_func) / NFE``, where ``t_func`` is the measured time of
one call of the torch right-hand side.

For the torch backend the "overhead" is the solver's own tensor arithmetic per evaluation;
for SciPy and Julia it adds the numpy marshalling, the Python callback and the engine's
bookkeeping.  Everything is measured side by side in one run.

Run: ``python -m pydiffbridge.bench.boundary [--dim 8 --hidden 32 --rtol 1e-6 --json out.json]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..backends.base import available_backends, get_backend

__all__ = ["DEFAULT_METHODS", "make_problem", "time_func", "measure", "to_markdown", "main"]

DEFAULT_METHODS = {
    "torch": ["dopri5", "tsit5", "bosh3", "dopri8"],
    "scipy": ["RK45", "DOP853", "RK23", "Radau", "BDF", "LSODA"],
    "julia": ["DP5", "Tsit5", "Vern9", "Rodas5"],
}


def make_problem(dim: int = 8, hidden: int = 32, seed: int = 0):
    """A neural-ODE-like right-hand side: ``tanh`` MLP, float64, mildly contracting."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(hidden, dim, generator=g, dtype=torch.float64) / dim ** 0.5
    W2 = torch.randn(dim, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5

    def func(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ W1.T) @ W2.T - 0.1 * y

    y0 = torch.randn(dim, generator=g, dtype=torch.float64)
    return func, y0


def time_func(func, y0: torch.Tensor, n: int = 2000) -> float:
    """Median seconds of one ``func(t, y)`` call (no autograd), over blocks of calls."""
    t = torch.tensor(0.0, dtype=y0.dtype)
    blocks = []
    with torch.no_grad():
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 5):
                func(t, y0)
            blocks.append((time.perf_counter() - t0) / (n // 5))
    return statistics.median(blocks)


def measure(backends: Sequence[str] | None = None, methods: dict | None = None, dim: int = 8,
            hidden: int = 32, t_end: float = 5.0, rtol: float = 1e-6, atol: float = 1e-8,
            repeats: int = 3) -> dict:
    """Run every available backend/method on one problem; returns rows and the func time."""
    import pydiffbridge as pdb

    func, y0 = make_problem(dim, hidden)
    t_func = time_func(func, y0)
    t = torch.linspace(0.0, t_end, 11, dtype=torch.float64)
    avail = available_backends()
    rows, skipped = [], {}
    for name in backends or list(DEFAULT_METHODS):
        if avail.get(name, "unknown backend"):
            skipped[name] = avail.get(name, "unknown backend")
            continue
        for method in (methods or DEFAULT_METHODS).get(name, []):
            get_backend(name).resolve_method(method)
            best, sol = float("inf"), None
            with torch.no_grad():
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    sol = pdb.solve(func, y0, t, rtol=rtol, atol=atol, method=method,
                                    backend=name)
                    best = min(best, time.perf_counter() - t0)
            nfe = int(sol.stats.nfe)
            rows.append({
                "backend": name, "method": sol.method, "status": sol.status.name,
                "nfe": nfe, "steps": int(sol.stats.steps), "time_s": best,
                "func_time_s": nfe * t_func,
                "overhead_per_call_us": 1e6 * (best - nfe * t_func) / max(nfe, 1),
            })
    return {"problem": {"dim": dim, "hidden": hidden, "t_end": t_end, "rtol": rtol,
                        "atol": atol, "repeats": repeats},
            "func_call_us": 1e6 * t_func, "rows": rows, "skipped": skipped,
            "torch_threads": torch.get_num_threads()}


def to_markdown(res: dict) -> str:
    p = res["problem"]
    lines = [f"Boundary cost: tanh-MLP RHS dim={p['dim']} hidden={p['hidden']}, t in [0, "
             f"{p['t_end']}], rtol={p['rtol']}, atol={p['atol']}, best of {p['repeats']}; one "
             f"func call = {res['func_call_us']:.1f} us",
             "",
             "| backend | method | status | NFE | steps | time (ms) | NFE x func (ms) | "
             "overhead / call (us) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['backend']} | {r['method']} | {r['status']} | {r['nfe']} | "
                     f"{r['steps']} | {1e3 * r['time_s']:.1f} | {1e3 * r['func_time_s']:.1f} | "
                     f"{r['overhead_per_call_us']:.1f} |")
    for name, why in res["skipped"].items():
        lines.append(f"\n{name}: skipped ({why.split('. Fixes')[0]})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from ..backends.base import BACKEND_NAMES
    from ..checkpoint import write_json_atomic
    from ..cli import output_file, positive_float, positive_int, tolerance

    ap = argparse.ArgumentParser(prog="python -m pydiffbridge.bench.boundary",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="*", default=None, choices=BACKEND_NAMES,
                    help="default: all")
    ap.add_argument("--dim", type=positive_int, default=8)
    ap.add_argument("--hidden", type=positive_int, default=32)
    ap.add_argument("--t-end", type=positive_float, default=5.0)
    ap.add_argument("--rtol", type=tolerance, default=1e-6)
    ap.add_argument("--atol", type=tolerance, default=1e-8)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--json", type=output_file, default=None,
                    help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    res = measure(a.backends, dim=a.dim, hidden=a.hidden, t_end=a.t_end, rtol=a.rtol,
                  atol=a.atol, repeats=a.repeats)
    print(to_markdown(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(res, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
