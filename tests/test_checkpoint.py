"""Crash-safe checkpoints and strict JSON results (pydiffbridge.checkpoint), and the demo's
--save-every / --resume built on them."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pydiffbridge import demo
from pydiffbridge.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    atomic_open,
    load_checkpoint,
    prev_path,
    save_checkpoint,
    to_strict_json,
    write_json_atomic,
)
from pydiffbridge.errors import PyDiffBridgeError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

WRITER = """
import sys, torch
from pydiffbridge.checkpoint import save_checkpoint
path, n = sys.argv[1], int(sys.argv[2])
i = 0
while True:
    i += 1
    save_checkpoint({"i": i, "data": torch.full((n,), float(i), dtype=torch.float64)}, path)
    print(i, flush=True)
"""


def _refuse(token: str):
    raise ValueError(f"non-standard JSON token {token}")


def _no_warnings(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    assert not [w for w in seen if issubclass(w.category, CheckpointWarning)], seen
    return out


def _consistent(obj: dict, n: int) -> int:
    assert obj["data"].numel() == n and bool((obj["data"] == obj["i"]).all())
    return obj["i"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checkpoint_survives_sigkill_at_a_random_moment(tmp_path: Path, seed: int) -> None:
    """A child rewrites a 16 MB checkpoint in a loop and is SIGKILLed at a random moment:
    the path still loads directly (old or new), and .prev is the one before it."""
    path, n = tmp_path / "big.pt", 2_000_000
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    child = subprocess.Popen([sys.executable, str(script), str(path), str(n)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        done = 0
        while done < 2 and time.monotonic() < deadline:  # two saves: .prev exists too
            line = child.stdout.readline()
            assert line, f"writer died: {child.stderr.read()[-2000:]}"
            done = int(line)
        time.sleep(random.Random(seed).uniform(0.0, 0.4))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    cur = _consistent(torch.load(path, weights_only=True), n)  # no fallback needed
    assert cur >= 2
    assert _consistent(_no_warnings(load_checkpoint, path), n) == cur
    prev = _consistent(torch.load(prev_path(path), weights_only=True), n)
    assert prev in (cur - 1, cur)  # cur: killed between keeping .prev and the rename
    # the next write replaces a stale temporary file and rotates as usual
    save_checkpoint({"i": cur + 1, "data": torch.full((n,), float(cur + 1),
                                                      dtype=torch.float64)}, path)
    assert _consistent(load_checkpoint(path), n) == cur + 1
    assert _consistent(load_checkpoint(prev_path(path)), n) == cur
    assert not path.with_name(path.name + ".tmp").exists()


def test_save_keeps_previous_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    for i in range(3):
        save_checkpoint({"i": i}, path)
    assert load_checkpoint(path)["i"] == 2 and torch.load(prev_path(path))["i"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "ck.pt.prev"]
    save_checkpoint({"i": 3}, path, keep_previous=False)
    assert torch.load(prev_path(path))["i"] == 1


def test_full_disk_during_write_keeps_both_checkpoints(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint({"i": 1}, path)
    save_checkpoint({"i": 2}, path)

    def full_disk(obj, fh):
        fh.write(b"PK\x03\x04 partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left") as exc:
        save_checkpoint({"i": 3}, path)
    assert isinstance(exc.value, PyDiffBridgeError) and isinstance(exc.value, OSError)
    assert str(path) in str(exc.value) and "unchanged" in str(exc.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["i"] == 2 and load_checkpoint(prev_path(path))["i"] == 1
    assert not (tmp_path / "ck.pt.tmp").exists()


def test_truncated_checkpoint_falls_back_to_prev_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint({"i": 1, "w": torch.randn(1000)}, path)
    save_checkpoint({"i": 2, "w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # e.g. damaged, or written by an old version
    with pytest.warns(CheckpointWarning) as record:
        obj, src = load_checkpoint(path, return_path=True)
    assert obj["i"] == 1 and src == prev_path(path)
    text = " ".join(str(w.message) for w in record)
    assert str(path) in text and "could not be loaded" in text and str(prev_path(path)) in text
    assert "previous checkpoint" in text
    # saving again must not rotate the broken file over the good previous one
    with pytest.warns(CheckpointWarning, match="incomplete"):
        save_checkpoint({"i": 3}, path)
    assert load_checkpoint(path)["i"] == 3 and load_checkpoint(prev_path(path))["i"] == 1


def test_nothing_loadable_raises_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    path.write_bytes(b"")
    prev_path(path).write_bytes(b"not a checkpoint at all")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert isinstance(exc.value, PyDiffBridgeError)
    assert str(path) in msg and str(prev_path(path)) in msg and "no loadable checkpoint" in msg
    assert "without --resume" in msg


def test_missing_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "none.pt"
    assert _no_warnings(load_checkpoint, path, missing_ok=True) is None
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)
    save_checkpoint({"i": 7}, prev_path(path), keep_previous=False)  # only .prev is there
    with pytest.warns(CheckpointWarning, match="missing"):
        assert load_checkpoint(path)["i"] == 7


def test_strict_json_writes_null_for_non_finite_values(tmp_path: Path) -> None:
    obj = {"nan": float("nan"), "inf": math.inf, "list": [1.0, -math.inf, (np.float64("nan"),)],
           "np32": np.float32("inf"), "ok": 0.5, "int": 3, "flag": True, "none": None,
           "arr": np.array([1.0, np.nan]), "path": Path("a/b"), "nested": {"x": [math.nan]}}
    path = tmp_path / "r.json"
    assert write_json_atomic(obj, path) == 7

    back = json.loads(path.read_text(), parse_constant=_refuse)
    assert back == {"nan": None, "inf": None, "list": [1.0, None, [None]], "np32": None,
                    "ok": 0.5, "int": 3, "flag": True, "none": None, "arr": [1.0, None],
                    "path": "a/b", "nested": {"x": [None]}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    clean, count = to_strict_json([float("nan"), 1], default=str)
    assert clean == [None, 1] and count == 1
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_atomic_open_keeps_the_old_content_if_the_block_fails(tmp_path: Path) -> None:
    path = tmp_path / "out.md"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as fh:
        fh.write("half of the new")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
    with atomic_open(path, "wb") as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(CheckpointError, match="could not write file"):
        with atomic_open(tmp_path / "no" / "such" / "dir.md") as fh:
            fh.write("x")


# ----------------------------------------------------------------------------- the demo
DEMO = ["--niters", "12", "--data-size", "100", "--save-every", "3", "--quiet"]


def _interrupt_after(k: int):
    def progress(n, quiet):
        for i in range(n):
            if i == k:
                raise KeyboardInterrupt  # as if Ctrl-C arrived after k iterations
            yield i

    return progress


@pytest.mark.slow
def test_demo_save_every_interrupt_and_resume_match_an_uninterrupted_run(
        tmp_path: Path, monkeypatch) -> None:
    ref = demo.main([*DEMO, "--out", str(tmp_path / "ref")])
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(demo, "_progress", _interrupt_after(8))
        with pytest.raises(KeyboardInterrupt):
            demo.main([*DEMO, "--out", str(out)])
    assert not (out / "result.json").exists()
    assert torch.load(out / "checkpoint.pt")["iter"] == 6
    assert torch.load(out / "checkpoint.pt.prev")["iter"] == 3
    # resuming replays the same batches (the RNG state is in the checkpoint)
    res = demo.main([*DEMO, "--out", str(out), "--resume"])
    assert res["iterations"] == 12 and res["trajectory_l1"] == ref["trajectory_l1"]
    assert res["final_batch_loss"] == ref["final_batch_loss"]

    # a truncated latest checkpoint: the demo says so and resumes from the previous one
    with monkeypatch.context() as m:
        m.setattr(demo, "_progress", _interrupt_after(8))
        with pytest.raises(KeyboardInterrupt):
            demo.main([*DEMO, "--out", str(tmp_path / "run2")])
    ck = tmp_path / "run2" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.warns(CheckpointWarning) as record:
        res2 = demo.main([*DEMO, "--out", str(tmp_path / "run2"), "--resume"])
    said = [str(w.message) for w in record]
    assert any(str(ck) in m and "could not be loaded" in m for m in said), said
    assert any("using the previous checkpoint" in m for m in said), said
    assert any("incomplete" in m for m in said), said  # the broken file is not kept as .prev
    assert res2["iterations"] == 12 and res2["trajectory_l1"] == ref["trajectory_l1"]
    saved = json.loads((tmp_path / "run2" / "result.json").read_text())
    assert saved["iterations"] == 12


@pytest.mark.slow
def test_demo_killed_then_resumed(tmp_path: Path) -> None:
    """SIGKILL the demo (a subprocess) after it has checkpointed twice; --resume continues."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pydiffbridge", "demo", "--niters", "100000", "--data-size",
           "60", "--batch-time", "5", "--save-every", "2", "--out", str(out), "--quiet"]
    child = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not prev_path(out / "checkpoint.pt").exists():
            assert child.poll() is None, child.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the demo wrote no second checkpoint"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.2))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    start = _no_warnings(load_checkpoint, out / "checkpoint.pt")["iter"]
    assert start >= 4 and start % 2 == 0
    res = demo.main(["--niters", str(start + 3), "--data-size", "60", "--batch-time", "5",
                     "--out", str(out), "--quiet", "--resume"])
    assert res["iterations"] == start + 3
    assert torch.load(out / "checkpoint.pt")["iter"] == start + 3
    json.loads((out / "result.json").read_text(), parse_constant=_refuse)
