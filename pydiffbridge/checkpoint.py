"""Crash-safe checkpoints and result files.

A file written in place (``torch.save(obj, path)``, ``path.write_text(...)``) is unloadable
while the write is in progress: a kill, a power cut or a full disk at that moment leaves a
truncated file, and the previous good version is already gone.  Here every write goes to a
temporary file in the same directory (``<name>.tmp``), is flushed and ``os.fsync``-ed, and
only then ``os.replace``-d onto the real name (an atomic rename on POSIX and Windows), after
which the directory is fsync-ed so the rename itself survives a power cut.

Checkpoints keep one generation more: :func:`save_checkpoint` first makes the current
checkpoint the previous one, ``<name>.prev`` (a hard link, so no data is copied; a copy where
the file system has no hard links), then replaces ``<name>`` by the new one.  At every
instant ``<name>`` is a complete checkpoint (the old or the new one), and ``<name>.prev``
holds the one before it.  :func:`load_checkpoint` loads ``<name>`` and, if that file is
truncated or corrupt (written by something else, or damaged later), warns and falls back to
``<name>.prev``; if neither loads it raises :class:`CheckpointError`.

One path has one writer at a time: the temporary names are fixed, so a write killed half way
leaves at most one stale ``<name>.tmp``, which the next write replaces.

:func:`write_json_atomic` writes *strict* JSON (what ``json.loads`` of any language accepts):
NaN and infinities, which Python's ``json`` would write as the invalid tokens ``NaN`` /
``Infinity``, become ``null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import PyDiffBridgeError

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "save_checkpoint",
    "load_checkpoint",
    "prev_path",
    "write_json_atomic",
    "write_text_atomic",
    "atomic_open",
    "to_strict_json",
]

PathLike = str | os.PathLike


class CheckpointError(PyDiffBridgeError, OSError):
    """A checkpoint or result file could not be written, or no loadable checkpoint exists."""


class CheckpointWarning(UserWarning):
    """A checkpoint could not be loaded and an older one is used instead (or none)."""


def prev_path(path: PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the previous checkpoint: ``<path>.prev``."""
    p = Path(path)
    return p.with_name(p.name + ".prev")


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories can't be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path: Path, write: Callable[[IO], None], mode: str,
                encoding: str | None = None) -> Path:
    """Write ``path``'s temporary file completely (flushed and fsync-ed); return its path.
    On any failure (also KeyboardInterrupt) the temporary file is removed."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _write_error(path: Path, exc: OSError, what: str) -> CheckpointError:
    return CheckpointError(
        f"could not write {what} {path}: {type(exc).__name__}: {exc}. The file at that path "
        "(if any) is unchanged. Check free disk space and write permission of "
        f"{path.parent}, or choose another output folder."
    )


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str | None = "utf-8"
                ) -> Iterator[IO]:
    """``with atomic_open(path, "w") as fh: ...``: ``path`` gets the written content only if
    the block completes; otherwise it keeps its old content (the temporary file is removed).

    ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"`` (binary).  Raises
    :class:`CheckpointError` on an OS error (full disk, no permission).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        fh = open(tmp, mode, encoding=None if "b" in mode else encoding)
    except OSError as exc:
        raise _write_error(path, exc, "file") from exc
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _commit(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _write_error(path, exc, "file") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_text_atomic(text: str, path: PathLike, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring); returns the path."""
    path = Path(path)
    try:
        tmp = _write_temp(path, lambda fh: fh.write(text), "w", encoding)
        _commit(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc, "file") from exc
    return path


# ----------------------------------------------------------------------------- strict JSON
def _non_finite_key(key: Any) -> Any:
    if isinstance(key, float) and not math.isfinite(key):
        return str(key)  # json would refuse a NaN key with allow_nan=False
    return key


def to_strict_json(obj: Any, default: Callable[[Any], Any] | None = None) -> tuple[Any, int]:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts, and the number of
    non-finite floats (NaN, +-Inf, also NumPy floats) that were replaced by ``None``.

    Tuples become lists; objects with ``tolist()`` (NumPy arrays, tensors) become lists;
    path-like objects become strings; anything else is passed to ``default`` (if given, and
    its result is converted the same way) or left for ``json`` to reject.
    """
    count = 0

    def conv(o: Any) -> Any:
        nonlocal count
        if o is None or isinstance(o, (str, bool, int)):
            return o
        if isinstance(o, numbers.Real) and not isinstance(o, numbers.Integral):
            f = float(o)
            if math.isfinite(f):
                return f
            count += 1
            return None
        if isinstance(o, numbers.Integral):
            return int(o)
        if isinstance(o, dict):
            return {_non_finite_key(k): conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if hasattr(o, "tolist") and callable(o.tolist):
            return conv(o.tolist())
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if default is not None:
            return conv(default(o))
        return o

    return conv(obj), count


def write_json_atomic(obj: Any, path: PathLike, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None,
                      sort_keys: bool = False) -> int:
    """Write ``obj`` as strict JSON to ``path`` atomically.

    Non-finite floats (NaN, Inf, -Inf) are written as ``null`` (standard JSON has no token for
    them; Python's ``NaN``/``Infinity`` make the file unreadable to other parsers), so a
    missing or failed measurement reads as ``null``.  Returns how many values were replaced
    this way.  ``default`` converts objects JSON cannot represent (see
    :func:`to_strict_json`).  Raises :class:`CheckpointError` if the file cannot be written
    (the old file, if any, is then unchanged) and ``TypeError`` for an unserialisable object.
    """
    clean, count = to_strict_json(obj, default)
    text = json.dumps(clean, indent=indent, allow_nan=False, sort_keys=sort_keys) + "\n"
    write_text_atomic(text, path)
    return count


# ----------------------------------------------------------------------------- checkpoints
def _is_complete_archive(path: Path) -> bool:
    """Cheap completeness test of a ``torch.save`` file (a zip archive): its central
    directory, written last, is present.  Reads only the file's tail."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _keep_previous(path: Path, prev: Path) -> None:
    """Make the current checkpoint ``path`` the previous one, ``prev``, leaving ``path`` in
    place (a hard link, or a copy where hard links are not supported)."""
    if not path.exists():
        return
    if not _is_complete_archive(path):
        warnings.warn(
            f"checkpoint {path} is incomplete or not a torch.save archive; it is replaced by "
            f"the new checkpoint and the previous one, {prev}, is kept as it is.",
            CheckpointWarning, stacklevel=3)
        return
    tmp = _tmp_path(prev)
    _unlink_quietly(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this file system (FAT, some network shares): copy
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except BaseException:
            _unlink_quietly(tmp)
            raise
    _commit(tmp, prev)


def save_checkpoint(obj: Any, path: PathLike, keep_previous: bool = True) -> Path:
    """``torch.save(obj, path)``, crash-safe.

    The checkpoint is written to ``<path>.tmp``, fsync-ed, and renamed onto ``path``; with
    ``keep_previous`` the checkpoint it replaces is kept as ``<path>.prev`` first (a hard
    link: no copy).  ``path`` is complete at every instant: a kill at any moment leaves the
    old or the new checkpoint there.  Raises :class:`CheckpointError` if the file cannot be
    written (full disk, no permission); ``path`` and ``<path>.prev`` are then unchanged.
    Returns ``path``.
    """
    import torch

    path = Path(path)
    try:
        tmp = _write_temp(path, lambda fh: torch.save(obj, fh), "wb")
        try:
            if keep_previous:
                _keep_previous(path, prev_path(path))
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _commit(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc, "checkpoint") from exc
    return path


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint(path: PathLike, *, map_location: Any = None, weights_only: bool = True,
                    missing_ok: bool = False, return_path: bool = False) -> Any:
    """Load the checkpoint ``path`` written by :func:`save_checkpoint`.

    If ``path`` is missing, truncated or corrupt, a :class:`CheckpointWarning` names the file
    and the error, and the previous checkpoint ``<path>.prev`` is loaded instead (with a
    second warning saying so).  If neither loads, :class:`CheckpointError` lists both files
    and their errors; if neither exists and ``missing_ok``, returns ``None`` (no warning).

    ``map_location`` and ``weights_only`` are passed to ``torch.load`` (``weights_only=True``
    refuses arbitrary pickled objects; checkpoints of tensors, numbers, strings, lists and
    dicts load either way).  With ``return_path`` returns ``(obj, path it came from)``.
    """
    import torch

    path = Path(path)
    prev = prev_path(path)
    problems: list[str] = []
    for cand in (path, prev):
        if not cand.exists():
            problems.append(f"{cand}: missing")
            continue
        try:
            obj = torch.load(cand, map_location=map_location, weights_only=weights_only)
        except Exception as exc:  # noqa: BLE001 - any failure means "not loadable"
            problems.append(f"{cand}: {_short(exc)}")
            nxt = f"; trying the previous checkpoint {prev}" if cand == path else ""
            warnings.warn(f"checkpoint {cand} could not be loaded (truncated or corrupt?): "
                          f"{_short(exc)}{nxt}", CheckpointWarning, stacklevel=2)
            continue
        if cand == prev:
            warnings.warn(f"using the previous checkpoint {prev} because {problems[0]}; "
                          "training resumes from that older state.", CheckpointWarning,
                          stacklevel=2)
        return (obj, cand) if return_path else obj
    if missing_ok and all(p.endswith(": missing") for p in problems):
        return (None, None) if return_path else None
    hint = ""
    if any("weights_only" in p or "Weights only" in p for p in problems):
        hint = " If the file is trusted and holds other objects, pass weights_only=False."
    raise CheckpointError(
        f"no loadable checkpoint at {path}: " + "; ".join(problems) + ". Start afresh "
        "(without --resume, or with another --out), or restore a good copy of the file." + hint
    )
