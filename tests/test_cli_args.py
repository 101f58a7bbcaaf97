"""Every command line rejects bad values up front: argparse's usage error (exit code 2) that
names the argument, before any work starts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from pydiffbridge import cli, demo
from pydiffbridge.bench import adjoint_bench, boundary, runner, sync_check

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_args_example",
                                                  ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def examples():
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    return {n: _example(n) for n in ("cnf_2d", "latent_ode", "odenet_mnist")}


@pytest.fixture(scope="module")
def a_file(tmp_path_factory) -> str:
    f = tmp_path_factory.mktemp("args") / "a_file.txt"
    f.write_text("x")
    return str(f)


def _usage_error(capsys, entry, argv, flag: str, words: tuple[str, ...] = ()) -> str:
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "usage:" in err and flag in err, err
    for w in words:
        assert w in err, err
    return err


DEMO_CASES = [
    (["--niters", "0"], "--niters", (">= 1",)),
    (["--niters", "-3"], "--niters", (">= 1",)),
    (["--niters", "ten"], "--niters", ("integer",)),
    (["--rtol", "0"], "--rtol", ("(0, 1)",)),
    (["--rtol", "1.5"], "--rtol", ("(0, 1)",)),
    (["--atol=-1e-6"], "--atol", ("(0, 1)",)),
    (["--atol", "-0.5"], "--atol", ("(0, 1)",)),
    (["--atol", "nan"], "--atol", ("not finite",)),
    (["--lr", "0"], "--lr", ("> 0",)),
    (["--batch-size", "0"], "--batch-size", ()),
    (["--batch-time", "1"], "--batch-time", (">= 2",)),
    (["--data-size", "8"], "--data-size", ("--batch-time",)),
    (["--save-every", "0"], "--save-every", ()),
    (["--seed", "-1"], "--seed", ()),
    (["--method", "nope"], "--method", ("unknown method",)),
    (["--backend", "nope"], "--backend", ("invalid choice",)),
]


@pytest.mark.parametrize("argv,flag,words", DEMO_CASES)
def test_demo_rejects_bad_values(capsys, argv, flag, words) -> None:
    _usage_error(capsys, demo.main, argv, flag, words)


def test_demo_out_must_not_be_a_file(capsys, a_file) -> None:
    _usage_error(capsys, demo.main, ["--out", a_file], "--out", ("not a directory",))
    _usage_error(capsys, demo.main, ["--out", a_file + "/sub"], "--out", ("is a file",))


def test_demo_and_bench_through_the_cli(capsys) -> None:
    _usage_error(capsys, cli.main, ["demo", "--niters", "0"], "--niters")
    _usage_error(capsys, cli.main, ["bench", "--tols=-1e-3"], "--tols")
    _usage_error(capsys, cli.main, ["julia", "install", "--timeout", "-1"], "--timeout")


BENCH_CASES = [
    (["--tols=-1e-3"], "--tols", ("(0, 1)",)),
    (["--tols", "1e-6,-0.001"], "--tols", ("(0, 1)", "element 2")),
    (["--tols", "1e-3,2"], "--tols", ("element 2",)),
    (["--tols", "1e-3,,1e-6"], "--tols", ("empty element",)),
    (["--tols", ""], "--tols", ()),
    (["--repeats", "0"], "--repeats", ()),
    (["--problems", "nope"], "--problems", ("unknown name 'nope'",)),
    (["--problems", "mlp,nope"], "--problems", ("element 2",)),
    (["--backends", "torch,fortran"], "--backends", ("fortran",)),
    (["--peers", "diffrax"], "--peers", ("diffrax",)),
    (["--methods", "dopri5,"], "--methods", ()),
    (["--threads", "-1"], "--threads", ()),
    (["--device", "gpu7"], "--device", ("torch device",)),
    (["--preset", "fast"], "--preset", ("invalid choice",)),
]


@pytest.mark.parametrize("argv,flag,words", BENCH_CASES)
def test_bench_rejects_bad_values(capsys, argv, flag, words) -> None:
    _usage_error(capsys, runner.main, argv, flag, words)


def test_bench_defaults_and_presets_parse_to_lists() -> None:
    ap = runner.build_parser()
    args = ap.parse_args(["--peers", ""])
    assert args.tols == [1e-3, 1e-6] and args.methods == ["dopri5", "tsit5"]
    assert args.peers == [] and "torch" in args.backends
    ap.set_defaults(**runner.PRESETS["mlp"])
    args = ap.parse_args([])
    assert args.tols == [1e-3, 1e-6, 1e-9] and args.problems == ["mlp"]


OTHER_BENCH_CASES = [
    (adjoint_bench.main, ["--steps", "10", "0"], "--steps"),
    (adjoint_bench.main, ["--rtol", "0"], "--rtol"),
    (adjoint_bench.main, ["--batch", "-1"], "--batch"),
    (adjoint_bench.main, ["--reps", "0"], "--reps"),
    (adjoint_bench.main, ["--device", "nowhere"], "--device"),
    (boundary.main, ["--dim", "0"], "--dim"),
    (boundary.main, ["--rtol", "1"], "--rtol"),
    (boundary.main, ["--t-end", "-1"], "--t-end"),
    (boundary.main, ["--repeats", "0"], "--repeats"),
    (boundary.main, ["--backends", "torch", "fortran"], "--backends"),
    (sync_check.main, ["--sync-every", "0"], "--sync-every"),
    (sync_check.main, ["--device", "nowhere"], "--device"),
]


@pytest.mark.parametrize("entry,argv,flag", OTHER_BENCH_CASES)
def test_other_benchmarks_reject_bad_values(capsys, entry, argv, flag) -> None:
    _usage_error(capsys, entry, argv, flag)


def test_output_paths(capsys, a_file, tmp_path) -> None:
    _usage_error(capsys, runner.main, ["--out", a_file], "--out")
    _usage_error(capsys, sync_check.main, ["--out", a_file], "--out")
    _usage_error(capsys, adjoint_bench.main, ["--out", a_file + "/x"], "--out")
    _usage_error(capsys, boundary.main, ["--json", str(tmp_path)], "--json", ("directory",))


EXAMPLE_CASES = [
    ("cnf_2d", ["--iters", "0"], "--iters"),
    ("cnf_2d", ["--hidden", "8,0"], "--hidden"),
    ("cnf_2d", ["--hidden", "8,,8"], "--hidden"),
    ("cnf_2d", ["--tol", "0"], "--tol"),
    ("cnf_2d", ["--eval-tol", "2"], "--eval-tol"),
    ("cnf_2d", ["--kinetic", "-0.1"], "--kinetic"),
    ("cnf_2d", ["--method", "nope"], "--method"),
    ("cnf_2d", ["--grid", "1"], "--grid"),
    ("cnf_2d", ["--nf-iters", "0"], "--nf-iters"),
    ("cnf_2d", ["--save-every", "0"], "--save-every"),
    ("cnf_2d", ["--ckpt-every", "-2"], "--ckpt-every"),
    ("latent_ode", ["--iters", "0"], "--iters"),
    ("latent_ode", ["--keep", "0"], "--keep"),
    ("latent_ode", ["--keep", "1.5"], "--keep"),
    ("latent_ode", ["--encoder-step", "0"], "--encoder-step"),
    ("latent_ode", ["--obs-std", "0"], "--obs-std"),
    ("latent_ode", ["--rtol", "-1"], "--rtol"),
    ("latent_ode", ["--kl-anneal", "-1"], "--kl-anneal"),
    ("latent_ode", ["--method", "nope"], "--method"),
    ("latent_ode", ["--encoder-method", "nope"], "--encoder-method"),
    ("latent_ode", ["--backend", "nope"], "--backend"),
    ("latent_ode", ["--save-every", "0"], "--save-every"),
    ("odenet_mnist", ["--model", "mlp,transformer"], "--model"),
    ("odenet_mnist", ["--epochs", "0"], "--epochs"),
    ("odenet_mnist", ["--subset", "-1"], "--subset"),
    ("odenet_mnist", ["--data-dir", "/no/such/dir"], "--data-dir"),
    ("odenet_mnist", ["--dataset", "dir"], "--data-dir"),
    ("odenet_mnist", ["--tolerances", "0.1,0"], "--tolerances"),
    ("odenet_mnist", ["--sweep-steps", "1,0"], "--sweep-steps"),
    ("odenet_mnist", ["--image-size", "3"], "--image-size"),
    ("odenet_mnist", ["--tol", "1"], "--tol"),
    ("odenet_mnist", ["--device", "nowhere"], "--device"),
    ("odenet_mnist", ["--save-every", "0"], "--save-every"),
]


@pytest.mark.parametrize("name,argv,flag", EXAMPLE_CASES)
def test_examples_reject_bad_values(capsys, examples, name, argv, flag) -> None:
    _usage_error(capsys, examples[name].parse_args, argv, flag)


def test_example_defaults_still_parse(examples) -> None:
    cnf = examples["cnf_2d"].parse_args([])
    assert cnf.hidden == [64, 64, 64] and cnf.save_every == 50 and cnf.tol == 1e-4
    assert examples["cnf_2d"].parse_args(["--ckpt-every", "7"]).save_every == 7
    lat = examples["latent_ode"].parse_args([])
    assert lat.save_every == 50 and lat.keep == 0.6
    ode = examples["odenet_mnist"].parse_args([])
    assert ode.model == ["mlp", "resnet", "rknet", "odenet"] and ode.save_every == 1
    assert examples["odenet_mnist"].parse_args(["--model", "none"]).model == []
    assert examples["odenet_mnist"].parse_args(["--model", "mlp,odenet"]).model == [
        "mlp", "odenet"]


@pytest.mark.parametrize("argv,flag", [(["bench", "--tols=-1e-3"], "--tols"),
                                       (["demo", "--niters", "0"], "--niters")])
def test_python_dash_m_exit_code_2(argv, flag) -> None:
    proc = subprocess.run([sys.executable, "-m", "pydiffbridge", *argv], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert f"argument {flag}" in proc.stderr and "Traceback" not in proc.stderr
