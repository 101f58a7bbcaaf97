"""THE Julia boundary: the only module that imports juliacall.

Julia starts lazily, on the first Julia solve.  Before that:

1. ``PYTHON_JULIACALL_THREADS=auto`` and ``PYTHON_JULIACALL_HANDLE_SIGNALS=yes`` become the
   defaults (a user's own setting wins); a warning says when juliacall was imported before
   they could apply, or when torch was loaded first (the order that can crash on start on
   some Linux systems because both ship their own libstdc++/LLVM).
2. A probe in a *subprocess with a timeout* asks juliapkg, without installing anything,
   whether Julia and the packages of ``pydiffbridge/juliapkg.json`` are ready.  If not, and
   installation is allowed (``PYDIFFBRIDGE_JULIA_INSTALL`` is not ``0`` and
   ``PYTHON_JULIAPKG_OFFLINE`` is not ``yes``), the probe checks that the download servers
   resolve, and only then is juliapkg run to install (streaming its progress).  Any failure
   raises :class:`~pydiffbridge.errors.JuliaUnavailableError` naming the cause and the fixes,
   within seconds, and is remembered for the rest of the process: no hang, no second try.
3. ``julia/PyDiffBridge.jl`` is included into a module of our own (``PyDiffBridgeHost``),
   never into ``Main``.

Environment variables read here: ``PYDIFFBRIDGE_JULIA_INSTALL`` (``0`` disables the automatic
install), ``PYDIFFBRIDGE_JULIA_PROBE_TIMEOUT`` (seconds, default 20),
``PYDIFFBRIDGE_JULIA_INSTALL_TIMEOUT`` (seconds, default 3600),
``PYDIFFBRIDGE_JULIA_SOURCE`` (path of an alternative ``PyDiffBridge.jl``),
``PYDIFFBRIDGE_JULIA_IMPORT_WARNING`` (``0`` silences the import-order warning); juliapkg's
own ``PYTHON_JULIAPKG_EXE``, ``PYTHON_JULIAPKG_OFFLINE``, ``PYTHON_JULIAPKG_PROJECT`` and
``JULIA_PKG_SERVER`` are honoured (the probe and the installer run juliapkg itself).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import JuliaUnavailableError

__all__ = ["JuliaStatus", "JuliaImportOrderWarning", "availability", "get_module", "install",
           "julia_source_path", "status", "reset", "JULIACALL_DEFAULTS", "GPU_PACKAGES"]

ENV_INSTALL = "PYDIFFBRIDGE_JULIA_INSTALL"
ENV_PROBE_TIMEOUT = "PYDIFFBRIDGE_JULIA_PROBE_TIMEOUT"
ENV_INSTALL_TIMEOUT = "PYDIFFBRIDGE_JULIA_INSTALL_TIMEOUT"
ENV_SOURCE = "PYDIFFBRIDGE_JULIA_SOURCE"
ENV_IMPORT_WARNING = "PYDIFFBRIDGE_JULIA_IMPORT_WARNING"
JULIACALL_DEFAULTS = {"PYTHON_JULIACALL_THREADS": "auto", "PYTHON_JULIACALL_HANDLE_SIGNALS": "yes"}
_FALSE = {"0", "no", "false", "off"}
_PKG_DIR = Path(__file__).resolve().parent.parent
JULIAPKG_JSON = _PKG_DIR / "juliapkg.json"


def _gpu_packages() -> dict[str, dict[str, str]]:
    try:
        return json.loads(JULIAPKG_JSON.read_text())["optional"]["gpu"]
    except (OSError, KeyError, ValueError):
        return {}


GPU_PACKAGES = _gpu_packages()


class JuliaImportOrderWarning(UserWarning):
    """juliacall and torch were imported in an order that can break Julia's start."""


@dataclass
class JuliaStatus:
    """What is known about the Julia backend (see :func:`status`)."""

    ready: bool = False
    started: bool = False
    reason: str = ""
    juliacall: str | None = None
    resolved: bool | None = None
    executable: str | None = None
    project: str | None = None
    install_enabled: bool = True
    install_disabled_by: str = ""
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_STATE: dict[str, Any] = {"module": None, "failure": None, "probe": None, "warned": False}


def reset() -> None:
    """Forget a cached failure and probe result (a started Julia cannot be stopped)."""
    _STATE.update(failure=None, probe=None)


def julia_source_path() -> Path:
    """``PyDiffBridge.jl``: inside the installed package (wheel) or ``julia/`` of a checkout."""
    env = os.environ.get(ENV_SOURCE)
    if env:
        return Path(env)
    for cand in (_PKG_DIR / "julia" / "PyDiffBridge.jl",
                 _PKG_DIR.parent / "julia" / "PyDiffBridge.jl"):
        if cand.is_file():
            return cand
    return _PKG_DIR / "julia" / "PyDiffBridge.jl"


def _juliacall_version() -> str | None:
    if importlib.util.find_spec("juliacall") is None:
        return None
    try:
        return importlib.metadata.version("juliacall")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _install_switch() -> tuple[bool, str]:
    v = os.environ.get(ENV_INSTALL)
    if v is not None and v.strip().lower() in _FALSE:
        return False, f"{ENV_INSTALL}={v}"
    off = os.environ.get("PYTHON_JULIAPKG_OFFLINE")
    if off is not None and off.strip().lower() in {"yes", "1", "true", "on"}:
        return False, f"PYTHON_JULIAPKG_OFFLINE={off}"
    return True, ""


def _download_hosts() -> list[str]:
    """Hosts an install would need: the package server, and Julia's own download server
    unless a Julia executable is configured or on PATH."""
    server = os.environ.get("JULIA_PKG_SERVER", "").strip()
    hosts = [urlparse(server if "//" in server else f"https://{server}").hostname
             if server else "pkg.julialang.org"]
    if not os.environ.get("PYTHON_JULIAPKG_EXE") and not shutil.which("julia"):
        hosts.append("julialang-s3.julialang.org")
    return [h for h in hosts if h]


_PROBE = r"""
import json, socket, sys
out = {"resolved": None, "unreachable": []}
try:
    import juliapkg
    out["resolved"] = bool(juliapkg.resolve(dry_run=True))
    from juliapkg.state import STATE
    out["project"] = STATE.get("project")
    if out["resolved"]:
        out["executable"] = juliapkg.executable()
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
if not out["resolved"]:
    for host in json.loads(sys.argv[1]):
        try:
            socket.getaddrinfo(host, 443)
        except OSError as exc:
            out["unreachable"].append(f"{host} ({exc})")
print("PDB-PROBE " + json.dumps(out))
"""


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _probe(check_network: bool = True) -> dict[str, Any]:
    """Ask juliapkg in a subprocess (bounded by a timeout) whether everything is installed."""
    if _STATE["probe"] is not None:
        return _STATE["probe"]
    timeout = float(os.environ.get(ENV_PROBE_TIMEOUT, "20"))
    hosts = _download_hosts() if check_network else []
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(hosts)],
                              capture_output=True, text=True, timeout=timeout,
                              env=_subprocess_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        res = {"resolved": None, "unreachable": [],
               "error": f"the juliapkg probe did not answer within {timeout:g} s "
                        f"(set {ENV_PROBE_TIMEOUT} to wait longer)"}
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PDB-PROBE ")]
        if lines:
            res = json.loads(lines[-1][len("PDB-PROBE "):])
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            res = {"resolved": None, "unreachable": [],
                   "error": f"the juliapkg probe failed: {tail[0]}"}
    if check_network:
        _STATE["probe"] = res
    return res


_FIXES = ("Fixes: (1) on a machine with network access run `python -m pydiffbridge julia "
          "install` once (it installs Julia and OrdinaryDiffEq through juliapkg); (2) or "
          "install Julia >= 1.10 yourself and set PYTHON_JULIAPKG_EXE=/path/to/julia; (3) see "
          "`python -m pydiffbridge julia status`; (4) meanwhile use backend='torch' or "
          "backend='scipy'.")


def _unavailable(cause: str) -> JuliaUnavailableError:
    return JuliaUnavailableError(f"the Julia backend is unavailable: {cause}. {_FIXES}")


def _check_installable() -> None:
    """Raise unless Julia is installed or can be installed now (fast: bounded probe)."""
    if _juliacall_version() is None:
        raise _unavailable("juliacall is not installed (pip install 'pydiffbridge[julia]')")
    probe = _probe()
    if probe.get("resolved"):
        return
    enabled, why = _install_switch()
    if probe.get("error") and probe.get("resolved") is None:
        raise _unavailable(probe["error"])
    if not enabled:
        raise _unavailable(f"Julia or its packages are not installed and automatic "
                           f"installation is disabled by {why}")
    if probe.get("unreachable"):
        raise _unavailable("Julia or its packages are not installed and the download servers "
                           f"cannot be reached: {'; '.join(probe['unreachable'])}")


def install(gpu: bool = False, timeout: float | None = None, quiet: bool = False
            ) -> JuliaStatus:
    """Install Julia and the packages of ``juliapkg.json`` (plus DiffEqGPU/CUDA with
    ``gpu=True``) through juliapkg, in a subprocess; returns :func:`status` afterwards.

    Raises:
        JuliaUnavailableError: juliacall is missing, the servers are unreachable, or the
            install failed or timed out.
    """
    if _juliacall_version() is None:
        raise _unavailable("juliacall is not installed (pip install 'pydiffbridge[julia]')")
    reset()
    probe = _probe()
    if probe.get("resolved") and not gpu:
        return status()
    if probe.get("unreachable"):
        raise _unavailable("the download servers cannot be reached: "
                           + "; ".join(probe["unreachable"]))
    lines = ["import juliapkg"]
    if gpu:
        for name, spec in GPU_PACKAGES.items():
            lines.append(f"juliapkg.add({name!r}, {spec['uuid']!r}, version={spec['version']!r})")
    lines.append("juliapkg.resolve()")
    timeout = timeout or float(os.environ.get(ENV_INSTALL_TIMEOUT, "3600"))
    if not quiet:
        print("pydiffbridge: installing Julia and its packages with juliapkg (first use only; "
              "this can take several minutes)...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([sys.executable, "-c", "\n".join(lines)], timeout=timeout,
                              env=_subprocess_env(), stdin=subprocess.DEVNULL,
                              capture_output=quiet, text=True)
    except subprocess.TimeoutExpired as exc:
        raise _unavailable(f"the install did not finish within {timeout:g} s "
                           f"(set {ENV_INSTALL_TIMEOUT})") from exc
    reset()
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise _unavailable("juliapkg failed to install Julia or its packages (exit code "
                           f"{proc.returncode}{': ' + tail[0] if tail else ''})")
    return status()


def _apply_env_defaults() -> None:
    if "juliacall" in sys.modules:
        if not all(k in os.environ for k in JULIACALL_DEFAULTS) and not _STATE["warned"]:
            _STATE["warned"] = True
            warnings.warn("juliacall was imported before pydiffbridge started Julia, so its "
                          f"defaults {JULIACALL_DEFAULTS} were not applied; set them in the "
                          "environment before importing juliacall", JuliaImportOrderWarning,
                          stacklevel=4)
        return
    for k, v in JULIACALL_DEFAULTS.items():
        os.environ.setdefault(k, v)
    quiet = os.environ.get(ENV_IMPORT_WARNING, "1").strip().lower() in _FALSE
    if "torch" in sys.modules and not quiet and not _STATE["warned"]:
        _STATE["warned"] = True
        warnings.warn("torch was imported before juliacall. On some Linux systems the two load "
                      "conflicting libstdc++/LLVM libraries and Julia crashes or fails to start; "
                      "if that happens, `import juliacall` before importing torch and "
                      f"pydiffbridge. Silence this with {ENV_IMPORT_WARNING}=0.",
                      JuliaImportOrderWarning, stacklevel=4)


def _load() -> Any:
    source = julia_source_path()
    if not source.is_file():
        raise _unavailable(f"the Julia source {source} is missing (a broken install? set "
                           f"{ENV_SOURCE})")
    _apply_env_defaults()
    try:
        import juliacall  # the one import of juliacall in pydiffbridge
    except Exception as exc:  # noqa: BLE001 - juliacall raises many kinds on a failed start
        raise _unavailable(f"juliacall could not start Julia ({type(exc).__name__}: {exc})") \
            from None
    try:
        host = juliacall.newmodule("PyDiffBridgeHost")
        host.seval("Base.include")(host, str(source))
        return host.PyDiffBridge
    except Exception as exc:  # noqa: BLE001
        raise _unavailable(f"loading {source.name} failed ({type(exc).__name__}: {exc})") \
            from None


def get_module() -> Any:
    """The Julia module ``PyDiffBridge``, starting (and if needed installing) Julia on first
    call.  Raises :class:`JuliaUnavailableError` fast, and again at once on later calls."""
    if _STATE["module"] is not None:
        return _STATE["module"]
    if _STATE["failure"] is not None:
        raise JuliaUnavailableError(_STATE["failure"])
    try:
        if "juliacall" not in sys.modules:
            _check_installable()
            if not _probe().get("resolved"):
                install()
        _STATE["module"] = _load()
    except JuliaUnavailableError as exc:
        _STATE["failure"] = str(exc)
        raise
    return _STATE["module"]


def availability() -> str:
    """``""`` when the Julia backend is started or can start; otherwise why not.  Runs the
    bounded probe (a subprocess, no Julia start), once per process."""
    if _STATE["module"] is not None:
        return ""
    if _STATE["failure"] is not None:
        return _STATE["failure"]
    try:
        _check_installable()
    except JuliaUnavailableError as exc:
        return str(exc)
    return ""


def status() -> JuliaStatus:
    """A report for ``python -m pydiffbridge julia status`` (never starts Julia)."""
    enabled, why = _install_switch()
    st = JuliaStatus(juliacall=_juliacall_version(), install_enabled=enabled,
                     install_disabled_by=why, source=str(julia_source_path()),
                     started=_STATE["module"] is not None)
    if st.juliacall is not None:
        probe = _probe()
        st.resolved = probe.get("resolved")
        st.executable = probe.get("executable")
        st.project = probe.get("project")
        if probe.get("error"):
            st.extra["probe_error"] = probe["error"]
    st.reason = availability()
    st.ready = st.started or (st.reason == "" and bool(st.resolved))
    return st
