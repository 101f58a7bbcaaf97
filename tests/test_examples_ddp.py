"""The training examples under torchrun: two gloo processes on localhost (issue 16).

Each of examples/odenet_mnist.py, cnf_2d.py and latent_ode.py is launched unchanged with
``python -m torch.distributed.run --nproc_per_node=2`` on tiny settings.  The script runs
inside a small launcher that records, through a Python audit hook (``sys.addaudithook``:
``open`` for writing, ``os.rename``/``os.replace``, ``os.link``, ``os.mkdir``), every path each
rank creates or writes; only rank 0 may touch ``--out``.

Each example is also run in this (single) process with the same global batch, and the final
parameters of a model whose per-sample computation is independent of the rest of the batch
must agree: ``rknet`` (fixed-step RK4, GroupNorm normalises each image on its own) and ``mlp``
in odenet_mnist, the CNF with ``--method rk4`` (one RK4 step per solve, forward and adjoint)
and the exact trace in cnf_2d, and the RNN baseline in latent_ode (the latent ODE itself draws
its reparameterisation noise per process, so it differs by design).

Tolerance.  The two runs compute the same float32 gradient, summed in another order: the
one-process gradient is one mean over the batch, the two-process one the mean of two half-batch
means (DDP's all-reduce); convolution weight gradients also reduce over images in other
blocks.  Each gradient entry thus differs by a few float32 rounding errors of the sum, i.e. a
relative ~1e-6 (eps 6e-8 times the ~10 levels of a pairwise sum of <= 1000 terms), and a step
moves a parameter by lr * grad, so after a handful of SGD/Adam steps the parameters agree to
~1e-6 of the distance they moved.  Measured: largest differences 1.2e-7 (rknet), 6e-8 (CNF),
9e-8 (RNN), 1e-8 (MLP), for parameters that moved by 0.02 to 0.2.  ``ATOL = 2e-5`` leaves a
factor of > 100 over that; every comparison also checks that training moved the parameters by
more than 50 * ATOL, so that agreement is not the trivial one of two untrained models.  (A run
in which each rank trained on the whole batch would agree too; that the batch is really split
is checked through odenet_mnist's peak memory, measured on one process's share.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ATOL = 2e-5

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

# Runs the example as __main__ and writes rank<RANK>.json: the paths it wrote or created.
LAUNCHER = r'''
import json, os, runpy, sys
log_dir, script, *rest = sys.argv[1:]
writes, dirs = set(), set()
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def hook(event, args):
    try:
        if event == "open":
            path, _mode, flags = args
            if isinstance(path, (str, bytes, os.PathLike)) and flags is not None \
                    and flags & WRITE:
                writes.add(os.path.abspath(os.fsdecode(path)))
        elif event in ("os.rename", "os.link", "os.symlink"):
            writes.add(os.path.abspath(os.fsdecode(args[1])))
        elif event == "os.mkdir":
            dirs.add(os.path.abspath(os.fsdecode(args[0])))
    except Exception:
        pass

sys.addaudithook(hook)
sys.argv = [script, *rest]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    rec = {"writes": sorted(writes), "dirs": sorted(dirs)}
    with open(os.path.join(log_dir, "rank%s.json" % os.environ.get("RANK", "0")), "w") as fh:
        json.dump(rec, fh)
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_ddp_test", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torchrun(tmp_path: Path, name: str, argv: list[str], tag: str = "run"
              ) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Two processes of ``examples/<name>.py argv``; returns the process and, per rank, the
    paths it wrote (``writes``) and the directories it created (``dirs``)."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    audit = tmp_path / f"audit_{tag}"
    audit.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(launcher),
           str(audit), str(EXAMPLES / f"{name}.py"), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, [json.loads((audit / f"rank{r}.json").read_text()) for r in range(2)]


def _under(paths: list[str], root: Path) -> list[str]:
    root = str(root.resolve())
    return [p for p in paths if p == root or p.startswith(root + os.sep)]


def _check_only_rank0_writes(ranks: list[dict], out: Path, expected: list[str]) -> None:
    w0, w1 = _under(ranks[0]["writes"], out), _under(ranks[1]["writes"], out)
    assert not w1 and not _under(ranks[1]["dirs"], out), f"rank 1 wrote {w1}"
    for name in expected:
        assert str((out / name).resolve()) in w0, (name, w0)
        assert (out / name).stat().st_size > 0


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def _assert_same_training(two: Path, one: Path, start: dict[str, torch.Tensor]) -> None:
    """Parameters of the 2-process and the 1-process run agree to ATOL, and moved from
    ``start`` by much more than that."""
    a, b = _params(two), _params(one)
    assert a.keys() == b.keys() == start.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((b[k] - start[k]).abs().max()) for k in b)
    assert diff <= ATOL, f"{two.name}: 2 vs 1 process differ by {diff:.3g}"
    assert moved > 50 * ATOL, f"{two.name}: training moved parameters by {moved:.3g} only"


def _initial(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


ODENET = ["--dataset", "digits", "--model", "mlp,rknet", "--subset", "48", "--test-subset",
          "30", "--batch-size", "16", "--epochs", "1", "--rk-steps", "2", "--no-progress",
          "--device", "cpu"]


def test_odenet_mnist_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "ddp"
    proc, ranks = _torchrun(tmp_path, "odenet_mnist", [*ODENET, "--out", str(out)])
    _check_only_rank0_writes(ranks, out, ["results.json", "results.md", "ckpt_mlp.pt",
                                          "ckpt_rknet.pt"])
    assert proc.stdout.count("[rknet] test error") == 1  # rank 0 alone prints
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["command"].startswith("torchrun --nproc_per_node=2")
    rows = {r["model"]: r for r in res["rows"]}
    assert rows["rknet"]["nfe_forward"] == 8 and rows["rknet"]["nfe_forward_max"] == 8
    ckpt = torch.load(out / "ckpt_rknet.pt", weights_only=False)
    assert len(ckpt["state"]["losses"]) == 3  # 48 images / global batch 16

    ex = _load("odenet_mnist")
    single = {r["model"]: r for r in ex.main([*ODENET, "--out", str(tmp_path / "one")])["rows"]}
    # each process holds half of the batch of 16: its activations are about half as large
    assert rows["rknet"]["peak_mem_mib"] < 0.75 * single["rknet"]["peak_mem_mib"]
    for kind in ("mlp", "rknet"):
        torch.manual_seed(0)
        start = _initial(ex.build_model(kind, (1, 16, 16), rk_steps=2))
        _assert_same_training(out / f"ckpt_{kind}.pt", tmp_path / "one" / f"ckpt_{kind}.pt",
                              start)


CNF = ["--data", "moons", "--method", "rk4", "--trace", "exact", "--batch-size", "32",
       "--hidden", "8,8", "--lr", "0.05", "--n-test", "100", "--n-samples", "100", "--grid",
       "8", "--eval-tol", "1e-3", "--no-progress"]


def test_cnf_2d_two_processes_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc, ranks = _torchrun(tmp_path, "cnf_2d", [*CNF, "--iters", "2", "--out", str(out)])
    _check_only_rank0_writes(ranks, out, ["results.json", "results.md", "ckpt_cnf.pt",
                                          "density_cnf.png", "transform_cnf.png"])
    # resume under torchrun: rank 0 reports it once, both ranks continue from iteration 2
    proc, ranks = _torchrun(tmp_path, "cnf_2d", [*CNF, "--iters", "4", "--resume", "--out",
                                                 str(out)], tag="resume")
    assert proc.stdout.count("resumed from") == 1, proc.stdout
    _check_only_rank0_writes(ranks, out, ["results.json", "ckpt_cnf.pt"])
    ck = torch.load(out / "ckpt_cnf.pt", weights_only=False)
    assert ck["iter"] == 4 and len(ck["history"]) == 4 and ck["world_size"] == 2
    (r,) = json.loads((out / "results.json").read_text())["results"]
    assert r["world_size"] == 2 and r["iters"] == 4 and r["nfe_forward_last10pct"] > 0

    ex = _load("cnf_2d")
    ex.main([*CNF, "--iters", "4", "--out", str(tmp_path / "one")])
    args = ex.parse_args([*CNF, "--iters", "4"])
    torch.manual_seed(args.seed)
    start = _initial(ex.build("cnf", args))
    _assert_same_training(out / "ckpt_cnf.pt", tmp_path / "one" / "ckpt_cnf.pt", start)


LATENT = ["--data", "spirals", "--n-train", "12", "--n-test", "6", "--batch-size", "6",
          "--hidden", "8", "--latent-dim", "3", "--n-samples", "2", "--iters", "4",
          "--lr", "0.05", "--no-progress"]


def test_latent_ode_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc, ranks = _torchrun(tmp_path, "latent_ode", [*LATENT, "--out", str(out)])
    _check_only_rank0_writes(ranks, out, ["results.json", "results.md", "spirals.png",
                                          "ckpt_spirals_latent.pt", "ckpt_spirals_rnn.pt"])
    assert proc.stdout.count("results:") == 1
    r = json.loads((out / "results.json").read_text())["results"]["spirals"]["models"]
    assert r["latent"]["world_size"] == 2 and r["latent"]["nfe_fwd"] > 0
    assert r["latent"]["nfe_fwd_max"] >= r["latent"]["nfe_fwd"]

    ex = _load("latent_ode")
    ex.main([*LATENT, "--out", str(tmp_path / "one")])
    args = ex.parse_args(LATENT)
    args.dim = 2
    torch.manual_seed(args.seed)
    start = _initial(ex.build("rnn", args))
    _assert_same_training(out / "ckpt_spirals_rnn.pt", tmp_path / "one" / "ckpt_spirals_rnn.pt",
                          start)
