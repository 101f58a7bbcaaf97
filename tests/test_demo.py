"""The README's main job runs end to end, writes its outputs and resumes."""

import json

import pytest

from pydiffbridge import demo


@pytest.mark.slow
def test_demo_runs_and_resumes(tmp_path):
    out = tmp_path / "demo"
    res = demo.main(["--niters", "30", "--data-size", "200", "--out", str(out), "--quiet"])
    assert (out / "spiral.png").stat().st_size > 10_000
    assert (out / "checkpoint.pt").exists()
    saved = json.loads((out / "result.json").read_text())
    assert saved["iterations"] == 30 and res["mean_nfe_forward"] > 0
    # resuming to 40 iterations trains only 10 more
    res2 = demo.main(["--niters", "40", "--data-size", "200", "--out", str(out), "--quiet",
                      "--resume", "--adjoint"])
    assert res2["iterations"] == 40 and res2["mean_nfe_backward"] > 0


@pytest.mark.slow
def test_demo_through_the_cli(tmp_path):
    from pydiffbridge.cli import main

    rc = main(["demo", "--niters", "5", "--data-size", "100", "--out", str(tmp_path), "--quiet"])
    assert rc == 0 and (tmp_path / "result.json").exists()
