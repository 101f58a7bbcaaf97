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
import platform
import sys
from collections.abc import Sequence

__all__ = ["main", "info"]

_PEERS = ("torch", "numpy", "scipy", "juliacall", "juliapkg", "torchdiffeq", "torchode")


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
    ji.add_argument("--timeout", type=float, default=None, help="seconds (default 3600)")
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
