"""`glr knn --search ivf|hnsw`: approximate cosine kNN through faiss (optional: `pip install glr[ann]`),
and its recall@k against the exact search measured on a sample of the queries.

Why: the exact search (pipeline.model.knn.search) costs one pass over the index per query block:
at GLDv2's size (117k queries × 1.58M index rows × 512 dims, 1.9e14 flops) about an hour of BLAS
on a few CPU cores. An inverted-file index (IVF) scans only the `nprobe` of its `nlist` lists
nearest to each query; HNSW walks a neighbour graph. Both trade recall for time, so `glr knn`
measures the recall it got instead of assuming it (`recall_at_k`).

Memory (said before building, `announce_memory`): both indexes hold every index row as float32 in
RAM (N × D × 4 B: 3.2 GB at 1.58M × 512; IVF's lists, grown by copies, about 20% more), plus the
lists' ids (IVF, 8 B a row) or the graph's
links (HNSW, about 2·M × 4 B a row; its single row array is copied when it grows, so up to
N × D × 4 B more while rows are added). IVF's k-means trains on a seeded sample of at most
`TRAIN_PER_LIST` × nlist rows, gathered in one pass over the file. The index file (memory-mapped by
read_embeddings) is added to faiss block by block through `knn.read_rows`: never a second full copy.

Metric: inner product of the rows, which `glr embed` writes L2-normalised, so it is the cosine,
as in the exact search. Results are put in the exact search's order (similarity descending, equal
similarities to the lower index row) among the neighbours faiss returned; what faiss may differ in:
the rows it returns (the approximation, which recall@k measures), which of several rows tied at the
k-th similarity it keeps, and the similarities' last float32 bits (its own summation order).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from submissions.errors import UserError

KINDS = ("ivf", "hnsw")
TRAIN_PER_LIST = 40  # k-means rows per IVF list (faiss warns under 39)
EF_CONSTRUCTION = 40  # HNSW's build-time breadth (faiss's default)
IVF_SLACK = 1.2  # IVF's lists grow by copies: peak RSS measured ~20% above the rows (benchmarks/knn_ann.py)
_NO_ROW = np.iinfo(np.int64).max


def import_faiss():
    """The faiss module, or one UserError line saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise UserError("--search ivf/hnsw needs faiss, which is not installed: `pip install glr[ann]` "
                        "(or `pip install faiss-cpu`); --search exact needs nothing") from None
    return faiss


def default_nlist(n: int) -> int:
    """IVF lists for an index of n rows: about 4·sqrt(n), at least 1, and at most n / TRAIN_PER_LIST
    so k-means has enough rows per list."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // TRAIN_PER_LIST))


@dataclass(frozen=True)
class AnnParams:
    """An approximate index's kind and the parameters that matter (see `glr knn --help`)."""

    kind: str
    nlist: int = 0  # ivf: 0 = default_nlist(N)
    nprobe: int = 64  # ivf: lists scanned per query
    m: int = 32  # hnsw: links per node
    ef_search: int = 64  # hnsw: search breadth (faiss uses at least k)

    def describe(self, n: int) -> str:
        if self.kind == "ivf":
            nlist = self.nlist or default_nlist(n)
            return f"ivf, nlist {nlist}, nprobe {min(self.nprobe, nlist)}"
        return f"hnsw, M {self.m}, efSearch {self.ef_search}"


def index_bytes(params: AnnParams, n: int, dim: int, block_size: int = 65536) -> tuple[int, int]:
    """(bytes the built index holds, bytes held only while it is built) for n rows of dim floats
    added `block_size` rows at a time (a block read, and faiss's copies of it: about 3 blocks)."""
    vectors = n * dim * 4
    blocks = 3 * min(n, block_size) * dim * 4
    if params.kind == "ivf":
        nlist = params.nlist or default_nlist(n)
        train = min(n, TRAIN_PER_LIST * nlist) * dim * 4
        return int(vectors * IVF_SLACK) + n * 8 + nlist * dim * 4, max(train, blocks)
    return vectors + int(n * (2 * params.m * 4 * 1.1 + 16)), vectors + blocks  # its row array is copied as it grows


def _available_bytes() -> int:
    """The machine's available RAM (pipeline.parallel.memory)."""
    from pipeline.parallel import memory

    return memory()["available"]


def announce_memory(params: AnnParams, n: int, dim: int, block_size: int = 65536) -> int:
    """Before building: one line (rows, bytes in RAM, memory available); a UserError when the
    machine's available memory cannot hold the index. Returns the bytes."""
    from pipeline.caches import human_bytes

    held, transient = index_bytes(params, n, dim, block_size)
    avail = _available_bytes()
    extra = f" (+ up to {human_bytes(transient)} while building: " + \
        ("the k-means sample, then the blocks added)" if params.kind == "ivf" else "its row array grows by copies)")
    print(f"{params.describe(n)} index in RAM: {n:,} rows × {dim}-D, {human_bytes(held)}{extra}; "
          f"{human_bytes(avail)} available", file=sys.stderr, flush=True)
    if held + transient > avail:
        raise UserError(f"--search {params.kind}: the index needs {human_bytes(held + transient)} of RAM but "
                        f"{human_bytes(avail)} is available; use --search exact (memory bounded by --block-size)")
    return held + transient


def _train_sample(index: np.ndarray, size: int, block: int, seed: int) -> np.ndarray:
    """`size` seeded random rows of `index`, gathered in one pass of block reads (no whole-file copy)."""
    from pipeline.model.knn import read_rows

    n = len(index)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    out = np.empty((size, index.shape[1]), np.float32)
    done = 0
    for x0 in range(0, n, block):
        lo, hi = np.searchsorted(rows, [x0, x0 + block])
        if hi > lo:
            out[done:done + hi - lo] = read_rows(index, x0, x0 + block)[rows[lo:hi] - x0]
            done += hi - lo
    return out


def build_index(index: np.ndarray, params: AnnParams, *, block_size: int = 65536, seed: int = 0):
    """A faiss inner-product index of every row of `index` (N×D, memory-mapped or not), added in
    blocks of `block_size` rows; IVF first trains its lists on a seeded sample."""
    from pipeline.model.knn import read_rows
    from pipeline.progress import progress

    faiss = import_faiss()
    n, dim = index.shape
    if params.kind not in KINDS:
        raise ValueError(f"kind {params.kind!r}: choose one of {', '.join(KINDS)}")
    if params.kind == "ivf":
        nlist = params.nlist or default_nlist(n)
        if nlist > n:
            raise UserError(f"--nlist {nlist}: more lists than the {n} index rows; give at most {n}")
        ann = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ann.cp.seed = seed
        ann.train(_train_sample(index, min(n, TRAIN_PER_LIST * nlist), block_size, seed))
        ann.nprobe = min(params.nprobe, nlist)
    else:
        ann = faiss.IndexHNSWFlat(dim, params.m, faiss.METRIC_INNER_PRODUCT)
        ann.hnsw.efConstruction = EF_CONSTRUCTION
        ann.hnsw.efSearch = params.ef_search
    starts = range(0, n, block_size)
    for x0 in progress(starts, total=len(starts), desc=f"{params.kind} index", unit="block"):
        ann.add(read_rows(index, x0, x0 + block_size))
    return ann


def ann_search(ann, queries: np.ndarray, k: int, *, query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every query row in the built index, as `knn.search` returns them: (similarities
    nq×k float32, rows nq×k int64, -inf / -1 where fewer were found), similarity descending and
    equal similarities to the lower row."""
    from pipeline.model.knn import read_rows
    from pipeline.progress import progress

    nq = len(queries)
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    starts = range(0, nq, query_block)
    for q0 in progress(starts, total=len(starts), desc="knn (approximate)", unit="block"):
        s, i = ann.search(read_rows(queries, q0, q0 + query_block), k)
        i = np.where(i < 0, _NO_ROW, i.astype(np.int64))
        s = np.where(i == _NO_ROW, -np.inf, s).astype(np.float32)
        order = np.lexsort((i, -s), axis=1)
        s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        out_s[q0:q0 + len(s)], out_i[q0:q0 + len(s)] = s, np.where(i == _NO_ROW, -1, i)
    return out_s, out_i


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Share of the exact top-k rows (valid ones, >= 0) the approximate top-k holds too, over all
    queries; 1.0 when there is nothing to find."""
    valid = exact_rows >= 0
    if not valid.any():
        return 1.0
    width = int(max(exact_rows.max(), approx_rows.max())) + 1  # rows of query j become j·width + row: one set
    shift = np.arange(len(exact_rows), dtype=np.int64)[:, None] * width
    found = np.isin((exact_rows + shift)[valid], (approx_rows + shift)[approx_rows >= 0])
    return float(found.sum() / valid.sum())


def sampled_recall(queries: np.ndarray, index: np.ndarray, approx_rows: np.ndarray, k: int, sample: int, *,
                   seed: int = 0, **exact_options) -> tuple[float, int]:
    """(recall@k of `approx_rows` against the exact search, queries it was measured on): the exact
    search (knn.search, `exact_options`: block sizes, backend) on a seeded sample of `sample`
    queries (all of them when there are fewer)."""
    from pipeline.model.knn import search

    m = min(sample, len(queries))
    if m < 1:
        return float("nan"), 0
    rows = np.sort(np.random.default_rng(seed).choice(len(queries), size=m, replace=False))
    q = np.ascontiguousarray(queries[rows], dtype=np.float32)
    _, exact = search(q, index, k, progress_desc="recall (exact)", **exact_options)
    return recall_at_k(approx_rows[rows], exact), m
