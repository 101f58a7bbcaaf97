"""examples/latent_ode.py runs end to end on a tiny budget (issue 8)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("latent_ode_example",
                                                  ROOT / "examples" / "latent_ode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_latent_ode_example_runs_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    data = ["spirals"]
    if importlib.util.find_spec("statsmodels") is not None:
        data.append("sunspots")
    ex = _load_example()
    common = ["--data", *data, "--n-train", "8", "--n-test", "4", "--batch-size", "4",
              "--hidden", "8", "--latent-dim", "3", "--n-samples", "2", "--ckpt-every", "2",
              "--out", str(tmp_path)]
    ex.main(["--iters", "2", *common])
    ckpt = torch.load(tmp_path / "ckpt_spirals_latent.pt", weights_only=False)
    assert ckpt["state"]["iter"] == 2
    results = ex.main(["--iters", "3", "--resume", *common])
    ckpt = torch.load(tmp_path / "ckpt_spirals_latent.pt", weights_only=False)
    assert ckpt["state"]["iter"] == 3 and len(ckpt["state"]["losses"]) == 3
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(saved) == set(data) == set(results)
    for name in data:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        for kind in ("latent", "rnn"):
            r = saved[name]["models"][kind]
            assert r["iters"] == 3
            assert math.isfinite(r["extrap_mse"]) and math.isfinite(r["interp_mse"])
        assert saved[name]["models"]["latent"]["nfe_fwd"] > 0
    assert "| spirals | latent |" in (tmp_path / "results.md").read_text()
