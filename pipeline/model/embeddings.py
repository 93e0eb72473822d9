"""Global descriptors saved by `glr predict --embeddings X.npy`, read by `glr verify --refs nearest`.

`X.npy` holds float32 (or, with `glr embed --float16`, float16) N×D rows (L2-normalised);
`X.ids.txt` beside it holds the N image ids, one a line, in the same order. Rows are written batch
by batch into a memory-mapped file and read back memory-mapped, so neither side holds all N×D in
RAM (1.58M training images at the real size). `resumable_writer` (glr embed) keeps its rows, ids
and a progress record in a folder `X.npy.partial/` between runs, so an interrupted run continues.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from submissions.errors import UserError
from submissions.files import atomic_path, atomic_write_json, atomic_write_text

_COPY_ROWS = 65536  # rows per block when a file with skipped rows is compacted
DTYPES = ("float32", "float16")  # storage types of the rows (computed in float32 either way)


def ids_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".ids.txt")


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class EmbeddingWriter:
    """Appends normalised rows to a memory-mapped .npy of at most `capacity` rows (`append`), then
    `finish` keeps the rows written (fewer when images were skipped) and returns (file, ids)."""

    def __init__(self, tmp: Path, capacity: int, dim: int, dtype: str = "float32"):
        self._tmp, self._dim, self._dtype = tmp, dim, np.dtype(dtype)
        self._mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=self._dtype, shape=(capacity, dim))
        self.ids: list[str] = []
        self.rows = 0

    def append(self, ids: list[str], vectors: np.ndarray, images: int | None = None) -> None:
        """Write the rows of `ids` (`images`: how many images this batch consumed, skipped ones
        included; only a resumable writer records it)."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1)
        if vectors.shape[1] != self._dim:
            raise ValueError(f"expected {self._dim}-D vectors, got shape {vectors.shape}")
        start = self.rows
        if start + len(ids) > len(self._mm):
            raise ValueError(f"more than the {len(self._mm)} rows announced")
        self._mm[start:start + len(ids)] = normalise(vectors)
        self.ids.extend(ids)
        self.rows += len(ids)

    def finish(self) -> None:
        """Flush; when fewer rows than announced were written, copy them block by block into a
        file of the right shape (skipped images are rare; a block of rows is all that is in RAM)."""
        n, full = self.rows, self._mm
        full.flush()
        if n == len(full):
            del self._mm
            return
        part = self._tmp.with_name(self._tmp.name + ".part")
        out = np.lib.format.open_memmap(part, mode="w+", dtype=self._dtype, shape=(n, self._dim))
        for s in range(0, n, _COPY_ROWS):
            e = min(s + _COPY_ROWS, n)
            out[s:e] = full[s:e]
        out.flush()
        del out, full, self._mm
        os.replace(part, self._tmp)


@contextlib.contextmanager
def embedding_writer(path: str | os.PathLike, capacity: int, dim: int,
                     dtype: str = "float32") -> Iterator[EmbeddingWriter]:
    """Write embeddings at `path` (and their ids beside it) batch by batch, atomically: on success
    the .npy is renamed into place, then the ids file written; on an error neither is touched."""
    with atomic_path(path, suffix=".npy") as tmp:
        writer = EmbeddingWriter(tmp, capacity, dim, dtype)
        try:
            yield writer
            writer.finish()
        finally:
            tmp.with_name(tmp.name + ".part").unlink(missing_ok=True)
    atomic_write_text(ids_path(path), "".join(f"{i}\n" for i in writer.ids))


_STATE_FILES = ("vectors.npy", "vectors.npy.part", "ids.txt", "progress.json")


def partial_dir(path: str | os.PathLike) -> Path:
    """The folder where `glr embed` keeps an unfinished `path` between runs."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _remove_state(state: Path) -> None:
    """Remove a partial folder, only the files glr writes there (anything else stays, and so does the folder)."""
    for name in _STATE_FILES:
        (state / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state.rmdir()


class ResumableEmbeddingWriter(EmbeddingWriter):
    """An EmbeddingWriter whose rows live in `X.npy.partial/vectors.npy`, with the ids written so far
    in `ids.txt` and `progress.json` = {fingerprint, images, rows}: a commit (every `commit_s`
    seconds, and at the end) flushes the rows, appends the ids, then replaces the progress record,
    so after a crash the record never counts rows that are not on disk. `images` is where a
    resumed run starts; ids beyond the record's rows are dropped on resume."""

    def __init__(self, state: Path, capacity: int, dim: int, dtype: str, fingerprint: dict, commit_s: float):
        self._state, self._fingerprint, self._commit_s = state, fingerprint, commit_s
        record = self._read_progress(state, fingerprint)
        self.images = record["images"] if record else 0
        if record is None:
            _remove_state(state)
        state.mkdir(parents=True, exist_ok=True)
        vec = state / "vectors.npy"
        if record is None:
            super().__init__(vec, capacity, dim, dtype)
            (state / "ids.txt").write_text("")
            self._commit()
        else:
            self._tmp, self._dim, self._dtype = vec, dim, np.dtype(dtype)
            self._mm = np.lib.format.open_memmap(vec, mode="r+")
            self.ids, self.rows = [], record["rows"]
            kept = (state / "ids.txt").read_text().splitlines()[:self.rows]
            atomic_write_text(state / "ids.txt", "".join(f"{i}\n" for i in kept))
        self.resumed_images = self.images
        self._last = time.monotonic()

    @staticmethod
    def _read_progress(state: Path, fingerprint: dict) -> dict | None:
        try:
            record = json.loads((state / "progress.json").read_text())
            mm = np.load(state / "vectors.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        ok = (record.get("fingerprint") == fingerprint and mm.shape == (fingerprint["capacity"], fingerprint["dim"])
              and mm.dtype == np.dtype(fingerprint["dtype"]))
        return record if ok else None

    def append(self, ids: list[str], vectors: np.ndarray, images: int | None = None) -> None:
        super().append(ids, vectors)
        self.images += len(ids) if images is None else images
        if time.monotonic() - self._last >= self._commit_s:
            self._commit()

    def _commit(self) -> None:
        self._mm.flush()
        if self.ids:
            with open(self._state / "ids.txt", "a") as f:
                f.write("".join(f"{i}\n" for i in self.ids))
                f.flush()
                os.fsync(f.fileno())
            self.ids = []
        atomic_write_json(self._state / "progress.json",
                          {"fingerprint": self._fingerprint, "images": self.images, "rows": self.rows})
        self._last = time.monotonic()

    def finish_into(self, path: Path) -> None:
        """Commit, compact, move the rows to `path` and the ids beside it, remove the partial folder."""
        self._commit()
        self.finish()
        os.replace(self._state / "vectors.npy", path)
        os.replace(self._state / "ids.txt", ids_path(path))
        _remove_state(self._state)


def resumable_writer(path: str | os.PathLike, capacity: int, dim: int, dtype: str, fingerprint: dict,
                     commit_s: float = 10.0) -> ResumableEmbeddingWriter:
    """A writer that continues `path.partial/` when its fingerprint (plus capacity, dim and dtype)
    matches, else starts it afresh; call `finish_into(path)` once every image is written."""
    if dtype not in DTYPES:
        raise UserError(f"embedding storage {dtype!r}: choose one of {', '.join(DTYPES)}")
    fingerprint = {**fingerprint, "capacity": int(capacity), "dim": int(dim), "dtype": dtype}
    return ResumableEmbeddingWriter(partial_dir(path), capacity, dim, dtype, fingerprint, commit_s)


def write_embeddings(path: str | os.PathLike, ids: list[str], vectors: np.ndarray) -> Path:
    """L2-normalise and write `vectors` with their ids, atomically (all rows at once)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"expected {len(ids)} rows of vectors, got shape {vectors.shape}")
    with embedding_writer(path, len(ids), vectors.shape[1]) as w:
        w.append(list(ids), vectors)
    return Path(path)


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Return (ids, vectors) saved by `write_embeddings`; the vectors memory-mapped read-only, so a
    reader pages in only the rows it uses."""
    path = Path(path)
    if not path.exists() or not ids_path(path).exists():
        raise UserError(f"{path}: embeddings or their ids file {ids_path(path).name} not found "
                        "(write them with `glr embed` or `glr predict --embeddings`)")
    try:
        vectors = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise UserError(f"{path}: not a .npy array of embeddings ({e}); write it with `glr predict --embeddings`") from None
    if vectors.ndim != 2:
        raise UserError(f"{path}: expected N×D embeddings, found an array of shape {vectors.shape}")
    ids = ids_path(path).read_text().splitlines()
    if len(ids) != len(vectors):
        raise UserError(f"{path}: {len(vectors)} vectors but {len(ids)} ids in {ids_path(path).name}")
    return ids, vectors
