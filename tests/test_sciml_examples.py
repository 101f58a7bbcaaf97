"""examples/fit_parameters.py and examples/ude.py end to end with tiny settings: --help, a few
iterations, every output written, strict JSON, resumption, a clean report for an unavailable
backend, and a two-process torchrun launch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

FIT_TINY = ["--series", "2", "--times", "8", "--restarts", "2", "--adam-iters", "3",
            "--lbfgs-iters", "1", "--lbfgs-max-iter", "3", "--no-progress", "--rtol", "1e-4",
            "--atol", "1e-6"]
UDE_TINY = ["--series", "2", "--times", "8", "--hidden", "8", "--adam-iters", "3",
            "--lbfgs-iters", "1", "--lbfgs-max-iter", "3", "--no-progress", "--rtol", "1e-4",
            "--atol", "1e-6"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fitp():
    return _load("fit_parameters")


@pytest.fixture(scope="module")
def ude():
    return _load("ude")


def _strict_json(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"{path} is not strict JSON: {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("name", ["fit_parameters", "ude"])
def test_help(name, capsys):
    mod = _load(name)
    with pytest.raises(SystemExit) as exc:
        mod.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--backend" in text and "--resume" in text and "--out" in text


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lv", "sir"])
def test_fit_parameters_tiny(fitp, tmp_path, model):
    out = tmp_path / model
    res = fitp.main(["--model", model, "--out", str(out), *FIT_TINY])
    assert res["status"] == "ok"
    for f in ("results.json", "results.md", "fit.png", "loss.png", "ckpt.pt"):
        assert (out / f).stat().st_size > 0, f
    data = _strict_json(out / "results.json")
    names = fitp.MODELS[model].names
    assert list(data["summary"]["params"]) == list(names)
    assert len(data["restarts"]) == 2 and data["summary"]["world_size"] == 1
    for r in data["restarts"]:
        assert len(r["theta"]) == len(names) and r["evals"] >= 4
        assert r["nfe"]["forward"]["sum"] > 0 and r["nfe"]["backward"]["sum"] > 0
    md = (out / "results.md").read_text()
    assert all(n in md for n in names) and "mean ± std" in md


@pytest.mark.slow
def test_fit_parameters_resume(fitp, tmp_path):
    out = tmp_path / "resume"
    one = fitp.main(["--out", str(out), *FIT_TINY, "--restarts", "1"])
    two = fitp.main(["--out", str(out), *FIT_TINY, "--resume"])  # reuses restart 1
    assert two["restarts"][0]["theta"] == one["restarts"][0]["theta"]
    assert len(two["restarts"]) == 2
    with pytest.raises(SystemExit, match="other settings"):
        fitp.main(["--out", str(out), *FIT_TINY, "--resume", "--noise", "0.2"])


@pytest.mark.slow
def test_fit_parameters_scipy_backend(fitp, tmp_path):
    out = tmp_path / "scipy"
    res = fitp.main(["--backend", "scipy", "--out", str(out), *FIT_TINY, "--restarts", "1"])
    assert res["status"] == "ok"
    assert _strict_json(out / "results.json")["args"]["backend"] == "scipy"


@pytest.mark.parametrize("name", ["fit_parameters", "ude"])
def test_julia_unavailable_is_reported(name, tmp_path, capsys):
    from pydiffbridge.backends.base import get_backend

    try:
        get_backend("julia")
        import juliacall  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure: Julia is not usable here
        pass
    else:
        pytest.skip("Julia is available here; the unavailable path cannot be exercised")
    mod = _load(name)
    tiny = FIT_TINY if name == "fit_parameters" else UDE_TINY
    res = mod.main(["--backend", "julia", "--out", str(tmp_path), *tiny])
    assert res["status"] == "backend_unavailable"
    assert "Julia" in res["error"] or "julia" in res["error"]
    err = capsys.readouterr().err
    assert "not available here" in err and "Traceback" not in err
    data = _strict_json(tmp_path / "results.json")
    assert data["status"] == "backend_unavailable" and data["error"]
    assert "backend_unavailable" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_ude_tiny(ude, tmp_path):
    res = ude.main(["--out", str(tmp_path), *UDE_TINY])
    assert res["status"] == "ok"
    for f in ("results.json", "results.md", "trajectories.png", "interaction.png", "loss.png",
              "ckpt.pt"):
        assert (tmp_path / f).stat().st_size > 0, f
    data = _strict_json(tmp_path / "results.json")
    assert data["interaction"]["rel_rms_grid"] > 0
    assert data["extrapolation"]["rms_extrap_window"] >= 0
    assert data["fit"]["iters"] >= 4
    # resuming a finished run trains no further and reproduces the result
    again = ude.main(["--out", str(tmp_path), *UDE_TINY, "--resume"])
    assert again["interaction"]["rel_rms_grid"] == pytest.approx(
        data["interaction"]["rel_rms_grid"], rel=1e-12)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fit_parameters", "ude"])
def test_torchrun_two_processes(name, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or \
        shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    tiny = FIT_TINY if name == "fit_parameters" else UDE_TINY
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [torchrun, "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(EXAMPLES / f"{name}.py"), "--out",
           str(tmp_path), *tiny]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _strict_json(tmp_path / "results.json")
    assert data["status"] == "ok"
    ws = data["summary"]["world_size"] if name == "fit_parameters" else data["world_size"]
    assert ws == 2
    # rank 0 alone prints the summary
    assert proc.stdout.count("results:") == 1


def _crash_after(mod, monkeypatch, n_saves: int):
    """Make ``mod.fit`` raise KeyboardInterrupt right after its ``n_saves``-th checkpoint, as a
    kill would; returns the real ``fit``."""
    real_fit = mod.fit
    calls = {"n": 0}

    def crashing_fit(*a, save=None, **kw):
        def save_then_crash(st):
            save(st)
            calls["n"] += 1
            if calls["n"] == n_saves:
                raise KeyboardInterrupt

        return real_fit(*a, save=save_then_crash, **kw)

    monkeypatch.setattr(mod, "fit", crashing_fit)
    return real_fit


RESUME_ARGS = ["--series", "2", "--times", "8", "--adam-iters", "6", "--patience", "0",
               "--lbfgs-iters", "1", "--lbfgs-max-iter", "2", "--ckpt-every", "2",
               "--no-progress", "--rtol", "1e-4", "--atol", "1e-6"]


@pytest.mark.slow
def test_fit_parameters_resume_mid_restart(fitp, tmp_path, monkeypatch):
    args = [*RESUME_ARGS, "--restarts", "2"]
    ref = fitp.main(["--out", str(tmp_path / "ref"), *args])
    # each restart saves after iterations 2, 4, 6 and at its end: the 6th save is restart 2
    # after 4 Adam iterations
    real_fit = _crash_after(fitp, monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        fitp.main(["--out", str(tmp_path / "run"), *args])
    monkeypatch.setattr(fitp, "fit", real_fit)
    res = fitp.main(["--out", str(tmp_path / "run"), *args, "--resume"])
    for a, b in zip(res["restarts"], ref["restarts"], strict=True):
        assert a["theta"] == b["theta"] and a["losses"] == b["losses"]
        assert a["evals"] == b["evals"] and a["nfe"] == b["nfe"]


@pytest.mark.slow
def test_ude_resume_mid_run(ude, tmp_path, monkeypatch):
    args = [*RESUME_ARGS, "--hidden", "8", "--grow-iters", "4"]
    ref = ude.main(["--out", str(tmp_path / "ref"), *args])
    real_fit = _crash_after(ude, monkeypatch, 2)  # after Adam iteration 4
    with pytest.raises(KeyboardInterrupt):
        ude.main(["--out", str(tmp_path / "run"), *args])
    monkeypatch.setattr(ude, "fit", real_fit)
    res = ude.main(["--out", str(tmp_path / "run"), *args, "--resume"])
    assert res["fit"]["losses"] == ref["fit"]["losses"]
    assert res["interaction"] == ref["interaction"]
    assert res["fit"]["nfe"] == ref["fit"]["nfe"]
