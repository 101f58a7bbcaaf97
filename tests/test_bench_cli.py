"""The benchmark CLI end to end on a tiny configuration, and its problems' references."""

from __future__ import annotations

import json

import pytest
import torch

from pydiffbridge.bench import problems as P
from pydiffbridge.bench.runner import main

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_cli_tiny_run_writes_three_outputs(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["--problems", "linear100,cnf", "--methods", "dopri5", "--tols", "1e-3,1e-6",
               "--repeats", "1", "--backends", "torch", "--peers", "torchdiffeq",
               "--batch-mode", "both", "--out", str(out), "--no-progress", "--memory"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    png = (out / "work_precision.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    rows = [r for r in res["rows"] if "skipped" not in r]
    solvers = {r["solver"] for r in rows}
    assert {"ours-torch", "ours-torch/per-sample"} <= solvers
    for r in rows:
        assert r["nfe"] > 0 and r["steps"] > 0 and r["time_s"] > 0
        assert r["error"] < 100 * r["tol"]  # errors are measured against the references
    # a tighter tolerance gives a smaller error on the closed-form linear problem
    lin = {r["tol"]: r["error"] for r in rows if r["problem"] == "linear100"
           and r["solver"] == "ours-torch"}
    assert lin[1e-6] < lin[1e-3]
    assert "| ours-torch | dopri5 | 0.001 |" in md and "per-sample vs shared" in md


def test_cli_float32_and_the_zero_overhead_bound(tmp_path):
    pytest.importorskip("torchdiffeq", reason="the peer comparison needs torchdiffeq")
    out = tmp_path / "bench32"
    rc = main(["--problems", "mlp", "--methods", "dopri5", "--tols", "1e-3", "--repeats", "1",
               "--backends", "torch", "--peers", "torchdiffeq", "--dtype", "float32",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["dtype"] == "float32"
    ours = next(r for r in res["rows"] if r["solver"] == "ours-torch")
    tdq = next(r for r in res["rows"] if r["solver"] == "torchdiffeq")
    # the same float32 algorithm as torchdiffeq: the same NFE and (against the float64
    # reference) nearly the same error
    assert ours["nfe"] == tdq["nfe"]
    assert 0 < ours["error"] and abs(ours["error"] - tdq["error"]) < 0.1 * tdq["error"]
    md = (out / "results.md").read_text()
    bound = tdq["time_s"] / (ours["nfe"] * ours["func_call_s"])
    assert f"at most {bound:.2f}×" in md


def test_unknown_problem_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["--problems", "nope", "--out", str(tmp_path)])


def test_linear_reference_is_the_matrix_exponential():
    p = P.linear_problem(dim=5)
    # d/dt of the reference equals A y (central difference of the closed form)
    eps = 1e-6
    A = p.func.A
    y1 = p.reference[1][0]
    fwd = p.y0 @ torch.linalg.matrix_exp(A * (1 + eps)).T
    bwd = p.y0 @ torch.linalg.matrix_exp(A * (1 - eps)).T
    torch.testing.assert_close(((fwd - bwd) / (2 * eps))[0], A @ y1, rtol=1e-6, atol=1e-8)


def test_mlp_trace_is_the_jacobian_trace():
    f = P.MLP(seed=3, scale=1.5).double()
    y = torch.randn(4, 2, dtype=torch.float64)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: f(0.0, v), y[i])
                       for i in range(4)])
    torch.testing.assert_close(f.trace_jac(y), jac.diagonal(dim1=1, dim2=2).sum(-1))


def test_sync_check_counts_host_reads_per_step(tmp_path):
    # the host loop decides in Python floats: at least one read per step; the branch-free
    # loops read once per sync_every steps (the same torch code path as on CUDA)
    from pydiffbridge.bench import sync_check as S

    assert S.main(["--device", "cpu", "--sync-every", "8", "--out", str(tmp_path)]) == 0
    rows = {r["kind"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(rows) == set(S.KINDS)
    assert rows["shared/host loop"]["host_reads_per_step"] >= 1.0
    for kind in ("shared/device loop", "per-sample"):
        r = rows[kind]
        assert r["runs"][1]["steps"] > r["runs"][0]["steps"] + 50
        assert r["host_reads_per_step"] <= 1 / 8 + 0.02, kind
    assert "per extra step" in (tmp_path / "results.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_sync_check_on_cuda_no_sync_inside_steps():
    from pydiffbridge.bench import sync_check as S

    for kind in ("shared/device loop", "per-sample"):
        r = S.marginal_reads(kind, "cuda", sync_every=8)
        assert r["cuda_syncs_per_step"] <= 1 / 8 + 0.02, (kind, r)
        assert r["host_reads_per_step"] <= 1 / 8 + 0.02, (kind, r)
