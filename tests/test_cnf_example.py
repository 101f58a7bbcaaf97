"""End-to-end runs of examples/cnf_2d.py on a tiny budget (CNF, planar pair, resume)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cnf_2d.py"
TINY = ["--n-test", "200", "--n-samples", "200", "--grid", "12", "--batch-size", "64",
        "--hidden", "8,8", "--tol", "1e-3", "--eval-tol", "1e-4", "--ckpt-every", "1"]


def load_example():
    spec = importlib.util.spec_from_file_location("cnf_2d_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_cnf_example_runs_and_resumes(tmp_path):
    ex = load_example()
    out = tmp_path / "run"
    args = ["--data", "8gaussians", "--trace", "hutchinson", "--kinetic", "0.1",
            "--out", str(out), *TINY]
    ex.main(["--iters", "2", *args])
    ck = torch.load(out / "ckpt_cnf.pt", weights_only=False)
    assert ck["iter"] == 2 and len(ck["history"]) == 2
    (res,) = ex.main(["--iters", "4", "--resume", *args])
    assert res["iters"] == 4  # 2 resumed + 2 new, not 4 new
    data = json.loads((out / "results.json").read_text())
    (r,) = data["results"]
    assert r["model"] == "cnf" and r["trace"] == "hutchinson"
    assert math.isfinite(r["test_ll"]) and r["nfe_forward_last10pct"] > 0
    assert r["nfe_backward_last10pct"] > 0  # adjoint gradients re-run the dynamics
    for fig in ("density_cnf.png", "transform_cnf.png", "results.md"):
        assert (out / fig).stat().st_size > 0


@pytest.mark.slow
def test_cnf_example_planar_comparison_equal_budgets(tmp_path):
    ex = load_example()
    results = ex.main(["--data", "moons", "--compare-planar", "--planar-width", "5",
                       "--iters", "2", "--out", str(tmp_path), *TINY])
    by = {r["model"]: r for r in results}
    assert set(by) == {"planar-nf", "planar-cnf"}
    assert by["planar-nf"]["params"] == by["planar-cnf"]["params"] == 35
    assert all(math.isfinite(r["test_ll"]) for r in results)
    assert (tmp_path / "density_planar-nf.png").exists()
    assert "planar-cnf" in (tmp_path / "results.md").read_text()


def test_cnf_example_help(capsys):
    with pytest.raises(SystemExit) as exc:
        load_example().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--compare-planar" in text and "--kinetic" in text and "--resume" in text
