"""Global descriptors saved by `glr predict --embeddings X.npy`, read by `glr verify --refs nearest`.

`X.npy` holds float32 N×D rows (L2-normalised); `X.ids.txt` beside it holds the N image ids,
one a line, in the same order. Rows are written batch by batch into a memory-mapped file and read
back memory-mapped, so neither side holds all N×D in RAM (1.58M training images at the real size).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from submissions.errors import UserError
from submissions.files import atomic_path, atomic_write_text

_COPY_ROWS = 65536  # rows per block when a file with skipped rows is compacted


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

    def __init__(self, tmp: Path, capacity: int, dim: int):
        self._tmp, self._dim = tmp, dim
        self._mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(capacity, dim))
        self.ids: list[str] = []

    def append(self, ids: list[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1)
        if vectors.shape[1] != self._dim:
            raise ValueError(f"expected {self._dim}-D vectors, got shape {vectors.shape}")
        start = len(self.ids)
        if start + len(ids) > len(self._mm):
            raise ValueError(f"more than the {len(self._mm)} rows announced")
        self._mm[start:start + len(ids)] = normalise(vectors)
        self.ids.extend(ids)

    def finish(self) -> None:
        """Flush; when fewer rows than announced were written, copy them block by block into a
        file of the right shape (skipped images are rare; a block of rows is all that is in RAM)."""
        n, full = len(self.ids), self._mm
        full.flush()
        if n == len(full):
            del self._mm
            return
        part = self._tmp.with_name(self._tmp.name + ".part")
        out = np.lib.format.open_memmap(part, mode="w+", dtype=np.float32, shape=(n, self._dim))
        for s in range(0, n, _COPY_ROWS):
            e = min(s + _COPY_ROWS, n)
            out[s:e] = full[s:e]
        out.flush()
        del out, full, self._mm
        os.replace(part, self._tmp)


@contextlib.contextmanager
def embedding_writer(path: str | os.PathLike, capacity: int, dim: int) -> Iterator[EmbeddingWriter]:
    """Write embeddings at `path` (and their ids beside it) batch by batch, atomically: on success
    the .npy is renamed into place, then the ids file written; on an error neither is touched."""
    with atomic_path(path, suffix=".npy") as tmp:
        writer = EmbeddingWriter(tmp, capacity, dim)
        try:
            yield writer
            writer.finish()
        finally:
            tmp.with_name(tmp.name + ".part").unlink(missing_ok=True)
    atomic_write_text(ids_path(path), "".join(f"{i}\n" for i in writer.ids))


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
                        "(write them with `glr predict --embeddings`)")
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
