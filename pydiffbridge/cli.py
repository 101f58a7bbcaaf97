"""``python -m pydiffbridge ...`` (also the ``pydiffbridge`` console script).

Subcommands:
  info                    versions, backends and why any is unavailable
  julia status            what is known about Julia (never starts it)
  julia install [--gpu]   install Julia + OrdinaryDiffEq (and DiffEqGPU/CUDA) via juliapkg
  bench ...               the benchmark runner (pydiffbridge.bench.runner)
  demo ...                the demo (pydiffbridge.demo)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "info", "positive_int", "nonneg_int", "int_at_least", "positive_float",
           "nonneg_float", "tolerance", "fraction", "comma_list", "choice_list", "existing_dir",
           "output_dir", "output_file", "device_spec"]

_PEERS = ("torch", "numpy", "scipy", "juliacall", "juliapkg", "torchdiffeq", "torchode")


# ------------------------------------------------------------------ argparse value types
# Each raises argparse.ArgumentTypeError, so a bad value gives argparse's usage message naming
# the argument ("argument --niters: ...") and exit code 2, before any work starts.
def int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    """An ``argparse`` type: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}{what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{what}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def _float(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r} (not finite)")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a finite float ``> 0``."""
    value = _float(text, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def nonneg_float(text: str) -> float:
    """An ``argparse`` type: a finite float ``>= 0``."""
    value = _float(text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def tolerance(text: str) -> float:
    """An ``argparse`` type: a solver tolerance, a float in the open interval (0, 1)."""
    value = _float(text, "a tolerance in (0, 1), e.g. 1e-6")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"a tolerance must lie in (0, 1), e.g. 1e-6; got {value:g}")
    return value


def fraction(text: str) -> float:
    """An ``argparse`` type: a float in (0, 1]."""
    value = _float(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value:g}")
    return value


def comma_list(item: Callable[[str], Any], allow_empty: bool = False
               ) -> Callable[[str], list]:
    """An ``argparse`` type: a comma-separated list, each element parsed (and validated) by
    ``item``; the message names the offending element."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if parts == [""]:
            if allow_empty:
                return []
            raise argparse.ArgumentTypeError("expected a comma-separated list, got ''")
        out = []
        for i, part in enumerate(parts):
            if not part:
                raise argparse.ArgumentTypeError(
                    f"empty element {i + 1} in {text!r} (stray comma?)")
            try:
                out.append(item(part))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(
                    f"element {i + 1} of {text!r}: {exc}") from None
        return out

    parse.__name__ = "comma-separated list"
    return parse


def choice_list(choices: Sequence[str], allow_empty: bool = False) -> Callable[[str], list]:
    """An ``argparse`` type: a comma-separated list of names out of ``choices``."""

    def name(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"unknown name {text!r}; choose from {', '.join(choices)}")
        return text

    return comma_list(name, allow_empty)


def existing_dir(text: str) -> Path:
    """An ``argparse`` type: a directory that exists."""
    path = Path(text).expanduser()
    if not path.is_dir():
        why = "is not a directory" if path.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {why}; pass an existing directory")
    return path


def _blocking_file(path: Path) -> Path | None:
    """The first existing non-directory among ``path``'s ancestors, if any."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def output_dir(text: str) -> str:
    """An ``argparse`` type: a directory to write into (created later if missing); refuses
    an existing file or a path below one."""
    path = Path(text).expanduser()
    if not text:
        raise argparse.ArgumentTypeError("expected a directory path, got ''")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    block = _blocking_file(path)
    if block is not None:
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {block} is a file")
    return text


def output_file(text: str) -> str:
    """An ``argparse`` type: a file to write (its folder is created later if missing)."""
    path = Path(text).expanduser()
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file path")
    block = _blocking_file(path)
    if block is not None:
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {block} is a file")
    return text


def device_spec(text: str) -> str:
    """An ``argparse`` type: a torch device string (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device ({' '.join(str(exc).split())[:120]}); use e.g. "
            "cpu, cuda or cuda:0") from None
    return text


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """Versions of pydiffbridge and its engines, and each backend's availability."""
    import pydiffbridge
    from pydiffbridge.backends.base import available_backends

    return {
        "pydiffbridge": pydiffbridge.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PEERS},
        "backends": available_backends(),
    }


def _print_info(as_json: bool) -> int:
    data = info()
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"pydiffbridge {data['pydiffbridge']} (Python {data['python']}, {data['platform']})")
    print("packages:")
    for name, ver in data["packages"].items():
        print(f"  {name:12s} {ver or 'not installed'}")
    print("backends:")
    for name, reason in data["backends"].items():
        print(f"  {name:6s} {'available' if not reason else 'unavailable: ' + reason}")
    return 0


def _julia(args: argparse.Namespace) -> int:
    from pydiffbridge._julia import runtime
    from pydiffbridge.errors import JuliaUnavailableError

    if args.julia_cmd == "install":
        try:
            st = runtime.install(gpu=args.gpu, timeout=args.timeout)
        except JuliaUnavailableError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    else:
        st = runtime.status()
    if args.json:
        print(json.dumps(st.as_dict(), indent=2))
    else:
        print(f"Julia backend: {'ready' if st.ready else 'not ready'}")
        rows = [("juliacall", st.juliacall or "not installed"),
                ("resolved", st.resolved), ("executable", st.executable),
                ("project", st.project), ("source", st.source),
                ("auto-install", "enabled" if st.install_enabled
                 else f"disabled by {st.install_disabled_by}")]
        for key, val in rows:
            print(f"  {key:12s} {val}")
        if st.reason:
            print(f"  reason       {st.reason}")
    return 0 if (st.ready or args.julia_cmd == "status") else 1


def _delegate(target: str, argv: list[str]) -> int:
    mod_name, func = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        print(f"error: {mod_name} is not available ({exc})", file=sys.stderr)
        return 2
    rc = getattr(mod, func)(argv)
    # entry points return an exit code, or (like demo.main) a result object meaning success
    return rc if isinstance(rc, int) else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pydiffbridge",
                                description="pydiffbridge command line: information, Julia "
                                            "setup, benchmarks and the demo.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="versions, backends and why any is unavailable")
    pi.add_argument("--json", action="store_true", help="print JSON")
    pj = sub.add_parser("julia", help="Julia backend: status or install")
    jsub = pj.add_subparsers(dest="julia_cmd", required=True)
    js = jsub.add_parser("status", help="report Julia's state (does not start Julia)")
    js.add_argument("--json", action="store_true", help="print JSON")
    ji = jsub.add_parser("install", help="install Julia and its packages via juliapkg")
    ji.add_argument("--gpu", action="store_true", help="also install DiffEqGPU and CUDA")
    ji.add_argument("--timeout", type=positive_float, default=None,
                    help="seconds (default 3600)")
    ji.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("bench", help="run benchmarks (pydiffbridge.bench.runner); "
                                 "arguments are passed on", add_help=False)
    sub.add_parser("demo", help="run the demo (pydiffbridge.demo); arguments are passed on",
                   add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _delegate("pydiffbridge.bench.runner:main", argv[1:])
    if argv and argv[0] == "demo":
        return _delegate("pydiffbridge.demo:main", argv[1:])
    args = _parser().parse_args(argv)
    if args.cmd == "info":
        return _print_info(args.json)
    return _julia(args)
