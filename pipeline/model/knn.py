"""`glr knn`: exact cosine k-nearest neighbours of query embeddings among index embeddings, and class
scores from the neighbours, written as a predictions table (so `glr ensemble` takes it as a member).

Search: queries and index are read memory-mapped (pipeline.model.embeddings) and compared block by
block: a query block (`query_block` rows) times an index block (`block_size` rows) is one float32
matmul (BLAS on the CPU; TensorFlow's matmul with `backend="tf"`, which runs on a GPU when one is
visible). Each query keeps a running top-k: only entries above its current k-th best similarity
enter the merge (on the first block, above the k-th best of a sample of its columns), and a row
with many such entries is first cut to its k best with `np.partition`. Memory is bounded by the
blocks (about 4·qb·bx bytes for the similarity block, ×2–3 while it is cut), never by the number
of queries or index rows. Rows are assumed L2-normalised (as
`glr embed` and `glr predict --embeddings` write them), so the dot product is the cosine.

Order: neighbours by similarity, equal similarities to the lower index row, so the result does not
depend on the block sizes (block boundaries only change the order in which rows are seen).

Class scores: a neighbour's similarity s counts as max(s, 0) (a dissimilar neighbour adds nothing;
scores stay finite and >= 0 as the predictions contract asks). `sum`: a class's score is the sum
over its neighbours among the k, divided by k (so it lies in [0, 1], like a classifier's
probability, and `glr ensemble` can average it with them); `max`: its best neighbour's similarity.
Equal scores go to the lower landmark id.

Approximate search (`search="ivf"` or `"hnsw"`, faiss, optional): pipeline.model.knn_ann builds the
index and searches it; its neighbours feed the same class scoring, and the exact search on a seeded
sample of the queries (`recall_sample`) gives the recall@k that the result reports.
"""
from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.options import KNN, PREDICT
from submissions.errors import UserError

_K = KNN.default
SCORES = KNN["score"].choices
BACKENDS = KNN["backend"].choices
_NO_ROW = np.iinfo(np.int64).max  # index of an empty slot (sorts after every real row)
_CUT = 512  # a row with more than max(_CUT, 4k) candidates in a block is cut to its k best first
_SAMPLE = 8192  # columns whose k-th best bounds a row's floor from below while its top-k is not full


def _merge(top_s: np.ndarray, top_i: np.ndarray, cand_s: np.ndarray, cand_i: np.ndarray, k: int):
    """The k best of (running top, candidates) per row: similarity descending, then index ascending."""
    s = np.concatenate([top_s, cand_s], axis=1)
    i = np.concatenate([top_i, cand_i], axis=1)
    order = np.lexsort((i, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _view(buf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A C-contiguous `shape` array on the front of a reused flat buffer (no fresh pages per block)."""
    return buf[:shape[0] * shape[1]].reshape(shape)


def _candidates(sim: np.ndarray, floor: np.ndarray, k: int, col0: int,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Entries of `sim` above each row's floor, as padded (similarity, index) rows; a row with more
    than max(_CUT, 4k) of them is first cut to its entries >= its k-th largest (ties kept, the merge
    picks). While a row's top-k is not full (floor -inf: the first block), the k-th largest of its
    first _SAMPLE columns, lowered by one ulp, is a floor no top-k entry is below: the whole block
    then needs no partition, only the sample."""
    n = sim.shape[1]
    if n > 2 * _SAMPLE and _SAMPLE > k and np.isneginf(floor).any():
        sample = np.partition(sim[:, :_SAMPLE], _SAMPLE - k, axis=1)[:, _SAMPLE - k]
        floor = np.maximum(floor, np.nextafter(sample, np.float32(-np.inf)))
    mask = np.greater(sim, floor[:, None], out=mask)
    counts = np.count_nonzero(mask, axis=1)
    big = np.flatnonzero(counts > max(_CUT, 4 * k)) if n > k else np.zeros(0, np.int64)
    if len(big) == len(sim):  # every row (the first block of a query block): no row copies
        kth = np.partition(sim, n - k, axis=1)[:, n - k]
        np.greater_equal(sim, kth[:, None], out=mask)
        counts = np.count_nonzero(mask, axis=1)
    elif len(big):
        kth = np.partition(sim[big], n - k, axis=1)[:, n - k]
        mask[big] = sim[big] >= kth[:, None]
        counts[big] = np.count_nonzero(mask[big], axis=1)
    rows, cols = np.divmod(np.flatnonzero(mask), n)
    width = int(counts.max()) if len(counts) else 0
    starts = np.cumsum(counts) - counts
    pos = np.arange(len(rows)) - starts[rows]
    cand_s = np.full((len(sim), width), -np.inf, np.float32)
    cand_i = np.full((len(sim), width), _NO_ROW, np.int64)
    cand_s[rows, pos] = sim[rows, cols]
    cand_i[rows, pos] = cols + col0
    return cand_s, cand_i


def read_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows start:stop as a float32 C array. A memory-mapped .npy (read_embeddings) is read with a
    plain file read instead of through the map, so the pages of an index scanned once per query
    block do not pile up in the process's resident memory (they stay in the page cache)."""
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous:
        stop = min(stop, len(array))
        width = int(np.prod(array.shape[1:]))
        with open(array.filename, "rb") as f:
            f.seek(array.offset + start * width * array.dtype.itemsize)
            rows = np.fromfile(f, dtype=array.dtype, count=max(stop - start, 0) * width)
        return np.ascontiguousarray(rows.reshape(-1, *array.shape[1:]), dtype=np.float32)
    return np.ascontiguousarray(array[start:stop], dtype=np.float32)


def _tf_block_topk(q: np.ndarray, x: np.ndarray, k: int, col0: int):
    """Similarity block and its top-k on TensorFlow's device (a GPU when visible): only qb×k leaves it.
    `tf.math.top_k` puts equal values in index order, as the numpy path does."""
    import tensorflow as tf

    sim = tf.matmul(tf.constant(q), tf.constant(x), transpose_b=True)
    vals, cols = tf.math.top_k(sim, k=min(k, x.shape[0]), sorted=True)
    return vals.numpy(), cols.numpy().astype(np.int64) + col0


def search(queries: np.ndarray, index: np.ndarray, k: int, *, block_size: int = 65536, query_block: int = 1024,
           backend: str = "numpy", progress_desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` inner-product neighbours of every query row among the index rows: (similarities
    nq×k float32, index rows nq×k int64), best first; slots beyond the index's size are (-inf, -1).
    Blocks of `query_block` × `block_size` rows bound the memory (module docstring)."""
    from pipeline.progress import progress

    if k < 1 or block_size < 1 or query_block < 1:
        raise ValueError("k, block_size and query_block must be at least 1")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    nq, nx = len(queries), len(index)
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    starts = range(0, nq, query_block)
    sim_buf = np.empty(min(query_block, nq) * min(block_size, nx), np.float32)  # reused by every block
    mask_buf = np.empty(len(sim_buf), bool)
    for q0 in progress(starts, total=len(starts), desc=progress_desc or "knn", unit="block"):
        q = read_rows(queries, q0, q0 + query_block)
        top_s = np.full((len(q), k), -np.inf, np.float32)
        top_i = np.full((len(q), k), _NO_ROW, np.int64)
        for x0 in range(0, nx, block_size):
            x = read_rows(index, x0, x0 + block_size)
            if backend == "tf":
                cand_s, cand_i = _tf_block_topk(q, x, k, x0)
            else:
                sim = np.matmul(q, x.T, out=_view(sim_buf, (len(q), len(x))))
                cand_s, cand_i = _candidates(sim, top_s[:, -1], k, x0, _view(mask_buf, sim.shape))
            top_s, top_i = _merge(top_s, top_i, cand_s, cand_i, k)
        empty = top_i == _NO_ROW
        top_i[empty] = -1
        out_s[q0:q0 + len(q)], out_i[q0:q0 + len(q)] = top_s, top_i
    return out_s, out_i


def class_scores(ids: list[str], sims: np.ndarray, rows: np.ndarray, row_labels: np.ndarray, *, top_k: int,
                 score: str = "sum") -> pd.DataFrame:
    """The predictions table (id, landmark_id, score, rank) of each query's `top_k` classes, scored
    from its neighbours (`rows` into `row_labels`, -1 = none) as the module docstring says."""
    if score not in SCORES:
        raise UserError(f"--score {score!r}: choose one of {', '.join(SCORES)}")
    nq, k = rows.shape
    valid = (rows >= 0).ravel()
    if not valid.any():
        return pd.DataFrame({"id": pd.Series([], dtype=str), "landmark_id": pd.Series([], dtype=np.int64),
                             "score": pd.Series([], dtype=np.float32), "rank": pd.Series([], dtype=np.int16)})
    q = np.repeat(np.arange(nq), k)[valid]
    lab = row_labels[rows.ravel()[valid]].astype(np.int64)
    s = np.clip(sims.ravel()[valid], 0, None).astype(np.float64)
    order = np.lexsort((lab, q))
    q, lab, s = q[order], lab[order], s[order]
    first = np.flatnonzero(np.r_[True, (q[1:] != q[:-1]) | (lab[1:] != lab[:-1])])
    q, lab = q[first], lab[first]
    agg = (np.add.reduceat(s, first) / k) if score == "sum" else np.maximum.reduceat(s, first)
    order = np.lexsort((lab, -agg, q))
    q, lab, agg = q[order], lab[order], agg[order]
    row_start = np.searchsorted(q, q, side="left")
    rank = np.arange(len(q)) - row_start
    keep = rank < top_k
    return pd.DataFrame({"id": np.asarray(ids, dtype=object)[q[keep]].astype(str),
                         "landmark_id": lab[keep], "score": agg[keep].astype(np.float32),
                         "rank": rank[keep].astype(np.int16)})


def index_labels(index_ids: list[str], labels_csv: str | os.PathLike) -> np.ndarray:
    """landmark_id of every index row, from train.csv (id, landmark_id); UserError naming the ids missing."""
    path = Path(labels_csv)
    try:
        table = pd.read_csv(path, usecols=["id", "landmark_id"], dtype={"id": str})
    except FileNotFoundError:
        raise UserError(f"--labels {path}: not found (give the competition's train.csv)") from None
    except ValueError as e:
        raise UserError(f"--labels {path}: expected columns id,landmark_id ({e})") from None
    pos = pd.Index(table["id"]).get_indexer(pd.Index(index_ids)) if table["id"].is_unique else None
    if pos is None:
        raise UserError(f"--labels {path}: an id appears twice; expected one row per training image")
    missing = np.flatnonzero(pos < 0)
    if len(missing):
        shown = ", ".join(index_ids[i] for i in missing[:3])
        raise UserError(f"--labels {path}: {len(missing)} index id(s) have no landmark_id there ({shown}…); "
                        "give the train.csv the index images come from")
    return table["landmark_id"].to_numpy(dtype=np.int64)[pos]


@dataclass(frozen=True)
class KnnResult:
    """What `knn` wrote and how long the search took."""

    out: str
    queries: int
    index: int
    dim: int
    k: int
    seconds: float
    gflops: float | None  # exact search only
    method: str = "exact"
    params: str = ""  # the approximate index's parameters, in words
    build_seconds: float | None = None
    recall: float | None = None  # recall@k vs exact on recall_queries sampled queries (approximate only)
    recall_queries: int = 0

    def stats(self) -> dict:
        return dict(self.__dict__)


def knn(queries_path: str | os.PathLike, index_path: str | os.PathLike, *, labels: str | os.PathLike,
        out: str | os.PathLike, k: int = _K("k"), top_k: int = PREDICT.default("top_k"),
        block_size: int = _K("block_size"), query_block: int = _K("query_block"), score: str = _K("score"),
        backend: str = _K("backend"), search: str = _K("search"), nlist: int = _K("nlist"),
        nprobe: int = _K("nprobe"), hnsw_m: int = _K("hnsw_m"), ef_search: int = _K("ef_search"),
        recall_sample: int = _K("recall_sample")) -> KnnResult:
    """Search every query among the index (exact cosine, blocked; or `search` ivf/hnsw through faiss,
    its recall@k measured on `recall_sample` queries), score classes from the neighbours and write the
    predictions table to `out`."""
    from pipeline.model.embeddings import read_embeddings

    method = search  # the exact search is this module's `search` function
    if method not in KNN["search"].choices:
        raise UserError(f"--search {method!r}: choose one of {', '.join(KNN['search'].choices)}")
    if method != "exact":
        from pipeline.model.knn_ann import import_faiss

        import_faiss()  # before reading anything: the missing package is the first thing to say
    for name, v in (("--k", k), ("--top-k", top_k), ("--block-size", block_size), ("--query-block", query_block),
                    ("--nprobe", nprobe), ("--ef-search", ef_search)):
        if v < 1:
            raise UserError(f"{name} {v}: must be at least 1")
    if hnsw_m < 2:
        raise UserError(f"--hnsw-m {hnsw_m}: must be at least 2 (links per node of the graph)")
    for name, v in (("--recall-sample", recall_sample), ("--nlist", nlist)):
        if v < 0:
            raise UserError(f"{name} {v}: must be at least 0")
    if score not in SCORES:
        raise UserError(f"--score {score!r}: choose one of {', '.join(SCORES)}")
    q_ids, queries = read_embeddings(queries_path)
    x_ids, index = read_embeddings(index_path)
    if queries.shape[1] != index.shape[1]:
        raise UserError(f"{queries_path}: {queries.shape[1]}-D queries but {index_path} holds {index.shape[1]}-D "
                        "rows; embed both with the same model")
    row_labels = index_labels(x_ids, labels)
    if method != "exact":
        return _knn_approximate(q_ids, queries, index, row_labels, out=out, k=k, top_k=top_k, score=score,
                                block_size=block_size, query_block=query_block, backend=backend, method=method,
                                nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search,
                                recall_sample=recall_sample)
    return _knn_exact(q_ids, queries, index, row_labels, out=out, k=k, top_k=top_k, score=score,
                      block_size=block_size, query_block=query_block, backend=backend)


def _knn_exact(q_ids: list[str], queries: np.ndarray, index: np.ndarray, row_labels: np.ndarray, *,
               out, k: int, top_k: int, score: str, block_size: int, query_block: int, backend: str) -> KnnResult:
    """`knn` by the exact blocked search, with its throughput."""
    from submissions.tables import write_predictions

    t0 = time.perf_counter()
    sims, rows = search(queries, index, k, block_size=block_size, query_block=query_block, backend=backend)
    secs = time.perf_counter() - t0
    write_predictions(class_scores(q_ids, sims, rows, row_labels, top_k=top_k, score=score), out)
    flops = 2.0 * len(queries) * len(index) * queries.shape[1]
    return KnnResult(str(out), len(queries), len(index), int(queries.shape[1]), k, round(secs, 3),
                     round(flops / max(secs, 1e-9) / 1e9, 2))


def _knn_approximate(q_ids: list[str], queries: np.ndarray, index: np.ndarray, row_labels: np.ndarray, *,
                     out, k: int, top_k: int, score: str, block_size: int, query_block: int, backend: str,
                     method: str, nlist: int, nprobe: int, hnsw_m: int, ef_search: int,
                     recall_sample: int) -> KnnResult:
    """`knn` through a faiss index (pipeline.model.knn_ann): build (its RAM said first), search,
    recall@k against the exact search on a sample of the queries, the same class scoring."""
    from pipeline.model.knn_ann import AnnParams, announce_memory, ann_search, build_index, sampled_recall
    from submissions.tables import write_predictions

    params = AnnParams(method, nlist=nlist, nprobe=nprobe, m=hnsw_m, ef_search=ef_search)
    announce_memory(params, len(index), int(index.shape[1]), block_size)
    t0 = time.perf_counter()
    ann = build_index(index, params, block_size=block_size)
    t1 = time.perf_counter()
    sims, rows = ann_search(ann, queries, k, query_block=query_block)
    secs = time.perf_counter() - t1
    del ann
    recall, m = sampled_recall(queries, index, rows, k, recall_sample, block_size=block_size,
                               query_block=query_block, backend=backend)
    write_predictions(class_scores(q_ids, sims, rows, row_labels, top_k=top_k, score=score), out)
    return KnnResult(str(out), len(queries), len(index), int(queries.shape[1]), k, round(secs, 3), None,
                     method, params.describe(len(index)), round(t1 - t0, 3),
                     round(recall, 4) if m else None, m)
