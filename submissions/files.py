"""Atomic file writes: a reader never sees a half-written artefact, and no temp file outlives its writer.

Every temp file or folder glr makes is named `.<output>.glr-<pid>-<random>.<suffix>` beside its
output (`temp_prefix`). A writer that dies without its `finally` (SIGKILL, a crash, a pool child
terminated) leaves one behind; the next glr process that writes in that folder removes it
(`remove_stale_temps`): only names of that pattern, only when the process named in it is gone and
the file has been untouched for `STALE_AFTER_S`. SIGTERM is turned into an exception by the CLI, so
the writer's own `finally` cleans up.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from submissions.errors import UserError


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once, at import (single-threaded): setting and restoring the umask around every write would
# let a file created meanwhile by another thread (download and decode pools) get mode 0o666.
_UMASK = _read_umask()


def _default_mode(folder: bool = False) -> int:
    """What `open()` / `mkdir()` would give: 0o666 / 0o777 less the umask (mkstemp and mkdtemp use
    0o600 / 0o700, which would survive the rename)."""
    return (0o777 if folder else 0o666) & ~_UMASK


STALE_AFTER_S = 10 * 60  # a live writer touches its temp file far more often (and its pid still runs)
_TEMP_NAME = re.compile(r"^\..+\.glr-(?P<pid>\d+)-[a-z0-9_]{8}\.[\w.]+$")  # mkstemp's 8 random characters
_swept: set[str] = set()


def temp_prefix(name: str) -> str:
    """The start of every glr temp name for output `name`: recognisable as glr's, with the writer's pid."""
    return f".{name}.glr-{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove glr temp files and folders in `folder` whose writer is gone; return what was removed.

    Only names of glr's pattern (`temp_prefix`), whose pid no longer runs here, untouched for
    `STALE_AFTER_S`; anything else in the folder is never looked at twice.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or _running(int(m["pid"])):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


def _sweep_once(folder: Path) -> None:
    """`remove_stale_temps` the first time this process writes in `folder` (a scan per folder, not per file)."""
    key = os.path.abspath(folder)
    if key not in _swept:
        _swept.add(key)
        remove_stale_temps(folder)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`.

    The temp file lives in the same directory so the final `os.replace` is atomic on
    POSIX; on any exception the temp file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _default_mode())
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_writable(path: str | os.PathLike, *, folder: bool = False, what: str | None = None) -> None:
    """Refuse, before any work, an output glr could not write: one line naming the folder and why.

    The folder probed is where the output will land: `path` itself for an existing output folder,
    else its nearest existing ancestor (folders on the way are created). A real file is created and
    removed there (permission bits say nothing on a read-only mount or for root).
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{label}: exists and is {'not ' if folder else ''}a folder; choose another path")
    probe = path if folder and path.is_dir() else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{label}: {probe} is not a folder; choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix("probe"), suffix=".tmp", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{label}: cannot write in {probe} ({e.strerror}); choose a writable place") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_default(o):
    """`json.dumps` default for what our tables and metrics hold: numpy scalars as numbers, the
    rest (paths, …) as text."""
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as indented JSON (numpy scalars allowed) to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def hash_file_into(h, path: str | os.PathLike) -> None:
    """Feed a file's bytes to the hash object `h`, in 1 MiB blocks (train.csv of the real competitions
    is 100+ MB; run digests chain many files into one hash)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success swap it into place.

    An existing `path` is replaced only once the new folder is complete, and removed after the
    swap; on any exception the temporary folder is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _default_mode(folder=True))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
