"""Results of ``examples/odenet_mnist.py``: results.json, results.md and the figures
(NFE vs test error and tolerance for the trained ODE-Net, NFE forward vs backward over the
training batches, peak training memory vs the number of RK4 steps)."""

from __future__ import annotations

from pathlib import Path

from _odenet_models import PAPER

from pydiffbridge.checkpoint import write_json_atomic, write_text_atomic


def write_results(out: Path, results: dict) -> None:
    """Write results.json, results.md and the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slim = {k: v for k, v in results.items() if k != "rows"}
    slim["rows"] = [{k: v for k, v in r.items() if k != "nfe_history"}
                    for r in results.get("rows", [])]
    write_json_atomic(slim, out / "results.json")
    lines = [f"# ODE-Net comparison on {results['dataset']}", "",
             f"Command: `{results['command']}`", "",
             f"Device: {results['device']}; train/test images: {results['n_train']}/"
             f"{results['n_test']}; epochs: {results['epochs']}; memory: "
             f"{results['memory_measure']}"
             + (f"; processes: {results['world_size']} (torchrun)"
                if results.get("world_size", 1) > 1 else ""), ""]
    if results.get("rows"):
        lines += ["| model | test error % | params | peak train mem (MiB) | s/epoch | NFE fwd "
                  "| NFE bwd | paper error % | paper params |", "|" + "---|" * 9]
        for r in results["rows"]:
            f = "-" if r["nfe_forward"] is None else f"{r['nfe_forward']:.1f}"
            b = "-" if r["nfe_backward"] is None else f"{r['nfe_backward']:.1f}"
            pe, pp = PAPER[r["model"]]
            lines.append(f"| {r['model']} | {r['test_error']:.2f} | {r['params'] / 1e6:.3f}M | "
                         f"{r['peak_mem_mib']:.1f} | {r['time_per_epoch_s']:.1f} | {f} | {b} | "
                         f"{pe} | {pp}M |")
        if results.get("world_size", 1) > 1:
            lines += ["", "Training throughput over all processes (images/s): " + ", ".join(
                f"{r['model']} {r['samples_per_s']:.1f}" for r in results["rows"])]
    ode = next((r for r in results.get("rows", []) if r["model"] == "odenet"), None)
    if ode:
        lines += ["", "## Adaptive computation (trained ODE-Net, rtol = atol = tol)", "",
                  "| tol | NFE fwd | test error % |", "|---|---|---|"]
        lines += [f"| {a['tol']:g} | {a['nfe_forward']:.1f} | {a['test_error']:.2f} |"
                  for a in ode["adaptive"]]
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
        ad = ode["adaptive"]
        ax[0].plot([a["nfe_forward"] for a in ad], [a["test_error"] for a in ad], "o-")
        ax[0].set(xlabel="NFE forward", ylabel="test error (%)", title="NFE vs error")
        ax[1].loglog([a["tol"] for a in ad], [a["nfe_forward"] for a in ad], "o-")
        ax[1].set(xlabel="tolerance", ylabel="NFE forward", title="NFE vs tolerance")
        hist = ode["nfe_history"]
        ax[2].scatter([f for f, _ in hist], [b for _, b in hist], s=12, alpha=0.3)
        top = max([1] + [max(f, b) for f, b in hist])
        ax[2].plot([0, top], [0, top], "k--", lw=0.8, label="backward = forward")
        ax[2].legend(fontsize=8)
        ax[2].set(xlabel="NFE forward", ylabel="NFE backward", title="training batches")
        fig.tight_layout()
        fig.savefig(out / "adaptive_computation.png", dpi=120)
        plt.close(fig)
    if results.get("memory_sweep"):
        sw = results["memory_sweep"]
        lines += ["", "## Peak training memory vs RK4 steps (one batch of "
                  f"{results['sweep_batch']})", "",
                  "| steps | NFE fwd | RK-Net direct (MiB) | ODE-Net adjoint (MiB) |",
                  "|---|---|---|---|"]
        lines += [f"| {s['steps']} | {s['rknet_nfe'][0]} | {s['rknet_mib']:.2f} | "
                  f"{s['odenet_mib']:.2f} |" for s in sw]
        fig, ax = plt.subplots(figsize=(5, 3.8))
        ax.plot([s["steps"] for s in sw], [s["rknet_mib"] for s in sw], "o-",
                label="RK-Net (direct backprop)")
        ax.plot([s["steps"] for s in sw], [s["odenet_mib"] for s in sw], "s-",
                label="ODE-Net (adjoint)")
        ax.set(xscale="log", xlabel="RK4 steps", ylabel="peak memory (MiB)",
               title="Training memory vs depth")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory_vs_steps.png", dpi=120)
        plt.close(fig)
    write_text_atomic("\n".join(lines) + "\n", out / "results.md")
