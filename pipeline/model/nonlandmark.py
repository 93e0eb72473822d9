"""`glr nonlandmark`: a per-query "looks like a non-landmark" signal in [0, 1], for the tuned policy's
nonlandmark term (tuning.policy).

The signal of a query is the mean of its `k` largest cosine similarities to a pool of non-landmark
images (the 2019–2020 GLR winners' distractor pool): the local validation's held-out-class queries,
a user folder of non-landmark photos, or the test set itself (its near-duplicates: many test
non-landmarks are near copies of one another), each embedded with `glr embed`. Negative similarities
count as 0, so the signal lies in [0, 1]. A pool row with the query's own id is skipped, so the test
set can be its own pool. The search is `pipeline.model.knn.search` (exact, blocked: memory bounded by
the block sizes, not by the number of queries or pool images); rows are L2-normalised as `glr embed`
writes them, so the dot product is the cosine.

Table: id (str, one row per query), nonlandmark (float64 in [0, 1]); validated by
`tuning.policy.validate_nonlandmark`, written as Parquet.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.errors import UserError


def nonlandmark_scores(query_ids: list[str], queries: np.ndarray, pool_ids: list[str], pool: np.ndarray, *,
                       k: int = 1, block_size: int = 65536, query_block: int = 1024,
                       backend: str = "numpy") -> pd.DataFrame:
    """(id, nonlandmark) of every query: mean of its k best similarities to the pool rows (module
    docstring), a pool row with the query's own id skipped; fewer than k pool rows count the
    missing ones as 0."""
    from pipeline.model.knn import search

    if k < 1:
        raise UserError(f"--k {k}: must be at least 1")
    if len(pool) == 0:
        raise UserError("the non-landmark pool is empty: embed some non-landmark images (`glr embed`)")
    if len(queries) and queries.shape[1] != pool.shape[1]:
        raise UserError(f"{queries.shape[1]}-D queries but {pool.shape[1]}-D pool rows; embed both with the "
                        "same model")
    pool_pos = pd.Index(pool_ids)
    own = pool_pos.get_indexer(pd.Index(query_ids)) if pool_pos.is_unique else None
    if own is None:
        raise UserError("the non-landmark pool has an id twice; one row per image")
    self_in_pool = bool((own >= 0).any())
    sims, rows = search(queries, pool, k + int(self_in_pool), block_size=block_size, query_block=query_block,
                        backend=backend, progress_desc="nonlandmark")
    sims = np.where((rows < 0) | (rows == own[:, None]), -np.inf, sims)
    if self_in_pool:  # the own row removed, the k best of the rest (rows are sorted best first)
        sims = -np.sort(-sims, axis=1)[:, :k]
    signal = np.clip(np.where(np.isneginf(sims), 0.0, sims.astype(np.float64)), 0.0, 1.0).mean(axis=1)
    return pd.DataFrame({"id": pd.Series(query_ids, dtype=str), "nonlandmark": signal})


def write_nonlandmark(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate and atomically write a non-landmark table as Parquet."""
    from submissions.tables import write_table
    from tuning.policy import validate_nonlandmark

    return write_table(validate_nonlandmark(df), path)


def nonlandmark(queries_path: str | os.PathLike, pool_path: str | os.PathLike, *, out: str | os.PathLike,
                k: int = 1, block_size: int = 65536, query_block: int = 1024, backend: str = "numpy") -> dict:
    """Score every query of `queries_path` against the pool `pool_path` (both from `glr embed`) and
    write the table to `out`; returns a summary (counts and signal quantiles)."""
    from pipeline.model.embeddings import read_embeddings

    q_ids, queries = read_embeddings(queries_path)
    p_ids, pool = read_embeddings(pool_path)
    if queries.shape[1] != pool.shape[1]:
        raise UserError(f"{queries_path}: {queries.shape[1]}-D queries but {pool_path} holds {pool.shape[1]}-D "
                        "rows; embed both with the same model")
    df = nonlandmark_scores(q_ids, queries, p_ids, pool, k=k, block_size=block_size, query_block=query_block,
                            backend=backend)
    write_nonlandmark(df, out)
    v = df["nonlandmark"].to_numpy()
    q = np.quantile(v, [0.5, 0.9]) if len(v) else [0.0, 0.0]
    return {"out": str(out), "queries": len(df), "pool": len(p_ids), "k": k,
            "median": round(float(q[0]), 4), "p90": round(float(q[1]), 4)}
