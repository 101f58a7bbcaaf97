"""``python -m pydiffbridge bench --preset stiff`` on a tiny configuration: it runs, writes
strict JSON and a table, and reports ratios at equal achieved error."""

import json

from pydiffbridge.bench.runner import main as bench_main
from pydiffbridge.bench.stiff import _interp_time


def _strict(text):
    def bad(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def test_stiff_preset_runs(tmp_path):
    rc = bench_main(["--preset", "stiff", "--problems", "hires", "--tols", "1e-3,1e-5",
                     "--batch", "2", "--batch-tols", "1e-3", "--repeats", "1", "--out",
                     str(tmp_path), "--no-progress"])
    assert rc == 0
    res = _strict((tmp_path / "stiff.json").read_text())
    methods = {(r["mode"], r["solver"], r["method"]) for r in res["rows"]}
    assert ("single", "torch", "rodas5") in methods and ("single", "scipy", "Radau") in methods
    assert ("batch2", "torch", "rodas5/per-sample") in methods
    assert ("batch2", "torch", "auto/per-sample") in methods
    assert ("batch2", "torch", "rodas5/shared") in methods and ("batch2", "scipy", "BDF") in methods
    assert all(r["ok"] for r in res["rows"])
    assert res["ratios"] and "ratio" in (tmp_path / "stiff.md").read_text()


def test_interp_time_log_log():
    curve = [(1e-4, 1.0), (1e-6, 4.0)]
    assert abs(_interp_time(curve, 1e-5) - 2.0) < 1e-12
    assert _interp_time(curve, 1e-8) is None
