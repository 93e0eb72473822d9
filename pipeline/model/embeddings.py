"""Global descriptors saved by `glr predict --embeddings X.npy`, read by `glr verify --refs nearest`.

`X.npy` holds float32 N×D rows (L2-normalised); `X.ids.txt` beside it holds the N image ids,
one a line, in the same order.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from submissions.errors import UserError
from submissions.files import atomic_path, atomic_write_text


def ids_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".ids.txt")


def write_embeddings(path: str | os.PathLike, ids: list[str], vectors: np.ndarray) -> Path:
    """L2-normalise and write `vectors` with their ids, atomically."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"expected {len(ids)} rows of vectors, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.maximum(norms, 1e-12)
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, vectors)
    atomic_write_text(ids_path(path), "".join(f"{i}\n" for i in ids))
    return Path(path)


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Return (ids, vectors) saved by `write_embeddings`."""
    path = Path(path)
    if not path.exists() or not ids_path(path).exists():
        raise UserError(f"{path}: embeddings or their ids file {ids_path(path).name} not found "
                        "(write them with `glr predict --embeddings`)")
    vectors = np.load(path)
    ids = ids_path(path).read_text().splitlines()
    if len(ids) != len(vectors):
        raise UserError(f"{path}: {len(vectors)} vectors but {len(ids)} ids in {ids_path(path).name}")
    return ids, vectors
