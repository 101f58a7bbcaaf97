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

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one training step; on CPU
the peak of live tensor storage bytes during one step (see ``_odenet_models.py``).

Under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on CUDA, one GPU per process) every
step's batch of ``--batch-size`` images is split over the processes and the model is
wrapped in DistributedDataParallel, so N processes train the same model as one does (the same
global batch, loss and learning-rate schedule); the test set's batches are shared too.  NFE
are means over the processes (with ``nfe_*_max``, the slowest one, in results.json); rank 0
alone writes outputs and checkpoints, and ``--resume`` works with any number of processes.
Peak memory is then one process's, for its share of the batch.

Examples::

    python examples/odenet_mnist.py --dataset digits --epochs 2
    python examples/odenet_mnist.py --dataset fashion --subset 2000 --epochs 1
    python examples/odenet_mnist.py --memory-sweep --dataset digits
    torchrun --nproc_per_node=2 examples/odenet_mnist.py --dataset digits --model odenet
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from pydiffbridge import distributed as D
from pydiffbridge.cli import (
    choice_list,
    comma_list,
    device_spec,
    existing_dir,
    fraction,
    int_at_least,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    tolerance,
)
from pydiffbridge.nn._data import ImageData

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the examples' _*.py helpers, also when imported from elsewhere
    sys.path.insert(0, HERE)

import _common as C  # noqa: E402
from _mnist_data import DATASETS, get_data  # noqa: E402
from _odenet_models import (  # noqa: E402, F401  (re-exported for tests and users)
    MODELS,
    PAPER,
    LiveTensorBytes,
    ResBlock,
    build_model,
    n_params,
    ode_block,
    peak_step_memory,
)
from _odenet_report import write_results  # noqa: E402


# ----------------------------------------------------------------------------- training
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch: int = 500) -> tuple[float, float]:
    """Return (test error in %, mean forward NFE per batch or nan).  Under torchrun the
    batches (the same ones as in a single process) are shared by the ranks."""
    model = D.unwrap(model)
    model.eval()
    block = ode_block(model)
    wrong, nfe, batches = 0, 0, 0
    starts = range(0, len(y), batch)[D.get_rank()::D.get_world_size()]
    with torch.no_grad():
        for i in starts:
            xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
            wrong += (model(xb).argmax(1) != yb).sum().item()
            if block is not None:
                nfe, batches = nfe + block.nfe_forward, batches + 1
    model.train()
    if D.is_distributed():
        wrong, nfe, batches = D.reduce_across_ranks([wrong, nfe, batches], "sum")
    return 100.0 * wrong / len(y), (nfe / batches) if batches else math.nan


def _share(n: int) -> list[int] | slice:
    """This rank's rows of a batch of ``n`` (all of them in a single process)."""
    return C.shard(n) if D.is_distributed() else slice(None)


def train_model(kind: str, data: ImageData, args: argparse.Namespace,
                device: torch.device) -> dict:
    """Train (or resume) one model and return its results row."""
    out = Path(args.out)
    torch.manual_seed(args.seed)
    model = build_model(kind, data.image_shape, data.num_classes, args.tol, args.rk_steps)
    model.to(device)
    n_train = len(data.y_train)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    _share(min(args.batch_size, n_train - (steps_per_epoch - 1) * args.batch_size))  # fail fast
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
    saved, src = C.resume(ckpt, args.resume, map_location=device)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = saved["state"]
        C.log(f"[{kind}] resumed from {src} at epoch {state['epoch']}")
    net = C.wrap(model, device=device)  # DDP with several processes
    block = ode_block(model)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(state["epoch"], args.epochs):
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(
            args.seed * 1000 + epoch))
        bar = C.progress(range(steps_per_epoch), f"{kind} epoch {epoch + 1}/{args.epochs}",
                         disable=args.no_progress, leave=False)
        t0 = time.perf_counter()
        for it in bar:
            idx = perm[it * args.batch_size:(it + 1) * args.batch_size]  # the global batch
            mine = idx[_share(len(idx))]
            xb, yb = data.x_train[mine].to(device), data.y_train[mine].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            if D.is_distributed():  # DDP averages over ranks: make it the global batch mean
                loss = loss * C.loss_scale(len(mine), len(idx))
            loss.backward()
            opt.step()
            sched.step()
            nfe = None if block is None else {"f": block.nfe_forward, "b": block.nfe_backward}
            st = C.step_stats({"loss": loss.item()}, nfe)
            state["losses"].append(st["loss"])
            post = {"loss": f"{st['loss']:.3f}"}
            if nfe is not None:
                state["nfe"].append((st["f"], st["b"]))
                if "f_max" in st:
                    state.setdefault("nfe_max", []).append((st["f_max"], st["b_max"]))
                post["nfe_f"], post["nfe_b"] = st["f"], st["b"]
            bar.set_postfix(post)
        if device.type == "cuda":
            torch.cuda.synchronize()
        state["epoch_times"].append(time.perf_counter() - t0)
        state["epoch"] = epoch + 1
        if state["epoch"] % args.save_every == 0 or state["epoch"] == args.epochs:
            C.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "state": state}, ckpt)
    err, _ = evaluate(model, data.x_test, data.y_test, device)
    mb = min(args.batch_size, n_train)
    rows = _share(mb)  # one process's share of a batch
    mem = peak_step_memory(model, data.x_train[:mb][rows].to(device),
                           data.y_train[:mb][rows].to(device))
    last = state["nfe"][-steps_per_epoch:]
    epoch_s = sum(state["epoch_times"]) / max(len(state["epoch_times"]), 1)
    row = {"model": kind, "test_error": err, "params": n_params(model), "peak_mem_mib": mem,
           "time_per_epoch_s": epoch_s,
           "nfe_forward": sum(f for f, _ in last) / len(last) if last else None,
           "nfe_backward": sum(b for _, b in last) / len(last) if last else None,
           "final_train_loss": state["losses"][-1] if state["losses"] else None,
           "nfe_history": state["nfe"], "world_size": D.get_world_size(),
           "samples_per_s": n_train / epoch_s if epoch_s > 0 else math.nan}
    last_max = state.get("nfe_max", [])[-steps_per_epoch:]
    if last_max and D.is_distributed():
        row["nfe_forward_max"] = sum(f for f, _ in last_max) / len(last_max)
        row["nfe_backward_max"] = sum(b for _, b in last_max) / len(last_max)
    if kind == "odenet":
        row["adaptive"] = adaptive_computation(model, data, args, device)
    C.log(f"[{kind}] test error {err:.2f}%  params {row['params']}  peak mem {mem:.1f} MiB  "
          f"{row['time_per_epoch_s']:.1f} s/epoch")
    return row


def adaptive_computation(model: nn.Module, data: ImageData, args: argparse.Namespace,
                         device: torch.device) -> list[dict]:
    """Evaluate the trained ODE-Net at each tolerance of ``--tolerances``."""
    block = ode_block(model)
    assert block is not None
    trained = (block.rtol, block.atol)
    rows = []
    for tol in C.progress(args.tolerances, "adaptive computation", disable=args.no_progress,
                          leave=False):
        block.rtol = block.atol = tol
        err, nfe = evaluate(model, data.x_test, data.y_test, device)
        rows.append({"tol": tol, "test_error": err, "nfe_forward": nfe})
    block.rtol, block.atol = trained
    return rows


# ----------------------------------------------------------------------------- memory sweep
def memory_sweep(data: ImageData, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Peak training-step memory of ODE-Net (adjoint) vs RK-Net (direct) vs RK4 step count
    (one process; under torchrun rank 0 alone runs it)."""
    rows = []
    bs = min(args.sweep_batch, len(data.y_train))
    x, y = data.x_train[:bs].to(device), data.y_train[:bs].to(device)
    for steps in C.progress(args.sweep_steps, "memory sweep", disable=args.no_progress):
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


# ----------------------------------------------------------------------------- command line
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
    p.add_argument("--dataset", default="auto", choices=DATASETS,
                   help="auto: MNIST via torchvision, else Fashion-MNIST, else sklearn digits")
    p.add_argument("--data-dir", type=existing_dir, default=None,
                   help="directory of MNIST-format idx files")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--subset", type=nonneg_int, default=1000, help="training images (0 = all)")
    p.add_argument("--test-subset", type=positive_int, default=None,
                   help="test images (default subset/5)")
    p.add_argument("--image-size", type=int_at_least(6), default=None,
                   help="resize images to this size, >= 6 (default: 16 for digits, else native)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per step, over all processes under torchrun")
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
    p.add_argument("--device", type=_device, default="auto",
                   help="under torchrun: cuda means GPU LOCAL_RANK")
    C.add_run_args(p, save_every=1, unit="epochs", prev="ckpt_<model>.pt",
                   out="runs/odenet_mnist")
    args = p.parse_args(argv)
    if args.dataset == "dir" and args.data_dir is None:
        p.error("argument --data-dir: required with --dataset dir")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.lr is None:
        args.lr = 0.1 if args.optimizer == "sgd" else 1e-3
    with C.distributed(None if args.device == "auto" else args.device) as info:
        return _main(args, argv, info)


def _main(args: argparse.Namespace, argv: list[str] | None, info: D.DistInfo) -> dict:
    out = C.make_out(args.out)
    if info.world_size > 1:
        device = info.device  # GPU LOCAL_RANK, or the CPU
    else:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                              if args.device == "auto" else args.device)
    data = get_data(args)
    kinds: list[str] = args.model
    launch = (f"torchrun --nproc_per_node={info.world_size} " if info.world_size > 1
              else "python ")
    measure = ("torch.cuda.max_memory_allocated over one training step"
               if device.type == "cuda" else
               "peak live tensor storage bytes allocated during one training step "
               "(TorchDispatchMode tracker), parameters excluded")
    if info.world_size > 1:
        measure += ", of one process (its share of the batch)"
    results = {"dataset": data.name, "device": str(device), "n_train": len(data.y_train),
               "n_test": len(data.y_test), "epochs": args.epochs, "sweep_batch": args.sweep_batch,
               "command": launch + "examples/odenet_mnist.py " + " ".join(
                   sys.argv[1:] if argv is None else argv),
               "memory_measure": measure, "world_size": info.world_size,
               "rows": [train_model(k, data, args, device) for k in kinds]}
    if not info.is_main:
        return results
    if args.memory_sweep:
        results["memory_sweep"] = memory_sweep(data, args, device)
    write_results(out, results)
    print((out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
