"""Benchmarks of the adjoint bridge (issue 3): memory and speed.

Memory: the peak memory of one forward + backward of a neural ODE solved with ``rk4`` at a
fixed step, at 10, 100 and 1000 steps, for ``odeint_adjoint``, for ``gradient="checkpointed"``
(16 checkpoints: its backward keeps the graph of one segment, ~1/17 of the solve) and for
direct backprop through ``odeint``.  Each configuration runs in its own subprocess.  On CPU
the peak is the process's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the run minus
the same figure after a warm-up (imports, model, one tiny solve), so it counts everything the
allocator really took.  Alongside, the bytes of the tensors autograd saved for backward during
the forward are counted with ``torch.autograd.graph.saved_tensors_hooks`` (the graph that
direct backprop keeps).  On CUDA the peak is ``torch.cuda.max_memory_allocated``.

Speed: one training step (forward, MSE loss, backward, Adam step) of a small neural ODE with
``dopri5``, against ``torchdiffeq.odeint_adjoint`` in the same process, with the default
adjoint norm and with the seminorm; reports median time per step, forward/backward NFE and
the relative difference of the gradients.

    python -m pydiffbridge.bench.adjoint_bench --help
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .problems import MLP

__all__ = ["main", "memory_run", "speed_run"]


def ODEFunc(dim: int, hidden: int, seed: int = 0) -> MLP:  # noqa: N802 - reads as a class
    """``dy/dt = W2 tanh(W1 y + b1) + b2`` with normal initialisation, counting its calls."""
    return MLP(dim, hidden, seed=seed, init="normal")


# ----------------------------------------------------------------------------------- memory
def _maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB else


def memory_run(mode: str, steps: int, batch: int, dim: int, hidden: int, device: str) -> dict:
    """One forward+backward in this process; returns the measured peaks (MiB)."""
    import pydiffbridge as pdb

    dev = torch.device(device)
    f = ODEFunc(dim, hidden).to(dev)
    y0 = torch.randn(batch, dim, device=dev, requires_grad=True)
    t = torch.tensor([0.0, 1.0], device=dev)
    opts = {"step_size": 1.0 / steps}
    solvers = {"adjoint": pdb.odeint_adjoint, "direct": pdb.odeint,
               "checkpointed": lambda *a, **k: pdb.solve(*a, gradient="checkpointed", **k).ys}
    solver = solvers[mode]
    # warm-up: every code path once, tiny
    solver(f, y0, t, method="rk4", options={"step_size": 0.5})[-1].sum().backward()
    f.zero_grad()
    y0.grad = None
    saved = [0]

    def pack(x):
        saved[0] += x.numel() * x.element_size()
        return x

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _maxrss_mib()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ys = solver(f, y0, t, method="rk4", options=opts)
    loss = (ys[-1] ** 2).mean()
    loss.backward()
    out = {"mode": mode, "steps": steps, "rss_peak_mib": _maxrss_mib(),
           "rss_increase_mib": _maxrss_mib() - base_rss, "saved_mib": saved[0] / 2**20,
           "nfe": f.calls}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def _memory(args) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for mode in ("adjoint", "checkpointed", "direct"):
        for steps in args.steps:
            cmd = [sys.executable, "-m", "pydiffbridge.bench.adjoint_bench", "--_child",
                   json.dumps([mode, steps, args.batch, args.dim, args.hidden, args.device])]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory run {mode}/{steps} failed:\n{res.stderr[-2000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  {mode:8s} {steps:5d} steps: " + ", ".join(
                f"{k}={v:.1f}" for k, v in rows[-1].items() if isinstance(v, float)))
    return rows


# ------------------------------------------------------------------------------------ speed
def _flat_grads(f, y0) -> torch.Tensor:
    return torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])


class _Trainer:
    """One implementation's training step on a fixed problem (parameters reset every step)."""

    def __init__(self, impl: str, seminorm: bool, batch: int, hidden: int, rtol: float,
                 atol: float, seed: int = 0):
        import pydiffbridge as pdb

        torch.manual_seed(seed)
        self.f = f = ODEFunc(2, hidden, seed=seed)
        self.x = torch.randn(batch, 2)
        self.target = torch.stack([self.x[:, 1], -self.x[:, 0]], 1) * 0.8  # rotate, shrink
        self.opt = torch.optim.Adam(f.parameters(), lr=1e-3)
        self.state = {k: v.clone() for k, v in f.state_dict().items()}
        t = torch.tensor([0.0, 1.0])
        kw = dict(rtol=rtol, atol=atol, method="dopri5",
                  adjoint_options={"norm": "seminorm"} if seminorm else None)
        if impl == "torchdiffeq":
            import torchdiffeq

            self.odeint = lambda y0: torchdiffeq.odeint_adjoint(f, y0, t, **kw)
        else:
            self.odeint = lambda y0: pdb.odeint_adjoint(f, y0, t, **kw)
        self.times: list[float] = []
        self.nfe_f: list[int] = []
        self.nfe_b: list[int] = []
        self.grad: torch.Tensor | None = None

    def step(self, record: bool) -> None:
        f = self.f
        f.load_state_dict(self.state)  # the same problem every step: comparable timings
        y0 = self.x.clone().requires_grad_(True)
        self.opt.zero_grad()
        t0 = time.perf_counter()
        f.calls = 0
        ys = self.odeint(y0)
        nf = f.calls
        loss = ((ys[-1] - self.target) ** 2).mean()
        loss.backward()
        if self.grad is None:
            self.grad = _flat_grads(f, y0).detach().clone()
        self.opt.step()
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
            self.nfe_f.append(nf)
            self.nfe_b.append(f.calls - nf)


def speed_run(impls: tuple[str, ...], seminorm: bool, reps: int, batch: int, hidden: int,
              rtol: float, atol: float, seed: int = 0) -> dict[str, dict]:
    """Median time of a training step, NFE forward/backward and the first step's gradient, per
    implementation; the implementations take turns step by step so load changes hit both."""
    trainers = {impl: _Trainer(impl, seminorm, batch, hidden, rtol, atol, seed)
                for impl in impls}
    for i in range(reps + 1):
        for tr in trainers.values():
            tr.step(record=i > 0)  # the first step warms up
    return {impl: {"impl": impl, "seminorm": seminorm,
                   "time_ms": 1000 * statistics.median(tr.times),
                   "nfe_forward": statistics.median(tr.nfe_f),
                   "nfe_backward": statistics.median(tr.nfe_b), "grad": tr.grad}
            for impl, tr in trainers.items()}


def _speed(args) -> list[dict]:
    try:
        import torchdiffeq  # noqa: F401
        impls = ("pydiffbridge", "torchdiffeq")
    except ImportError:
        print("  torchdiffeq not installed: timing pydiffbridge alone")
        impls = ("pydiffbridge",)
    rows = []
    for seminorm in (False, True):
        res = speed_run(impls, seminorm, args.reps, args.batch_speed, args.hidden_speed,
                        args.rtol, args.atol)
        ref = res.get("torchdiffeq", res["pydiffbridge"])["grad"]
        for impl, r in res.items():
            g = r.pop("grad")
            r["grad_rel_diff_vs_torchdiffeq"] = float((g - ref).norm() / ref.norm())
            if "torchdiffeq" in res:
                r["time_ratio_vs_torchdiffeq"] = r["time_ms"] / res["torchdiffeq"]["time_ms"]
            rows.append(r)
            print(f"  {impl:12s} seminorm={seminorm!s:5s} {r['time_ms']:8.1f} ms/step  nfe "
                  f"{r['nfe_forward']:.0f}+{r['nfe_backward']:.0f}  grad diff "
                  f"{r['grad_rel_diff_vs_torchdiffeq']:.2e}")
    return rows


# ------------------------------------------------------------------------------------- main
def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                       for v in r.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..cli import device_spec, output_dir, positive_int, tolerance

    ap = argparse.ArgumentParser(prog="python -m pydiffbridge.bench.adjoint_bench",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=("memory", "speed", "all"), default="all")
    ap.add_argument("--steps", type=positive_int, nargs="+", default=[10, 100, 1000],
                    help="rk4 step counts of the memory benchmark")
    ap.add_argument("--batch", type=positive_int, default=256, help="memory: batch size")
    ap.add_argument("--dim", type=positive_int, default=32, help="memory: state dimension")
    ap.add_argument("--hidden", type=positive_int, default=128, help="memory: hidden width")
    ap.add_argument("--device", type=device_spec,
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=positive_int, default=5, help="speed: timed training steps")
    ap.add_argument("--batch-speed", type=positive_int, default=256)
    ap.add_argument("--hidden-speed", type=positive_int, default=64)
    ap.add_argument("--rtol", type=tolerance, default=1e-6)
    ap.add_argument("--atol", type=tolerance, default=1e-8)
    ap.add_argument("--out", type=output_dir, default="runs/adjoint_bench", help="output folder")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(memory_run(*json.loads(args._child))))
        return 0
    from ..checkpoint import write_json_atomic, write_text_atomic

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": args.device, "torch": torch.__version__,
                    "command": "python -m pydiffbridge.bench.adjoint_bench " + " ".join(
                        argv if argv is not None else sys.argv[1:])}
    md = ["# Adjoint bridge benchmarks", "", f"`{result['command']}` on {args.device}", ""]
    if args.what in ("memory", "all"):
        print("memory (forward+backward, rk4 fixed step):")
        rows = _memory(args)
        result["memory"] = rows
        key = "cuda_peak_mib" if args.device.startswith("cuda") else "rss_increase_mib"
        growth = {}
        for mode in ("adjoint", "checkpointed", "direct"):
            r = {x["steps"]: x for x in rows if x["mode"] == mode}
            lo, hi = min(r), max(r)
            growth[f"{mode} {key}"] = r[hi][key] / max(r[lo][key], 1e-9)
            if key == "rss_increase_mib":
                growth[f"{mode} rss_peak_mib"] = r[hi]["rss_peak_mib"] / r[lo]["rss_peak_mib"]
            growth[f"{mode} saved_mib"] = r[hi]["saved_mib"] / max(r[lo]["saved_mib"], 1e-9)
        result["memory_growth"] = growth
        md += ["## Memory", "", f"batch {args.batch}, dim {args.dim}, hidden {args.hidden}; "
               f"peak = `{key}` (see module docstring)", "", _table(rows), "",
               f"growth {min(args.steps)} → {max(args.steps)} steps: " + ", ".join(
                   f"{k} {v:.2f}x" for k, v in growth.items()), ""]
    if args.what in ("speed", "all"):
        print("speed (one training step, dopri5):")
        rows = _speed(args)
        result["speed"] = rows
        md += ["## Speed", "", f"batch {args.batch_speed}, hidden {args.hidden_speed}, rtol "
               f"{args.rtol}, atol {args.atol}, median of {args.reps} steps", "", _table(rows), ""]
    write_json_atomic(result, out / "adjoint_bench.json")
    write_text_atomic("\n".join(md), out / "adjoint_bench.md")
    print(f"wrote {out / 'adjoint_bench.md'} and {out / 'adjoint_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
