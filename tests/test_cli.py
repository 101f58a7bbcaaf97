"""``python -m pydiffbridge``: info, julia status/install, and the bench/demo delegation."""

import json
import subprocess
import sys
import types

import pytest

from pydiffbridge import cli
from pydiffbridge._julia import runtime

JULIA_REASON = runtime.availability()


def test_info_json_lists_versions_and_backends(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    import numpy
    import torch

    assert data["packages"]["torch"] == torch.__version__
    assert data["packages"]["numpy"] == numpy.__version__
    assert data["backends"]["torch"] == "" and data["backends"]["scipy"] == ""
    assert data["backends"]["julia"] == JULIA_REASON


def test_info_text_says_why_a_backend_is_unavailable(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch  available" in out and "scipy  available" in out
    if JULIA_REASON:
        assert "julia  unavailable: " in out


def test_julia_status_never_fails(capsys):
    assert cli.main(["julia", "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["ready"] == (JULIA_REASON == "" and bool(st["resolved"]))
    assert st["source"].endswith("PyDiffBridge.jl")


@pytest.mark.skipif(JULIA_REASON == "", reason="Julia is available here")
def test_julia_install_reports_the_cause_and_exit_code(capsys):
    assert cli.main(["julia", "install"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the Julia backend is unavailable")


@pytest.mark.parametrize("cmd,module", [("bench", "pydiffbridge.bench.runner"),
                                        ("demo", "pydiffbridge.demo")])
def test_bench_and_demo_are_delegated_with_their_arguments(monkeypatch, cmd, module):
    seen = {}
    fake = types.ModuleType(module)
    fake.main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([cmd, "--quick", "--out", "x"]) == 3
    assert seen["argv"] == ["--quick", "--out", "x"]


def test_missing_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "pydiffbridge", "info", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["backends"]) >= {"torch", "scipy", "julia"}
