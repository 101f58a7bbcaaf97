"""The benchmark runner's reports: the markdown table (with the per-tolerance ratios and
ceilings) and the work-precision plot."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["to_markdown", "plot", "save_report"]


def save_report(res: dict, md: str, out: Path, stem: str) -> list[Path]:
    """Write ``res`` as strict JSON and ``md`` as ``out/stem.json`` and ``out/stem.md``, each
    atomically; returns the two paths (markdown first)."""
    from ..checkpoint import write_json_atomic, write_text_atomic

    paths = [out / f"{stem}.md", out / f"{stem}.json"]
    write_json_atomic(res, paths[1], indent=1)
    write_text_atomic(md, paths[0])
    return paths


def _fmt(v, spec=".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec) if isinstance(v, float) else str(v)


def to_markdown(res: dict) -> str:
    meta, rows = res["meta"], res["rows"]
    lines = [f"# pydiffbridge benchmark ({meta['date']})", "",
             f"torch {meta['torch']}, {meta['threads']} thread(s), device {meta['device']}, "
             f"{meta.get('dtype', 'float64')}, median of {meta['repeats']} run(s).", ""]
    for name, desc in meta["problems"].items():
        lines += [f"## {name}: {desc}", "",
                  "| solver | method | tol | NFE | steps | time (s) | error | mem (MB) | "
                  "overhead/step (µs) | time vs torchdiffeq | overhead vs torchdiffeq |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        sub = [r for r in rows if r["problem"] == name]
        ref = {(r["method"], r["tol"]): r for r in sub if r["solver"] == "torchdiffeq"
               and "skipped" not in r}
        for r in sub:
            if "skipped" in r:
                lines.append(f"| {r['solver']} | {r['method']} | {r['tol']:g} | skipped: "
                             f"{r['skipped']} |||||||")
                continue
            q = ref.get((r["method"], r["tol"]))
            tr = r["time_s"] / q["time_s"] if q else None
            orat = (r["overhead_per_step_s"] / q["overhead_per_step_s"]
                    if q and r["overhead_per_step_s"] and q["overhead_per_step_s"] else None)
            steps = _fmt(r["steps"], ".0f") if isinstance(r["steps"], float) else r["steps"]
            if r.get("steps_mean") not in (None, r["steps"]) and isinstance(r["steps"], int):
                steps = f"{r['steps']} (mean {r['steps_mean']:.0f})"
            over = r["overhead_per_step_s"]
            lines.append(
                f"| {r['solver']} | {r['method']} | {r['tol']:g} | {r['nfe']} | {steps} | "
                f"{r['time_s']:.4g} | {_fmt(r['error'], '.2e')} | {_fmt(r['mem_mb'], '.2f')} | "
                f"{_fmt(over * 1e6 if over is not None else None, '.1f')} | "
                f"{_fmt(tr, '.2f')} | {_fmt(orat, '.2f')} |")
        bounds = [(r, ref[(r["method"], r["tol"])]) for r in sub
                  if r["solver"] == "ours-torch" and "skipped" not in r
                  and (r["method"], r["tol"]) in ref and r.get("func_call_s")]
        if bounds:
            lines += ["", "How much faster than torchdiffeq any solver could be at our NFE (a "
                      "solver with no overhead takes NFE × one call of func):", ""]
            for r, q in bounds:
                floor = r["nfe"] * r["func_call_s"]
                lines.append(f"- {r['method']} tol {r['tol']:g}: NFE × {r['func_call_s'] * 1e6:.0f}"
                             f" µs = {floor:.4g} s, at most {q['time_s'] / floor:.2f}× "
                             f"(measured {q['time_s'] / r['time_s']:.2f}×)")
        pairs = [(a, b) for a in sub for b in sub if a["solver"] == "ours-torch/per-sample"
                 and b["solver"] == "ours-torch" and a["method"] == b["method"]
                 and a["tol"] == b["tol"] and "skipped" not in a and "skipped" not in b]
        if pairs:
            lines += ["", "per-sample vs shared stepping (ours-torch):", ""]
            for a, b in pairs:
                lines.append(f"- {a['method']} tol {a['tol']:g}: steps {a['steps']}/{b['steps']}"
                             f" = {a['steps'] / b['steps']:.2f}× (mean per sample "
                             f"{a['steps_mean'] / b['steps']:.2f}×), time "
                             f"{a['time_s'] / b['time_s']:.2f}×")
            for a in sub:
                if a["solver"].endswith("/compiled") and "time_s" in a:
                    plain = next((r for r in sub if r["solver"] == a["solver"][:-9]
                                  and r["method"] == a["method"] and r["tol"] == a["tol"]
                                  and "time_s" in r), None)
                    if plain:
                        lines.append(f"- torch.compile, {a['method']} tol {a['tol']:g}: time "
                                     f"{a['time_s'] / plain['time_s']:.2f}× the plain loop, "
                                     f"after a first (compiling) run of {a['warmup_s']:.0f} s")
        lines.append("")
    if meta["skipped_backends"]:
        lines.append("Backends not available: " + "; ".join(
            f"{k} ({v})" for k, v in meta["skipped_backends"].items()))
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["meta"]["problems"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        groups: dict = {}
        for r in res["rows"]:
            if r["problem"] == name and "skipped" not in r and r["error"] > 0 \
                    and math.isfinite(r["error"]):
                groups.setdefault(f"{r['solver']} {r['method']}", []).append(
                    (r["time_s"], r["error"]))
        for lab, pts in groups.items():
            pts.sort()
            ax.loglog([x for x, _ in pts], [y for _, y in pts], "o-", label=lab)
        ax.set(title=name, xlabel="median time (s)", ylabel="relative error")
        ax.grid(True, which="both", alpha=0.3)
        if groups:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
