"""`glr knn --search ivf|hnsw`: the faiss index equals the exact search where it scans everything, its
recall@k is measured (and can be below 1), the CLI prints it, and glr without faiss says how to get it."""
from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.model.knn import search
from pipeline.model.knn_ann import (AnnParams, ann_search, build_index, default_nlist, recall_at_k,
                                    sampled_recall)
from submissions.errors import UserError

faiss = pytest.importorskip("faiss")


def unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def one_thread():
    """faiss's OpenMP on one thread: the same answer on every machine, and no fight for 2 cores."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_ivf_scanning_every_list_and_a_broad_hnsw_equal_the_exact_search():
    rng = np.random.default_rng(3)
    q, x = unit(rng, 120, 16), unit(rng, 2000, 16)
    ref_s, ref_i = search(q, x, 10)
    for params in (AnnParams("ivf", nlist=20, nprobe=20), AnnParams("hnsw", m=16, ef_search=400)):
        s, i = ann_search(build_index(x, params, block_size=333), q, 10, query_block=50)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(s, ref_s, atol=1e-5)
        assert recall_at_k(i, ref_i) == 1.0


def test_few_lists_probed_lose_neighbours_and_the_recall_says_how_many():
    """Random unit vectors (no clusters, the worst case for IVF) with one list of 40 scanned: the
    recall is measured, below 1, and the sampled recall over all queries is the same figure."""
    rng = np.random.default_rng(4)
    q, x = unit(rng, 200, 16), unit(rng, 4000, 16)
    s, i = ann_search(build_index(x, AnnParams("ivf", nlist=40, nprobe=1)), q, 10)
    _, ref_i = search(q, x, 10)
    r = recall_at_k(i, ref_i)
    assert 0.05 < r < 0.9
    assert sampled_recall(q, x, i, 10, 10_000) == (r, 200)
    r50, m = sampled_recall(q, x, i, 10, 50)
    assert m == 50 and 0.0 < r50 < 1.0
    assert ((np.diff(s, axis=1) <= 0) | np.isneginf(s[:, 1:])).all()  # best first, as the exact search


def test_ties_are_ordered_like_the_exact_search_and_missing_slots_are_empty():
    """Small integer vectors: every similarity is exact in float32 and many are equal. Scanning every
    list, the similarities equal the exact ones slot by slot; equal ones come lower row first; a k
    larger than the index leaves (-inf, -1) slots as the exact search does."""
    rng = np.random.default_rng(5)
    q = rng.integers(-2, 3, size=(30, 6)).astype(np.float32)
    x = rng.integers(-2, 3, size=(200, 6)).astype(np.float32)
    ref_s, _ = search(q, x, 12)
    s, i = ann_search(build_index(x, AnnParams("ivf", nlist=5, nprobe=5)), q, 12)
    np.testing.assert_array_equal(s, ref_s)
    same = s[:, 1:] == s[:, :-1]
    assert (i[:, 1:][same] > i[:, :-1][same]).all()
    small = x[:7]
    s, i = ann_search(build_index(small, AnnParams("hnsw", m=4)), q, 10)
    assert (i[:, 7:] == -1).all() and np.isneginf(s[:, 7:]).all()
    assert (np.sort(i[:, :7], axis=1) == np.arange(7)).all()


def test_recall_at_k_counts_the_exact_neighbours_found():
    exact = np.array([[0, 1, 2, 3], [4, 5, -1, -1]])
    approx = np.array([[3, 9, 0, 8], [5, 4, -1, -1]])
    assert recall_at_k(approx, exact) == pytest.approx(4 / 6)  # 2 of 4, then 2 of 2 (empty slots not counted)
    assert recall_at_k(np.full((1, 2), -1), np.full((1, 2), -1)) == 1.0


def test_the_index_is_built_from_a_float16_memmapped_file_block_by_block(tmp_path):
    from pipeline.model.embeddings import embedding_writer, read_embeddings
    from pipeline.model.knn_ann import _train_sample

    rng = np.random.default_rng(6)
    x = unit(rng, 1500, 8)
    with embedding_writer(tmp_path / "x.npy", 1500, 8, dtype="float16") as w:  # what `glr embed --float16` writes
        w.append([f"t{i}" for i in range(1500)], x)
    _, mm = read_embeddings(tmp_path / "x.npy")
    assert isinstance(mm, np.memmap) and mm.dtype == np.float16
    rows = np.sort(np.random.default_rng(0).choice(1500, size=300, replace=False))
    np.testing.assert_array_equal(_train_sample(mm, 300, 7, seed=0), mm[rows].astype(np.float32))
    q = unit(rng, 40, 8)
    ref = search(q, mm, 5)
    for block in (7, 10_000):
        ann = build_index(mm, AnnParams("ivf", nlist=10, nprobe=10), block_size=block)
        assert ann.ntotal == 1500
        s, i = ann_search(ann, q, 5)
        np.testing.assert_array_equal(i, ref[1])
    assert default_nlist(1_580_000) == 5028 and default_nlist(100) == 2 and default_nlist(3) == 1


@pytest.fixture
def files(tmp_path):
    from tests.model.test_knn import clustered_files

    clustered_files(tmp_path, classes=6, per_class=50, queries=40, noise=0.4)
    return tmp_path


def run_knn(d, out, *extra):
    from pipeline.cli import cli

    return CliRunner().invoke(cli, ["knn", str(d / "q.npy"), str(d / "index.npy"), "--labels", str(d / "train.csv"),
                                    "--out", str(d / out), "--k", "8", "--top-k", "3", "--quiet", *extra])


def test_knn_cli_approximate_prints_its_recall_and_scores_as_the_exact_search(files):
    from submissions.tables import read_predictions

    d = files
    assert run_knn(d, "exact.parquet").exit_code == 0
    r = run_knn(d, "ivf.parquet", "--search", "ivf", "--nlist", "7", "--nprobe", "7")
    assert r.exit_code == 0, r.output
    assert "recall@8 vs exact on 40 sampled queries: 1.000" in r.output
    assert "index in RAM: 300 rows × 16-D" in r.output  # said before building (stderr, mixed in by CliRunner)
    pd.testing.assert_frame_equal(read_predictions(d / "ivf.parquet"), read_predictions(d / "exact.parquet"),
                                  atol=1e-6)
    r = run_knn(d, "hnsw.parquet", "--search", "hnsw", "--recall-sample", "10", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output.strip().splitlines()[-1])
    assert info["method"] == "hnsw" and info["recall_queries"] == 10 and 0.5 < info["recall"] <= 1.0
    r = run_knn(d, "ivf1.parquet", "--search", "ivf", "--nlist", "30", "--nprobe", "1", "--recall-sample", "0")
    assert r.exit_code == 0 and "recall@" not in r.output
    r = run_knn(d, "big.parquet", "--search", "ivf", "--nlist", "301")
    assert isinstance(r.exception, UserError) and "--nlist 301" in str(r.exception)


def test_too_little_memory_is_refused_before_building(files, monkeypatch):
    from pipeline.model import knn_ann

    monkeypatch.setattr(knn_ann, "_available_bytes", lambda: 1000)  # the machine's MemAvailable, not our code
    r = run_knn(files, "o.parquet", "--search", "hnsw")
    assert isinstance(r.exception, UserError) and "use --search exact" in str(r.exception)
    assert not (files / "o.parquet").exists()


def test_without_faiss_the_approximate_search_says_how_to_install_it(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    for kind in ("ivf", "hnsw"):
        r = run_knn(files, "o.parquet", "--search", kind)
        assert isinstance(r.exception, UserError), r.output
        assert "pip install glr[ann]" in str(r.exception) and "\n" not in str(r.exception)
    assert not (files / "o.parquet").exists()
    assert run_knn(files, "exact.parquet").exit_code == 0  # the exact search needs no faiss
