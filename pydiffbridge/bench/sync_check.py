"""How often a solve reads a value back to the host, measured with ``torch.profiler``.

``python -m pydiffbridge.bench.sync_check [--device cuda]``

Every ``.item()``, ``bool(t)``, ``float(t)`` or ``int(t)`` of a tensor runs
``aten::_local_scalar_dense``; on CUDA each one waits for the device.  For each step loop
(the host loop, the device loop, per-sample stepping) the same batched Van der Pol problem is
solved at two tolerances, and the extra host reads are divided by the extra steps: a loop that
decides on the host reads at least once per step, a branch-free one ``1 / sync_every`` times.
On CUDA the CUDA runtime's synchronisations and copies are counted as well.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

__all__ = ["KINDS", "count_reads", "marginal_reads", "main"]

KINDS = {
    "shared/host loop": lambda se: dict(options={"loop": "host"}),
    "shared/device loop": lambda se: dict(options={"loop": "device", "sync_every": se}),
    "per-sample": lambda se: dict(batch_dims=1, options={"sync_every": se}),
}
_CUDA_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
_CUDA_COPY = ("cudaMemcpy", "cudaMemcpyAsync")


def count_reads(fn, device: str) -> dict[str, int]:
    """Run ``fn()`` under the profiler; count host reads (and CUDA syncs/copies on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda")
                                     else [])
    with profile(activities=acts) as prof:
        out = fn()
    n = {"host_reads": 0, "cuda_syncs": 0, "cuda_copies": 0}
    for e in prof.events():
        if e.name == "aten::_local_scalar_dense":
            n["host_reads"] += 1
        elif e.name in _CUDA_SYNC:
            n["cuda_syncs"] += 1
        elif e.name in _CUDA_COPY:
            n["cuda_copies"] += 1
    return n | {"result": out}


def _problem(device: str, batch: int = 16):
    mu = torch.linspace(0.5, 10.0, batch, dtype=torch.float64, device=device)

    def vdp(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)

    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64, device=device).repeat(batch, 1)
    return vdp, y0, torch.linspace(0.0, 5.0, 4, dtype=torch.float64, device=device)


def marginal_reads(kind: str, device: str = "cpu", sync_every: int = 8,
                   tols: tuple[float, float] = (1e-4, 1e-7)) -> dict:
    """Host reads (and CUDA syncs) per extra step between two tolerances, for one loop."""
    import pydiffbridge as pdb

    func, y0, t = _problem(device)
    kw = KINDS[kind](sync_every)
    runs = []
    for tol in tols:
        pdb.solve(func, y0, t, rtol=tol, atol=tol, **kw)  # warm-up: lazy inits are not counted
        n = count_reads(lambda tol=tol: pdb.solve(func, y0, t, rtol=tol, atol=tol, **kw), device)
        sol = n.pop("result")
        if not bool(torch.as_tensor(sol.success)):
            raise RuntimeError(f"{kind}: the check problem failed: {sol.message}")
        steps = sol.stats.steps
        n["steps"] = int(steps.max()) if isinstance(steps, torch.Tensor) else int(steps)
        runs.append(n)
    d_steps = runs[1]["steps"] - runs[0]["steps"]
    row = {"kind": kind, "device": device, "sync_every": sync_every, "runs": runs}
    for key in ("host_reads", "cuda_syncs", "cuda_copies"):
        row[f"{key}_per_step"] = (runs[1][key] - runs[0][key]) / d_steps
    return row


def to_markdown(rows: list[dict]) -> str:
    lines = ["| loop | device | steps | host reads | host reads per extra step | CUDA syncs per "
             "extra step | CUDA copies per extra step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["runs"]
        lines.append(f"| {r['kind']} | {r['device']} | {a['steps']} → {b['steps']} | "
                     f"{a['host_reads']} → {b['host_reads']} | {r['host_reads_per_step']:.3f} | "
                     f"{r['cuda_syncs_per_step']:.3f} | {r['cuda_copies_per_step']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ..cli import device_spec, output_dir, positive_int

    ap = argparse.ArgumentParser(prog="python -m pydiffbridge.bench.sync_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", type=device_spec,
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sync-every", type=positive_int, default=8,
                    help="the device loops' check interval (>1 on the CPU selects the same "
                    "torch code path as on CUDA)")
    ap.add_argument("--out", type=output_dir, default="runs/sync_check", help="output directory")
    args = ap.parse_args(argv)
    from ..checkpoint import write_json_atomic, write_text_atomic

    rows = [marginal_reads(k, args.device, args.sync_every) for k in KINDS]
    md = to_markdown(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(md, out / "results.md")
    write_json_atomic(rows, out / "results.json", indent=1)
    print(md)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
