"""Where glr's caches live, and the row store behind two of them.

One folder per competition, shared by every model, stage and run:

    <cache_root>/images/<size>px/             decoded training images, uint8 S×S×3 rows (pipeline.model.data)
    <cache_root>/bottleneck/<base key>/       frozen-base features, float16 rows (pipeline.model.data)
    <cache_root>/features/<extractor key>/    local features for verification (pipeline.verify.cache)

The root is `--cache-dir` / `[run] cache_dir`, else DATA_DIR/.glr-cache. Everything under it
is content-keyed, so sharing it between runs never returns another input's result.

A `RowStore` (images, bottleneck) is an append-only file of fixed-size rows (`rows.bin`,
memory-mapped for tf.data) plus `index.npz`: the sorted 16-byte keys of its entries and each
one's row (images that could not be decoded are kept as failed, with their reason). An entry's
key is the identity of the image *file* (`file_keys`: name, inode, size, mtime), so a hard link
or symlink to the same file (the local-validation folder's images) finds the same row, and a
changed file is a new entry, never a stale row. Appends write rows past the committed end, then
replace the index atomically: a process killed mid-append leaves a valid store (the rows past
the index are ignored and overwritten next time), and an `fcntl` lock serialises two appenders.
The index costs ~24 bytes per image in memory (38 MB at GLDv2's 1.58M images).

Each folder glr writes holds a metadata file (`glr-cache.json`; `config.json` for the local
features), and `glr cache prune` deletes only such folders (`list_caches`, `prune_caches`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from submissions.errors import UserError
from submissions.files import atomic_path, atomic_write_json

KINDS = ("images", "bottleneck", "features")
DEFAULT_NAME = ".glr-cache"
META = "glr-cache.json"           # written in every RowStore folder: what `glr cache` recognises
FEATURES_META = "config.json"     # written by pipeline.verify.cache in each extractor folder
FORMAT = 1
KEY_DTYPE = "S16"
COMMIT_EVERY_S = 60.0             # an interrupted append keeps what was committed up to a minute before
_STORE_FILES = (META, "rows.bin", "index.npz", "lock")


def cache_root(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache_dir` when given, else DATA_DIR/.glr-cache."""
    return Path(cache_dir) if cache_dir else Path(data_dir) / DEFAULT_NAME


def kind_dir(root: str | os.PathLike, kind: str) -> Path:
    """The folder of one kind of cache under `root`."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; one of {', '.join(KINDS)}")
    return Path(root) / kind


# -- sizes ----------------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    """1536 → '1.5 KB' (powers of 1000, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def existing_parent(path: str | os.PathLike) -> Path:
    """`path`, or its nearest parent that exists: where a folder to be made will live."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int:
    """Free space on the disk that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(existing_parent(path)).free


def announce(folder: Path, what: str, n_new: int, n_have: int, row_bytes: int) -> int:
    """Before a store grows: print one line (entries to add, bytes, free space) and refuse with a
    UserError naming --cache-dir when the disk cannot hold them. Returns the bytes to add."""
    need = int(n_new) * int(row_bytes)
    free = free_bytes(folder)
    print(f"{what} cache {folder}: adding {n_new:,} ({n_have:,} cached), {human_bytes(need)} "
          f"({human_bytes(row_bytes)} each; {human_bytes(free)} free)", file=sys.stderr, flush=True)
    if need > free:
        raise UserError(f"{folder}: adding {n_new:,} {what} entries needs {human_bytes(need)} but the disk has "
                        f"{human_bytes(free)} free; point --cache-dir ([run] cache_dir) at a larger disk, or free "
                        "space (`glr cache prune`)")
    return need


# -- image identity -------------------------------------------------------------------------------

def file_keys(paths: list[Path] | list[str]) -> np.ndarray:
    """The 16-byte identity of each image file (name, inode, size, mtime_ns; links followed), as an
    S16 array; b"" for a file that does not exist. Hard links and symlinks to one file share it;
    a copy, an edited file or one replaced in place gets a new one."""
    keys = np.zeros(len(paths), dtype=KEY_DTYPE)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        h = hashlib.blake2b(digest_size=16, person=b"glr-image-v1")
        h.update(os.path.basename(os.fspath(p)).encode("utf-8", "surrogateescape"))
        h.update(struct.pack("<QQq", st.st_ino, st.st_size, st.st_mtime_ns))
        keys[i] = h.digest().rstrip(b"\0") or b"\1"  # S16 drops trailing NULs: keep it non-empty
    return keys


# -- the row store --------------------------------------------------------------------------------

class _Index:
    """The committed state: sorted keys → rows; failed keys → reasons."""

    def __init__(self, keys=None, rows=None, fkeys=None, freasons=None):
        self.keys = np.zeros(0, KEY_DTYPE) if keys is None else keys
        self.rows = np.zeros(0, np.int64) if rows is None else rows
        self.fkeys = np.zeros(0, KEY_DTYPE) if fkeys is None else fkeys
        self.freasons = np.zeros(0, "U1") if freasons is None else freasons

    @property
    def n_rows(self) -> int:
        return len(self.keys)

    @staticmethod
    def _find(sorted_keys: np.ndarray, q: np.ndarray) -> np.ndarray:
        if len(sorted_keys) == 0:
            return np.full(len(q), -1, np.int64)
        pos = np.minimum(np.searchsorted(sorted_keys, q), len(sorted_keys) - 1)
        return np.where(sorted_keys[pos] == q, pos, -1)

    def lookup(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row or -1, position in the failed list or -1) of each key."""
        pos = self._find(self.keys, q)
        rows = np.where(pos >= 0, self.rows[np.maximum(pos, 0)] if len(self.rows) else -1, -1)
        return rows.astype(np.int64), self._find(self.fkeys, q)

    def merged(self, keys: list[bytes], rows: list[int], fkeys: list[bytes], freasons: list[str]) -> "_Index":
        k = np.concatenate([self.keys, np.array(keys, KEY_DTYPE)])
        r = np.concatenate([self.rows, np.array(rows, np.int64)])
        order = np.argsort(k, kind="stable")
        fk = np.concatenate([self.fkeys, np.array(fkeys, KEY_DTYPE)])
        fr = np.concatenate([self.freasons.astype(str), np.array(freasons, dtype=str)])
        forder = np.argsort(fk, kind="stable")
        return _Index(k[order], r[order], fk[forder], fr[forder])


class RowStore:
    """An append-only store of fixed-shape rows keyed by 16-byte keys (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, *, kind: str, key: dict, dtype: str, row_shape: tuple[int, ...]):
        self.folder = Path(folder)
        self.kind, self.key = kind, dict(key)
        self.dtype, self.row_shape = np.dtype(dtype), tuple(int(d) for d in row_shape)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.meta_path = self.folder / META
        self.data_path, self.index_path = self.folder / "rows.bin", self.folder / "index.npz"
        self._check_or_write_meta()

    def _meta(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "key": self.key, "dtype": self.dtype.str,
                "row_shape": list(self.row_shape)}

    def _check_or_write_meta(self) -> None:
        want = self._meta()
        if self.meta_path.exists():
            have = json.loads(self.meta_path.read_text())
            if {k: have.get(k) for k in want} != json.loads(json.dumps(want)):
                raise UserError(f"{self.folder}: holds another cache ({have.get('kind')} {have.get('key')}); "
                                "remove it with `glr cache prune` or use another --cache-dir")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.meta_path, {**want, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def touch(self) -> None:
        """Mark the store as used now (`glr cache` shows it; `prune --older-than` reads it)."""
        with contextlib.suppress(OSError):
            os.utime(self.meta_path)

    def index(self) -> _Index:
        if not self.index_path.exists():
            return _Index()
        with np.load(self.index_path) as z:
            idx = _Index(z["keys"], z["rows"], z["fkeys"], z["freasons"])
        if self.data_path.exists() and self.data_path.stat().st_size >= idx.n_rows * self.row_bytes:
            return idx
        return _Index()  # rows.bin lost or cut short under us: start the store afresh

    def array(self, n_rows: int | None = None) -> np.ndarray:
        """The committed rows, memory-mapped read-only (rows appended later are not in it)."""
        n = self.index().n_rows if n_rows is None else n_rows
        if n == 0:
            return np.zeros((0, *self.row_shape), self.dtype)
        return np.memmap(self.data_path, dtype=self.dtype, mode="r", shape=(n, *self.row_shape))

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """(row or -1, failure reason or None) of each key; -1 with no reason = not in the store."""
        idx = self.index()
        rows, fpos = idx.lookup(np.asarray(keys, KEY_DTYPE))
        reasons = [str(idx.freasons[p]) if p >= 0 else None for p in fpos]
        return rows, reasons

    @contextlib.contextmanager
    def appending(self) -> Iterator["_Appender"]:
        """Hold the store's lock and append; committed on exit (and every minute)."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{self.folder}: waiting for another glr adding to this cache", file=sys.stderr, flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
            app = _Appender(self)
            try:
                yield app
            finally:
                app.close()


class _Appender:
    """Rows written past the committed end of rows.bin; the index replaced atomically on commit."""

    def __init__(self, store: RowStore):
        self.store = store
        self.idx = store.index()  # read under the lock: what other appenders committed is in it
        if self.idx.n_rows == 0 and store.index_path.exists():
            store.index_path.unlink()  # a store whose rows went missing starts again
        self.f = open(store.data_path, "a+b")
        self.f.truncate(self.idx.n_rows * store.row_bytes)  # drop a killed append's uncommitted tail
        self.f.seek(0, os.SEEK_END)
        self.keys: list[bytes] = []
        self.rows: list[int] = []
        self.fkeys: list[bytes] = []
        self.freasons: list[str] = []
        self.added = 0
        self.last_commit = time.monotonic()

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.idx.lookup(np.asarray(keys, KEY_DTYPE))

    def add(self, key: bytes, row: np.ndarray) -> None:
        row = np.ascontiguousarray(row, dtype=self.store.dtype)
        if row.shape != self.store.row_shape:
            raise ValueError(f"row of shape {row.shape}, the store holds {self.store.row_shape}")
        self.f.write(row.tobytes())
        self.keys.append(key)
        self.rows.append(self.idx.n_rows + len(self.keys) - 1)
        self.added += 1
        self._maybe_commit()

    def add_failed(self, key: bytes, reason: str) -> None:
        self.fkeys.append(key)
        self.freasons.append(reason)
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        if time.monotonic() - self.last_commit >= COMMIT_EVERY_S:
            self.commit()

    def commit(self) -> None:
        """Make the rows durable, then point the index at them (the index never runs ahead)."""
        if not (self.keys or self.fkeys):
            return
        self.f.flush()
        os.fsync(self.f.fileno())
        idx = self.idx.merged(self.keys, self.rows, self.fkeys, self.freasons)
        with atomic_path(self.store.index_path, suffix=".npz") as tmp:
            np.savez(tmp, keys=idx.keys, rows=idx.rows, fkeys=idx.fkeys, freasons=idx.freasons)
        self.idx = idx
        self.keys, self.rows, self.fkeys, self.freasons = [], [], [], []
        self.last_commit = time.monotonic()

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.f.close()


# -- glr cache: list and prune --------------------------------------------------------------------

def _du(folder: Path) -> tuple[int, int, float]:
    """(bytes, files, newest mtime) under `folder`."""
    total, files, newest = 0, 0, 0.0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size
            files += 1
            newest = max(newest, st.st_mtime)
    return total, files, newest


def _store_entry(kind: str, folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("kind") != kind:
        return None
    entries = failed = 0
    with contextlib.suppress(OSError, ValueError, KeyError):
        with np.load(folder / "index.npz") as z:
            entries, failed = len(z["keys"]), len(z["fkeys"])
    size, _, _ = _du(folder)
    return {"kind": kind, "key": folder.name, "describe": meta.get("key"), "entries": entries, "failed": failed,
            "bytes": size, "last_used": (folder / META).stat().st_mtime, "path": str(folder)}


def _features_entry(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / FEATURES_META).read_text())
    except (OSError, ValueError):
        return None
    size, files, newest = _du(folder)
    return {"kind": "features", "key": folder.name, "describe": meta, "entries": max(0, files - 1), "failed": 0,
            "bytes": size, "last_used": newest, "path": str(folder)}


def list_caches(root: str | os.PathLike) -> list[dict]:
    """Every cache folder glr wrote under `root` (kind, key, entries, bytes, last used as a Unix time)."""
    out = []
    for kind in KINDS:
        kdir = kind_dir(root, kind)
        if not kdir.is_dir():
            continue
        for folder in sorted(p for p in kdir.iterdir() if p.is_dir() and not p.is_symlink()):
            entry = _features_entry(folder) if kind == "features" else _store_entry(kind, folder)
            if entry is not None:
                out.append(entry)
    return out


def _remove(entry: dict) -> None:
    """Delete one cache folder: a RowStore's own files (the folder only once empty); a features
    folder (recognised by its config.json) as a whole."""
    folder = Path(entry["path"])
    if entry["kind"] == "features":
        shutil.rmtree(folder)
        return
    for name in os.listdir(folder):
        if name in _STORE_FILES or any(name.startswith(f".{f}.") for f in _STORE_FILES):
            (folder / name).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def prune_caches(root: str | os.PathLike, *, kind: str | None = None, older_than_days: float | None = None,
                 everything: bool = False, dry_run: bool = False) -> list[dict]:
    """Delete the caches under `root` that match (kind; last used more than `older_than_days` ago, or
    `everything`); return them. Only folders glr wrote are candidates; nothing else is touched."""
    if older_than_days is None and not everything:
        raise UserError("glr cache prune: say what to delete: --older-than DAYS or --all (see --dry-run)")
    if kind is not None and kind not in KINDS:
        raise UserError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    cutoff = time.time() - (older_than_days or 0) * 86400
    chosen = [e for e in list_caches(root) if (kind is None or e["kind"] == kind)
              and (everything or e["last_used"] < cutoff)]
    if not dry_run:
        for e in chosen:
            _remove(e)
        for k in KINDS:  # a kind folder glr made and emptied goes too
            with contextlib.suppress(OSError):
                kind_dir(root, k).rmdir()
    return chosen
