"""`glr knn`: exact blocked cosine kNN equals a brute-force reference; class scores; the CLI."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.model.knn import class_scores, search
from submissions.errors import UserError


def brute_force(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All similarities, sorted by (similarity desc, index asc), first k."""
    sim = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), sim.shape), -sim), axis=1)[:, :k]
    return np.take_along_axis(sim, order, 1), order


@pytest.mark.parametrize("nq,nx,d,k", [(37, 101, 8, 5), (9, 3, 4, 7), (40, 400, 16, 20), (5, 64, 3, 64)])
@pytest.mark.parametrize("backend", ["numpy", "tf"])
def test_blocked_search_equals_brute_force_with_ties(nq, nx, d, k, backend):
    """Small integer vectors: every dot product is exact in float32 and many are equal, so the order
    of ties (lower index row first) is checked too; every block size gives the same answer."""
    rng = np.random.default_rng(nq * nx + k)
    q = rng.integers(-2, 3, size=(nq, d)).astype(np.float32)
    x = rng.integers(-2, 3, size=(nx, d)).astype(np.float32)
    ref_s, ref_i = brute_force(q, x, k)
    kk = min(k, nx)
    blocks, qblocks = ((1, 2, 7, 64, nx, 10 * nx), (1, 6, nq)) if backend == "numpy" else ((7, 10 * nx), (6,))
    for block in blocks:
        for qblock in qblocks:
            s, i = search(q, x, k, block_size=block, query_block=qblock, backend=backend)
            assert s.shape == i.shape == (nq, k)
            np.testing.assert_array_equal(i[:, :kk], ref_i)
            np.testing.assert_array_equal(s[:, :kk], ref_s.astype(np.float32))
            assert (i[:, kk:] == -1).all() and np.isneginf(s[:, kk:]).all()  # k larger than the index


def test_a_wide_first_block_floored_by_a_sample_keeps_every_neighbour_and_tie():
    """An index block wider than 2 × knn._SAMPLE columns starts from the k-th best of a sample
    (no partition of the whole block): still the brute-force answer, ties included."""
    from pipeline.model import knn

    rng = np.random.default_rng(5)
    nx = 2 * knn._SAMPLE + 3000
    q = rng.integers(-2, 3, size=(30, 6)).astype(np.float32)
    x = rng.integers(-2, 3, size=(nx, 6)).astype(np.float32)
    x[-50:] = 3 * q[0]  # the best matches of query 0 sit at the end, past the sample
    ref_s, ref_i = brute_force(q, x, 60)
    for block in (nx, 5000):
        s, i = search(q, x, 60, block_size=block, query_block=16)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(s, ref_s.astype(np.float32))
    assert set(ref_i[0, :50]) == set(range(nx - 50, nx))


def test_random_unit_vectors_and_float16_index():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(60, 32)).astype(np.float32)
    x = rng.normal(size=(700, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ref_s, ref_i = brute_force(q, x, 10)
    s, i = search(q, x, 10, block_size=97, query_block=16)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    assert (i == ref_i).mean() > 0.99  # only near-ties may swap in float32
    s16, _ = search(q, x.astype(np.float16), 10, block_size=128)
    np.testing.assert_allclose(s16, ref_s, atol=2e-3)


def test_class_scores_sum_and_max():
    sims = np.array([[0.9, 0.5, 0.4, -0.2], [0.8, 0.7, -np.inf, -np.inf], [-0.1, -0.3, -np.inf, -np.inf]], np.float32)
    rows = np.array([[0, 1, 2, 3], [2, 3, -1, -1], [0, 1, -1, -1]])
    labels = np.array([7, 5, 5, 9])  # rows 0..3 of the index
    by_sum = class_scores(["a", "b", "c"], sims, rows, labels, top_k=5, score="sum")
    a = by_sum[by_sum["id"] == "a"]
    assert a["landmark_id"].tolist() == [5, 7, 9] and a["rank"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(a["score"], [(0.5 + 0.4) / 4, 0.9 / 4, 0.0])  # negative similarity counts 0
    by_max = class_scores(["a", "b", "c"], sims, rows, labels, top_k=2, score="max")
    a = by_max[by_max["id"] == "a"]
    assert a["landmark_id"].tolist() == [7, 5] and np.allclose(a["score"], [0.9, 0.5])  # top_k=2 cuts 9
    b = by_max[by_max["id"] == "b"]
    assert b["landmark_id"].tolist() == [5, 9] and np.allclose(b["score"], [0.8, 0.7])
    c = by_max[by_max["id"] == "c"]  # all neighbours dissimilar: scores 0, equal scores by landmark id
    assert c["landmark_id"].tolist() == [5, 7] and (c["score"] == 0).all()
    with pytest.raises(UserError, match="--score"):
        class_scores(["a"], sims[:1], rows[:1], labels, top_k=1, score="mean")


def clustered_files(folder, classes: int, per_class: int, queries: int, noise: float):
    """index.npy (per_class noisy rows around each of `classes` random centres), q.npy (queries around the
    centres in turn) and train.csv (landmark 100 + centre; rows listed in reverse, plus an id no row has)."""
    from pipeline.model.embeddings import write_embeddings

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(classes, 16))
    x_lab = np.repeat(np.arange(classes), per_class)
    x = centres[x_lab] + noise * rng.normal(size=(len(x_lab), 16))
    q_lab = np.arange(queries) % classes
    q = centres[q_lab] + noise * rng.normal(size=(queries, 16))
    x_ids = [f"t{i:03d}" for i in range(len(x_lab))]
    write_embeddings(folder / "index.npy", x_ids, x)
    write_embeddings(folder / "q.npy", [f"q{i:02d}" for i in range(queries)], q)
    pd.DataFrame({"id": x_ids[::-1] + ["extra"], "landmark_id": list((100 + x_lab)[::-1]) + [3]}) \
        .to_csv(folder / "train.csv", index=False)
    return q_lab


@pytest.fixture
def files(tmp_path):
    return tmp_path, clustered_files(tmp_path, classes=4, per_class=10, queries=12, noise=0.3)


def test_knn_cli_writes_a_predictions_table_the_ensemble_takes(files):
    from pipeline.cli import cli
    from submissions.tables import read_predictions

    d, q_lab = files
    r = CliRunner().invoke(cli, ["knn", str(d / "q.npy"), str(d / "index.npy"), "--labels", str(d / "train.csv"),
                                 "--out", str(d / "knn.parquet"), "--k", "8", "--top-k", "3", "--block-size", "7"])
    assert r.exit_code == 0, r.output
    p = read_predictions(d / "knn.parquet")
    top1 = p[p["rank"] == 0].set_index("id")["landmark_id"]
    assert (top1.loc[[f"q{i:02d}" for i in range(12)]].to_numpy() == 100 + q_lab).all()
    assert p["score"].between(0, 1).all()
    whole = CliRunner().invoke(cli, ["knn", str(d / "q.npy"), str(d / "index.npy"), "--labels", str(d / "train.csv"),
                                     "--out", str(d / "whole.parquet"), "--k", "8", "--top-k", "3"])
    assert whole.exit_code == 0
    pd.testing.assert_frame_equal(read_predictions(d / "whole.parquet"), p)  # block size changes nothing
    r = CliRunner().invoke(cli, ["ensemble", str(d / "knn.parquet"), str(d / "whole.parquet"), "--out",
                                 str(d / "ens.parquet")])
    assert r.exit_code == 0, r.output


def test_knn_cli_errors_are_one_line(files):
    from pipeline.cli import cli
    from pipeline.model.embeddings import write_embeddings

    d, _ = files
    write_embeddings(d / "wide.npy", ["w"], np.ones((1, 8)))
    base = ["--labels", str(d / "train.csv"), "--out", str(d / "o.parquet")]
    cases = [([str(d / "wide.npy"), str(d / "index.npy")], "8-D queries but"),
             ([str(d / "q.npy"), str(d / "none.npy")], "ids file none.ids.txt not found")]
    (d / "noids.npy").write_bytes((d / "index.npy").read_bytes())
    cases.append(([str(d / "q.npy"), str(d / "noids.npy")], "noids.ids.txt not found"))
    pd.DataFrame({"id": ["t000"], "landmark_id": [1]}).to_csv(d / "short.csv", index=False)
    for args, msg in cases:
        r = CliRunner().invoke(cli, ["knn", *args, *base])
        assert isinstance(r.exception, UserError) and msg in str(r.exception), r.output
        assert "\n" not in str(r.exception)
    r = CliRunner().invoke(cli, ["knn", str(d / "q.npy"), str(d / "index.npy"), "--labels", str(d / "short.csv"),
                                 "--out", str(d / "o.parquet")])
    assert isinstance(r.exception, UserError) and "39 index id(s) have no landmark_id" in str(r.exception)
    assert not (d / "o.parquet").exists()
