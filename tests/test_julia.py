"""The Julia backend.

Everywhere: juliapkg.json and Project.toml agree; julia/PyDiffBridge.jl passes a structural
parse check and defines what the Python side calls; the Python half of the backend runs
against a stand-in of the Julia module; and Julia's absence is reported fast, with the cause,
in fresh subprocesses (with stand-ins of juliapkg/juliacall for the probe's branches).
Where Julia works (``@pytest.mark.julia``): solutions and gradients against SciPy references.
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pydiffbridge as pdb
from pydiffbridge._julia import runtime
from pydiffbridge.backends.julia import RETCODES, retcode_status
from pydiffbridge.backends.methods import native_methods
from pydiffbridge.solution import Status

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
JL = ROOT / "julia" / "PyDiffBridge.jl"
F64 = torch.float64

_REASON = runtime.availability()
needs_julia = pytest.mark.skipif(_REASON != "", reason=f"Julia unavailable: {_REASON[:160]}")


# --------------------------------------------------------------------- package metadata
def test_juliapkg_json_and_project_toml_agree():
    pkg = json.loads((ROOT / "pydiffbridge" / "juliapkg.json").read_text())
    proj = tomllib.loads((ROOT / "Project.toml").read_text())
    deps = {k: v["uuid"] for k, v in pkg["packages"].items()}
    gpu = {k: v["uuid"] for k, v in pkg["optional"]["gpu"].items()}
    assert deps == proj["deps"]
    assert gpu == proj["extras"]
    assert not set(deps) & set(gpu)
    for name, spec in {**pkg["packages"], **pkg["optional"]["gpu"]}.items():
        assert proj["compat"][name] == spec["version"], name
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                            spec["uuid"]), name
    assert proj["compat"]["julia"] == pkg["julia"]
    assert "OrdinaryDiffEq" in deps and {"DiffEqGPU", "CUDA"} <= set(gpu)


# ------------------------------------------------------------- Julia source structure
_OPENERS = {"function", "module", "baremodule", "if", "for", "while", "let", "begin", "do",
            "try", "struct", "macro", "quote"}
_TOKEN = re.compile(r'#=|=#|"""|"|\'(?:\\.|[^\\\'])\'|#|\[|\]|\(|\)|\{|\}|[A-Za-z_][A-Za-z_0-9!]*'
                    r'|\n|.', re.S)


def julia_blocks(src: str) -> list[str]:
    """Check that block keywords and brackets of Julia source balance, skipping comments,
    strings and characters; ``end`` inside ``[...]`` is an index and ``for``/``if`` inside
    brackets are comprehension clauses.  Returns the names of top-level ``module`` blocks;
    raises AssertionError on imbalance."""
    stack: list[tuple[str, int]] = []
    modules, line, i, toks = [], 1, 0, _TOKEN.findall(src)
    pending_module = False
    while i < len(toks):
        tok = toks[i]
        i += 1
        if tok == "\n":
            line += 1
        elif tok == "#=":
            depth = 1
            while depth and i < len(toks):
                depth += {"#=": 1, "=#": -1}.get(toks[i], 0)
                line += toks[i] == "\n"
                i += 1
        elif tok == "#":
            while i < len(toks) and toks[i] != "\n":
                i += 1
        elif tok in ('"', '"""'):
            while i < len(toks) and toks[i] != tok:
                if toks[i] == "\\":
                    i += 1
                line += toks[i] == "\n"
                i += 1
            assert i < len(toks), f"unterminated string from line {line}"
            i += 1
        elif tok in "([{" and len(tok) == 1:
            stack.append((tok, line))
        elif tok in ")]}" and len(tok) == 1:
            assert stack and stack[-1][0] == {")": "(", "]": "[", "}": "{"}[tok], \
                f"unbalanced {tok!r} at line {line} (open: {stack[-1:]})"
            stack.pop()
        elif tok == "end":
            if stack and stack[-1][0] == "[":
                continue  # x[end]
            assert stack and stack[-1][0] in _OPENERS, f"stray 'end' at line {line}"
            stack.pop()
        elif tok in _OPENERS:
            if tok in ("for", "if") and stack and stack[-1][0] in "([{":
                continue  # comprehension / generator clause
            if tok in ("module", "baremodule") and not stack:
                pending_module = True
            stack.append((tok, line))
        elif pending_module and re.fullmatch(r"[A-Za-z_]\w*", tok):
            modules.append(tok)
            pending_module = False
    assert not stack, f"unclosed blocks: {stack}"
    return modules


def test_structural_checker_catches_mistakes():
    assert julia_blocks("module M\nf(x) = x[end]\nfunction g()\n [i for i in 1:3 if i > 1]"
                        "\nend\nend") == ["M"]
    with pytest.raises(AssertionError, match="unclosed"):
        julia_blocks("module M\nfunction g()\n if true\n 1\n end\nend")
    with pytest.raises(AssertionError, match="stray"):
        julia_blocks("function g()\n1\nend\nend")
    with pytest.raises(AssertionError, match="unbalanced"):
        julia_blocks("f(x = (1, 2]")
    # keywords in comments and strings do not count
    assert julia_blocks('module M\n# function\n#= if for =#\ns = "end begin"\nend') == ["M"]


def test_julia_source_structure_and_entry_points():
    src = JL.read_text()
    assert julia_blocks(src) == ["PyDiffBridge"]
    for name in ("api_version", "algorithm", "solve_ode", "solve_ensemble_src"):
        assert re.search(rf"^(function {name}\(|{name}\(.*\) =)", src, re.M), name
    # every Julia method of the cross-engine map has a constructor in ALGORITHMS
    table = src[src.index("const ALGORITHMS"):src.index("const FIXED_STEP")]
    keys = set(re.findall(r'"([^"]+)" =>', table))
    assert set(native_methods("julia")) <= keys, set(native_methods("julia")) - keys
    # the keyword arguments the Python side passes exist in solve_ode's signature
    sig = src[src.index("function solve_ode("):]
    sig = sig[:sig.index(")\n")]
    for kw in ("reltol", "abstol", "event", "nevent", "dt", "dtmax", "dtmin", "maxiters",
               "tstops", "jumps", "fixed"):
        assert re.search(rf"\b{kw} =", sig), kw
    ens = src[src.index("function solve_ensemble_src("):]
    ens = ens[:ens.index(")\n")]
    for kw in ("reltol", "abstol", "gpu", "maxiters"):
        assert re.search(rf"\b{kw} =", ens), kw


def test_retcode_map():
    assert retcode_status("Success") == Status.SUCCESS
    assert retcode_status("ReturnCode.MaxIters") == Status.MAX_STEPS
    assert retcode_status("DtLessThanMin") == Status.STEP_UNDERFLOW
    assert retcode_status("Unstable") == Status.NONFINITE
    assert retcode_status("Terminated", with_event=True) == Status.EVENT
    assert retcode_status("Terminated") == Status.FAILED
    assert retcode_status("SomethingNew") == Status.FAILED
    assert set(RETCODES) >= {"MaxIters", "DtLessThanMin", "Unstable", "DtNaN", "Failure"}


# ------------------------------------------ the Python half against a stand-in module
class FakeJulia:
    """Stands in for the Julia module: integrates with SciPy, calling the in-place callback
    the way Julia does (writing into ``du``)."""

    def __init__(self, retcode="Success"):
        self.retcode = retcode
        self.kwargs = None

    def solve_ode(self, f, u0, ts, tend, name, **kw):
        self.kwargs = dict(kw, name=name)

        def fun(t, u):
            du = np.empty_like(u)
            f(du, u, t)
            return du

        r = solve_ivp(fun, (ts[0], tend), u0, t_eval=ts, method="DOP853", rtol=1e-11,
                      atol=1e-13)
        return SimpleNamespace(t=r.t, u=r.y, retcode=self.retcode, nf=r.nfev, naccept=10,
                               nreject=2)


def test_backend_python_side_with_stand_in(monkeypatch):
    fake = FakeJulia()
    monkeypatch.setitem(runtime._STATE, "module", fake)
    t = torch.linspace(0, 2, 5, dtype=F64)
    w = torch.tensor(1.3, dtype=F64)
    sol = pdb.solve(lambda t, y: torch.stack([y[1], -w * w * y[0]]),
                    torch.tensor([1.0, 0.0], dtype=F64), t, backend="julia", method="tsit5",
                    rtol=1e-9, atol=torch.tensor([1e-10, 1e-11]),
                    options={"max_num_steps": 77, "jump_t": [0.5]})
    assert torch.allclose(sol.ys[:, 0], torch.cos(1.3 * t), atol=1e-9)
    assert sol.method == "Tsit5" and sol.stats.steps == 12 and sol.stats.nfe > 0
    kw = fake.kwargs
    assert kw["name"] == "Tsit5" and kw["maxiters"] == 77 and kw["reltol"] == 1e-9
    np.testing.assert_allclose(kw["abstol"], [1e-10, 1e-11])
    np.testing.assert_array_equal(kw["jumps"], [0.5])
    fake.retcode = "MaxIters"
    with pytest.raises(pdb.MaxStepsExceededError, match="MaxIters"):
        pdb.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), t, backend="julia")
    with pytest.raises(pdb.UnknownMethodError, match="backend='scipy'"):
        pdb.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), t, backend="julia",
                   method="LSODA")


def test_julia_ensemble_checks_inputs_before_starting_julia():
    from pydiffbridge.ensemble import solve_ensemble

    src = "f(u, p, t) = SVector(-p[1] * u[1])"
    with pytest.raises(pdb.InputError, match="y0s"):
        solve_ensemble(src, torch.ones(3), torch.linspace(0, 1, 3))
    with pytest.raises(pdb.InputError, match="params"):
        solve_ensemble(src, torch.ones(3, 1), torch.linspace(0, 1, 3), params=torch.ones(2, 1))
    with pytest.raises(pdb.InputError, match="device"):
        solve_ensemble(src, torch.ones(3, 1), torch.linspace(0, 1, 3), device="tpu")
    with pytest.raises(pdb.InputError, match="g\\(u, p, t\\)"):
        solve_ensemble(src, torch.ones(3, 1), torch.linspace(0, 1, 3), func_name="g")


# ------------------------------------------------------------------- fast failure
_SCRIPT = textwrap.dedent("""
    import json, torch, pydiffbridge as pdb
    msgs = []
    for _ in range(2):
        try:
            pdb.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), backend="julia")
            msgs.append("no error")
        except pdb.JuliaUnavailableError as exc:
            msgs.append(str(exc))
    print("RESULT " + json.dumps(msgs))
""")

_FAKE_JULIAPKG = textwrap.dedent("""
    import os, time
    def resolve(dry_run=False, **kw):
        with open(os.environ["FAKE_LOG"], "a") as fh:
            fh.write("resolve\\n")
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
        return os.environ.get("FAKE_RESOLVED") == "1"
    def executable():
        return "/fake/julia"
""")


def _run(env_extra: dict, fake_dir: Path | None = None) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYDIFFBRIDGE_JULIA",
                                                                    "PYTHON_JULIAPKG"))}
    env.update(env_extra)
    if fake_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(fake_dir), str(ROOT),
                                             env.get("PYTHONPATH", "")])
    # the guard against a hang; the real check is that the error comes at all
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-2000:]
    return json.loads(lines[-1][7:]), proc.stderr


@pytest.mark.skipif(_REASON == "", reason="Julia is available here")
def test_backend_julia_fails_fast_here_in_a_subprocess():
    msgs, _ = _run({})
    assert msgs[0] == msgs[1] != "no error"
    assert "Julia backend is unavailable" in msgs[0] and "julia install" in msgs[0]
    assert "backend='scipy'" in msgs[0]


@pytest.fixture
def fake_julia(tmp_path):
    (tmp_path / "juliapkg").mkdir()
    (tmp_path / "juliapkg" / "__init__.py").write_text(_FAKE_JULIAPKG)
    (tmp_path / "juliapkg" / "state.py").write_text("STATE = {'project': '/fake/project'}\n")
    (tmp_path / "juliacall").mkdir()
    (tmp_path / "juliacall" / "__init__.py").write_text(
        "raise ImportError('fake juliacall cannot start Julia')\n")
    log = tmp_path / "probe.log"
    return tmp_path, {"FAKE_LOG": str(log)}, log


def test_install_switch_disables_auto_install(fake_julia):
    d, env, log = fake_julia
    msgs, _ = _run({**env, "PYDIFFBRIDGE_JULIA_INSTALL": "0"}, d)
    assert "disabled by PYDIFFBRIDGE_JULIA_INSTALL=0" in msgs[0] and msgs[1] == msgs[0]
    assert log.read_text().count("resolve") == 1  # the failure is cached, no second probe
    msgs, _ = _run({**env, "PYTHON_JULIAPKG_OFFLINE": "yes"}, d)
    assert "disabled by PYTHON_JULIAPKG_OFFLINE=yes" in msgs[0]


def test_unreachable_servers_fail_fast(fake_julia):
    d, env, _ = fake_julia
    msgs, _ = _run({**env, "JULIA_PKG_SERVER": "https://pydiffbridge-test.invalid",
                    "PYTHON_JULIAPKG_EXE": "/fake/julia"}, d)
    assert "cannot be reached" in msgs[0] and "pydiffbridge-test.invalid" in msgs[0]


def test_hanging_probe_is_cut_by_the_timeout(fake_julia):
    d, env, _ = fake_julia
    msgs, _ = _run({**env, "FAKE_SLEEP": "60", "PYDIFFBRIDGE_JULIA_PROBE_TIMEOUT": "2"}, d)
    assert "did not answer within 2 s" in msgs[0]


def test_broken_juliacall_start_and_import_order_warning(fake_julia):
    d, env, _ = fake_julia
    msgs, err = _run({**env, "FAKE_RESOLVED": "1"}, d)
    assert "could not start Julia" in msgs[0] and "fake juliacall" in msgs[0]
    assert "JuliaImportOrderWarning" in err and "torch was imported before juliacall" in err
    assert os.environ.get("PYTHON_JULIACALL_HANDLE_SIGNALS") is None  # this process untouched


# ------------------------------------------------------------- with a working Julia
@pytest.mark.julia
@needs_julia
@pytest.mark.parametrize("method", ["DP5", "Tsit5", "Vern9", "BS3", "Rodas5", "KenCarp4"])
def test_julia_agrees_with_dop853_reference(method):
    def lv(t, y):
        return torch.stack([1.5 * y[0] - y[0] * y[1], y[0] * y[1] - 3.0 * y[1]])

    t_out = np.linspace(0, 4, 9)
    ref = solve_ivp(lambda t, y: lv(t, torch.tensor(y)).numpy(), (0, 4), [1.0, 1.0],
                    method="DOP853", t_eval=t_out, rtol=1e-12, atol=1e-14)
    ys = pdb.odeint(lv, torch.tensor([1.0, 1.0], dtype=F64), torch.tensor(t_out),
                    backend="julia", method=method, rtol=1e-8, atol=1e-10)
    assert np.allclose(ys.numpy(), ref.y.T, atol=1e-5)


@pytest.mark.julia
@needs_julia
def test_julia_adjoint_gradcheck_and_torch_agreement():
    lin = torch.nn.Linear(2, 2).double()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    y0 = torch.tensor([0.3, -0.4], dtype=F64, requires_grad=True)

    def run(y):
        return pdb.odeint_adjoint(lambda t, y: torch.tanh(lin(y)), y, t, backend="julia",
                                  method="Vern9", rtol=1e-11, atol=1e-13,
                                  adjoint_params=tuple(lin.parameters()))

    assert torch.autograd.gradcheck(run, (y0,), atol=1e-5, rtol=1e-4)
    ref = torch.autograd.grad(pdb.odeint(lambda t, y: torch.tanh(lin(y)), y0, t, rtol=1e-11,
                                         atol=1e-13).sum(), (y0, lin.weight))
    got = torch.autograd.grad(run(y0).sum(), (y0, lin.weight))
    for r, g in zip(ref, got, strict=True):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.julia
@needs_julia
def test_julia_retcode_and_event():
    t = torch.linspace(0, 10, 3, dtype=F64)
    sol = pdb.solve(lambda t, y: -y, torch.ones(1, dtype=F64), t, backend="julia",
                    options={"max_num_steps": 3})
    assert sol.status == Status.MAX_STEPS
    event_t, _ = pdb.odeint_event(lambda t, y: torch.stack([y[1], -y[0]]),
                                  torch.tensor([0.0, 1.0], dtype=F64),
                                  torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0] - 0.5,
                                  backend="julia", method="Vern9", rtol=1e-11, atol=1e-13)
    assert abs(float(event_t) - math.pi / 6) < 1e-7


@pytest.mark.julia
@needs_julia
def test_julia_ensemble_matches_closed_form():
    from pydiffbridge.ensemble import solve_ensemble

    y0s = torch.tensor([[1.0], [2.0], [-0.5]], dtype=F64)
    ps = torch.tensor([[0.5], [1.0], [2.0]], dtype=F64)
    t = torch.linspace(0, 1, 5, dtype=F64)
    sol = solve_ensemble("f(u, p, t) = SVector(-p[1] * u[1])", y0s, t, params=ps,
                         rtol=1e-10, atol=1e-12)
    exact = y0s[None, :, 0] * torch.exp(-ps[None, :, 0] * t[:, None])
    assert sol.success and torch.allclose(sol.ys[..., 0], exact, atol=1e-8)
