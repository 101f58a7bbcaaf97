#!/usr/bin/env python
"""ODE-Nets for image classification: the MNIST comparison of Chen et al. (2018), Table 1.

Four models share the paper's down-sampling stem (conv 3x3 to 64 channels, then two stride-2
4x4 convs) and head (norm, ReLU, global average pool, linear), except the 1-layer MLP:

* ``mlp``    -- 1 hidden layer of 300 units (LeCun et al., 1998);
* ``resnet`` -- 6 pre-activation residual blocks;
* ``rknet``  -- one continuous block solved by fixed-step RK4, gradients by direct backprop
  through the solver's operations (memory grows with the number of steps);
* ``odenet`` -- the same block solved by adaptive dopri5, gradients by the adjoint method
  (O(1) memory in the number of steps).

For each model it reports test error, parameter count, peak training memory, time per epoch
and NFE per forward/backward pass; for the ODE-Net it evaluates the trained model at several
tolerances ("adaptive computation") and plots NFE against test error and tolerance.
``--memory-sweep`` measures peak training memory of ODE-Net (adjoint) vs RK-Net (direct) as
the number of RK4 steps grows.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one training step.  On CPU,
the peak of live tensor storage bytes allocated during one training step (forward + backward
of one batch), tracked per storage by a ``TorchDispatchMode`` -- the CPU analogue of
``max_memory_allocated``, excluding parameters and the input batch that existed before.

Examples::

    python examples/odenet_mnist.py --dataset digits --epochs 2
    python examples/odenet_mnist.py --dataset fashion --subset 2000 --epochs 1
    python examples/odenet_mnist.py --memory-sweep --dataset digits
"""

from __future__ import annotations

import argparse
import math
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from pydiffbridge.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from pydiffbridge.cli import (
    choice_list,
    comma_list,
    device_spec,
    existing_dir,
    fraction,
    int_at_least,
    nonneg_float,
    nonneg_int,
    output_dir,
    positive_float,
    positive_int,
    tolerance,
)
from pydiffbridge.errors import BackendUnavailableError
from pydiffbridge.nn._data import ImageData, load_dataset
from pydiffbridge.nn.odeblock import ConvODEFunc, ODEBlock, group_norm

MODELS = ("mlp", "resnet", "rknet", "odenet")
PAPER = {"mlp": (1.60, 0.24), "resnet": (0.41, 0.60), "rknet": (0.47, 0.22),
         "odenet": (0.42, 0.22)}  # test error %, params (M) in the paper's Table 1


# ----------------------------------------------------------------------------- models
class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(relu(norm(conv(relu(norm(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(group_norm(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  group_norm(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def build_model(kind: str, image_shape: tuple[int, int, int], num_classes: int = 10,
                tol: float = 1e-3, rk_steps: int = 4, channels: int = 64) -> nn.Sequential:
    """Build one of :data:`MODELS` for images of shape ``(C, H, W)``."""
    c, h, w = image_shape
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 300), nn.ReLU(),
                             nn.Linear(300, num_classes))
    stem = [nn.Conv2d(c, channels, 3, 1), group_norm(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 4, 2, 1), group_norm(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 4, 2, 1)]
    if kind == "resnet":
        features: list[nn.Module] = [ResBlock(channels) for _ in range(6)]
    elif kind == "rknet":
        features = [ODEBlock(ConvODEFunc(channels), method="rk4", gradient="direct",
                             options={"step_size": 1.0 / rk_steps})]
    elif kind == "odenet":
        features = [ODEBlock(ConvODEFunc(channels), method="dopri5", rtol=tol, atol=tol,
                             gradient="adjoint")]
    else:
        raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    head = [group_norm(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(channels, num_classes)]
    return nn.Sequential(*stem, *features, *head)


def ode_block(model: nn.Module) -> ODEBlock | None:
    return next((m for m in model.modules() if isinstance(m, ODEBlock)), None)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- memory
class LiveTensorBytes(TorchDispatchMode):
    """Track live bytes of tensor storages created inside the mode; keep the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.live[key]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def peak_step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak memory (MiB) of one forward+backward pass; see the module docstring."""
    model.zero_grad(set_to_none=True)
    loss_fn = nn.CrossEntropyLoss()
    if x.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(model(x), y).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        meter = LiveTensorBytes()
        with meter:
            loss_fn(model(x), y).backward()
        peak = meter.peak
    model.zero_grad(set_to_none=True)
    return peak / 2**20


# ----------------------------------------------------------------------------- training
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch: int = 500) -> tuple[float, float]:
    """Return (test error in %, mean forward NFE per batch or nan)."""
    model.eval()
    block = ode_block(model)
    wrong, nfes = 0, []
    with torch.no_grad():
        for i in range(0, len(y), batch):
            xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
            wrong += (model(xb).argmax(1) != yb).sum().item()
            if block is not None:
                nfes.append(block.nfe_forward)
    model.train()
    return 100.0 * wrong / len(y), (sum(nfes) / len(nfes)) if nfes else math.nan


def train_model(kind: str, data: ImageData, args: argparse.Namespace,
                device: torch.device) -> dict:
    """Train (or resume) one model and return its results row."""
    out = Path(args.out)
    torch.manual_seed(args.seed)
    model = build_model(kind, data.image_shape, data.num_classes, args.tol, args.rk_steps)
    model.to(device)
    steps_per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    if args.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=args.lr,
                                                      weight_decay=args.wd)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    total = max(args.epochs * steps_per_epoch, 1)
    warm = max(1, total // 10)

    def lr_factor(step: int) -> float:
        """Linear warm-up, then cosine decay to 1% (recomputed on resume with new --epochs)."""
        if step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.495 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    state = {"epoch": 0, "epoch_times": [], "nfe": [], "losses": []}
    ckpt = out / f"ckpt_{kind}.pt"
    saved, src = (load_checkpoint(ckpt, map_location=device, missing_ok=True, return_path=True)
                  if args.resume else (None, None))
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = saved["state"]
        print(f"[{kind}] resumed from {src} at epoch {state['epoch']}")
    block = ode_block(model)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(state["epoch"], args.epochs):
        perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(
            args.seed * 1000 + epoch))
        bar = tqdm(range(steps_per_epoch), desc=f"{kind} epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress, leave=False)
        t0 = time.perf_counter()
        for it in bar:
            idx = perm[it * args.batch_size:(it + 1) * args.batch_size]
            xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            state["losses"].append(loss.item())
            post = {"loss": f"{loss.item():.3f}"}
            if block is not None:
                state["nfe"].append((block.nfe_forward, block.nfe_backward))
                post["nfe_f"], post["nfe_b"] = block.nfe_forward, block.nfe_backward
            bar.set_postfix(post)
        if device.type == "cuda":
            torch.cuda.synchronize()
        state["epoch_times"].append(time.perf_counter() - t0)
        state["epoch"] = epoch + 1
        if state["epoch"] % args.save_every == 0 or state["epoch"] == args.epochs:
            save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict(), "state": state}, ckpt)
    err, _ = evaluate(model, data.x_test, data.y_test, device)
    mb = min(args.batch_size, len(data.y_train))
    mem = peak_step_memory(model, data.x_train[:mb].to(device), data.y_train[:mb].to(device))
    last = state["nfe"][-steps_per_epoch:]
    row = {"model": kind, "test_error": err, "params": n_params(model), "peak_mem_mib": mem,
           "time_per_epoch_s": sum(state["epoch_times"]) / max(len(state["epoch_times"]), 1),
           "nfe_forward": sum(f for f, _ in last) / len(last) if last else None,
           "nfe_backward": sum(b for _, b in last) / len(last) if last else None,
           "final_train_loss": state["losses"][-1] if state["losses"] else None,
           "nfe_history": state["nfe"]}
    if kind == "odenet":
        row["adaptive"] = adaptive_computation(model, data, args, device)
    print(f"[{kind}] test error {err:.2f}%  params {row['params']}  peak mem {mem:.1f} MiB  "
          f"{row['time_per_epoch_s']:.1f} s/epoch")
    return row


def adaptive_computation(model: nn.Module, data: ImageData, args: argparse.Namespace,
                         device: torch.device) -> list[dict]:
    """Evaluate the trained ODE-Net at each tolerance of ``--tolerances``."""
    block = ode_block(model)
    assert block is not None
    trained = (block.rtol, block.atol)
    rows = []
    for tol in tqdm(args.tolerances, desc="adaptive computation", disable=args.no_progress,
                    leave=False):
        block.rtol = block.atol = tol
        err, nfe = evaluate(model, data.x_test, data.y_test, device)
        rows.append({"tol": tol, "test_error": err, "nfe_forward": nfe})
    block.rtol, block.atol = trained
    return rows


# ----------------------------------------------------------------------------- memory sweep
def memory_sweep(data: ImageData, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Peak training-step memory of ODE-Net (adjoint) vs RK-Net (direct) vs RK4 step count."""
    rows = []
    bs = min(args.sweep_batch, len(data.y_train))
    x, y = data.x_train[:bs].to(device), data.y_train[:bs].to(device)
    for steps in tqdm(args.sweep_steps, desc="memory sweep", disable=args.no_progress):
        row = {"steps": steps}
        for kind, gradient in (("rknet", "direct"), ("odenet", "adjoint")):
            torch.manual_seed(args.seed)
            model = build_model("rknet", data.image_shape, data.num_classes,
                                rk_steps=steps).to(device)
            block = ode_block(model)
            block.gradient = gradient
            h = 1.0 / steps
            block.adjoint_kwargs = {"adjoint_method": "rk4", "adjoint_options": {"step_size": h}}
            row[f"{kind}_mib"] = peak_step_memory(model, x, y)
            row[f"{kind}_nfe"] = (block.nfe_forward, block.nfe_backward)
        rows.append(row)
        print(f"steps={steps:4d}  RK-Net(direct) {row['rknet_mib']:8.2f} MiB   "
              f"ODE-Net(adjoint) {row['odenet_mib']:8.2f} MiB")
    return rows


# ----------------------------------------------------------------------------- reporting
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
             f"{results['memory_measure']}", ""]
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


def _models(text: str) -> list[str]:
    """``--model``: all, none or a comma list of :data:`MODELS`."""
    if text in ("all", "none"):
        return list(MODELS) if text == "all" else []
    return choice_list(MODELS)(text)


def _device(text: str) -> str:
    return text if text == "auto" else device_spec(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=_models, default="all",
                   help="all, none (with --memory-sweep) or a comma list of " + ",".join(MODELS))
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion", "mnist", "digits",
                                                         "dir"],
                   help="auto: MNIST via torchvision, else Fashion-MNIST, else sklearn digits")
    p.add_argument("--data-dir", type=existing_dir, default=None,
                   help="directory of MNIST-format idx files")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--subset", type=nonneg_int, default=1000, help="training images (0 = all)")
    p.add_argument("--test-subset", type=positive_int, default=None,
                   help="test images (default subset/5)")
    p.add_argument("--image-size", type=int_at_least(6), default=None,
                   help="resize images to this size, >= 6 (default: 16 for digits, else native)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd: momentum 0.9 as in the paper's code")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="default 0.1 (sgd), 1e-3 (adam)")
    p.add_argument("--wd", type=nonneg_float, default=5e-4)
    p.add_argument("--tol", type=tolerance, default=1e-3, help="ODE-Net rtol = atol for training")
    p.add_argument("--rk-steps", type=positive_int, default=4,
                   help="RK-Net fixed RK4 steps on [0, 1]")
    p.add_argument("--tolerances", type=comma_list(fraction),
                   default=[1.0, 1e-1, 1e-2, 1e-3, 1e-4],
                   help="ODE-Net evaluation tolerances, each in (0, 1]")
    p.add_argument("--memory-sweep", action="store_true", help="also run the memory sweep")
    p.add_argument("--sweep-steps", type=comma_list(positive_int), default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--sweep-batch", type=positive_int, default=32)
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--save-every", type=positive_int, default=1, metavar="N",
                   help="checkpoint every N epochs and after the last (the one before is kept "
                   "as ckpt_<model>.pt.prev)")
    p.add_argument("--resume", action="store_true",
                   help="continue from checkpoints in --out (from the previous one if the "
                   "latest is unreadable)")
    p.add_argument("--out", type=output_dir, default="runs/odenet_mnist")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.dataset == "dir" and args.data_dir is None:
        p.error("argument --data-dir: required with --dataset dir")
    return args


def get_data(args: argparse.Namespace) -> ImageData:
    names = ["mnist", "fashion", "digits"] if args.dataset == "auto" else [args.dataset]
    for i, name in enumerate(names):
        try:
            data = load_dataset(name, args.data_dir, root=Path(args.out) / "data")
            break
        except (BackendUnavailableError, FileNotFoundError, OSError, ValueError) as exc:
            if i == len(names) - 1:
                raise
            print(f"dataset {name} unavailable ({exc}); trying {names[i + 1]}")
    size = args.image_size or (16 if data.image_shape[-1] < 16 else None)
    if size:
        data = data.resized(size)
    return data.subset(args.subset or None, args.test_subset, seed=args.seed)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.lr is None:
        args.lr = 0.1 if args.optimizer == "sgd" else 1e-3
    import sys

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    data = get_data(args)
    kinds: list[str] = args.model
    results = {"dataset": data.name, "device": str(device), "n_train": len(data.y_train),
               "n_test": len(data.y_test), "epochs": args.epochs, "sweep_batch": args.sweep_batch,
               "command": "python examples/odenet_mnist.py " + " ".join(
                   sys.argv[1:] if argv is None else argv),
               "memory_measure": ("torch.cuda.max_memory_allocated over one training step"
                                  if device.type == "cuda" else
                                  "peak live tensor storage bytes allocated during one training "
                                  "step (TorchDispatchMode tracker), parameters excluded"),
               "rows": [train_model(k, data, args, device) for k in kinds]}
    if args.memory_sweep:
        results["memory_sweep"] = memory_sweep(data, args, device)
    write_results(out, results)
    print((out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
