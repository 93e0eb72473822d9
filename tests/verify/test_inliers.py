"""Matching, seeded RANSAC (vs the skimage reference), `verify`/`merge`/`match` on synthetic data."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.verify.features import make_config, make_extractor, stable_shard
from pipeline.verify.inliers import (MatchConfig, match_descriptors, match_features, merge, plan_pairs, ransac_inliers,
                             skimage_inliers, verify)
from submissions.tables import read_inliers, write_predictions
from tests.verify.test_features import save, textured

ROOT = Path(__file__).resolve().parents[1]


# -- matching -----------------------------------------------------------------------------------


def _brute(da, db, ratio, mutual, max_distance):
    from scipy.spatial.distance import cdist

    d = cdist(da.astype(float), db.astype(float))
    out = []
    for i, row in enumerate(d):
        o = np.argsort(row)
        j, d1, d2 = o[0], row[o[0]], row[o[1]]
        if ratio is not None and not d1 < ratio * d2:
            continue
        if max_distance is not None and not d1 < max_distance:
            continue
        if mutual and np.argmin(d[:, j]) != i:
            continue
        out.append((i, j))
    return np.array(out, np.int64).reshape(-1, 2)


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("ratio,mutual,max_distance", [(0.8, False, None), (0.9, True, None), (None, False, 0.8)])
def test_vectorised_matching_equals_brute_force(ratio, mutual, max_distance, unit):
    rng = np.random.default_rng(1)
    da = rng.random((150, 40), dtype=np.float32)
    db = np.concatenate([da[:60] + rng.normal(0, 0.03, (60, 40)).astype(np.float32), rng.random((90, 40), dtype=np.float32)])
    db = db[rng.permutation(len(db))]
    da /= np.linalg.norm(da, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    if not unit:  # e.g. plain SIFT-like magnitudes: the general path
        da *= rng.uniform(0.9, 1.1, (len(da), 1)).astype(np.float32)
        db *= rng.uniform(0.9, 1.1, (len(db), 1)).astype(np.float32)
    got = match_descriptors(da, db, ratio=ratio, mutual=mutual, max_distance=max_distance)
    want = _brute(da, db, ratio, mutual, max_distance)
    assert len(want) >= 30
    np.testing.assert_array_equal(got, want)


def test_hamming_matching_for_orb():
    rng = np.random.default_rng(2)
    da = rng.integers(0, 256, (80, 32), dtype=np.uint8)
    db = da.copy()
    db[:, 0] ^= 1  # one bit off: still each other's nearest neighbour
    got = match_descriptors(da, db, ratio=0.8, mutual=True)
    np.testing.assert_array_equal(got, np.stack([np.arange(80), np.arange(80)], 1))


# -- RANSAC -------------------------------------------------------------------------------------


def _affine_pairs(seed, n_in=120, n_out=200, noise=0.7):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 500, (n_in + n_out, 2))
    a = np.array([[1.1, 0.2], [-0.15, 0.9]]) * rng.uniform(0.7, 1.3)
    dst = src @ a.T + rng.uniform(-50, 50, 2)
    dst[:n_in] += rng.normal(0, noise, (n_in, 2))
    dst[n_in:] = rng.uniform(0, 500, (n_out, 2))
    return src.astype(np.float32), dst.astype(np.float32), n_in


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_opencv_counts_agree_with_skimage_reference_on_known_inliers(seed):
    src, dst, n_in = _affine_pairs(seed)
    cfg = MatchConfig(threshold=4.0)
    cv = ransac_inliers(src, dst, cfg)
    sk = skimage_inliers(src, dst, threshold=4.0, max_trials=2000, seed=seed)
    assert cv[:n_in].mean() >= 0.97  # finds (nearly) all true inliers: counts are not cut short
    assert abs(int(cv.sum()) - int(sk.sum())) <= max(3, 0.05 * n_in)
    assert abs(int(cv.sum()) - n_in) <= 0.05 * n_in + 6  # few outliers fall inside 4 px by chance


def test_ransac_is_seeded_and_repeatable_across_processes():
    src, dst, _ = _affine_pairs(5, n_in=15, n_out=200, noise=2.0)  # hard: few inliers
    cfg = MatchConfig(threshold=5.0, method="magsac")
    counts = {int(ransac_inliers(src, dst, cfg).sum()) for _ in range(5)}
    assert len(counts) == 1
    code = ("import numpy as np, sys; sys.path.insert(0, %r); from tests.verify.test_inliers import _affine_pairs;"
            "from pipeline.verify.inliers import ransac_inliers, MatchConfig;"
            "s, d, _ = _affine_pairs(5, n_in=15, n_out=200, noise=2.0);"
            "print(int(ransac_inliers(s, d, MatchConfig(threshold=5.0, method='magsac')).sum()))") % str(ROOT)
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert int(other) == counts.pop()


@pytest.mark.parametrize("model,method", [("affine", "ransac"), ("affine", "magsac"), ("homography", "ransac"),
                                          ("homography", "magsac"), ("fundamental", "ransac")])
def test_models_find_a_homography_pair(model, method):
    rng = np.random.default_rng(7)
    src = rng.uniform(0, 400, (150, 2))
    h = np.array([[1.0, 0.05, 10], [0.02, 0.95, -5], [2e-5, 1e-5, 1]])  # mild: affine fits within 6 px
    p = np.c_[src, np.ones(150)] @ h.T
    dst = p[:, :2] / p[:, 2:]
    dst[100:] = rng.uniform(0, 400, (50, 2))
    mask = ransac_inliers(src, dst, MatchConfig(model=model, method=method, threshold=6.0))
    assert mask[:100].mean() > 0.9 and mask[100:].mean() < 0.3
    assert not ransac_inliers(src[:2], dst[:2], MatchConfig(model=model)).any()  # too few points: 0


def test_warped_image_matches_unrelated_does_not():
    import cv2

    img = textured(256, seed=3)
    h = np.array([[0.9, 0.1, 12], [-0.08, 0.95, 8], [2e-4, 1e-4, 1]])
    warped = cv2.warpPerspective(img, h, (256, 256), borderMode=cv2.BORDER_REFLECT)
    ext = make_extractor("sift", n_features=500)
    fa, fb, fc = ext.extract_array(img), ext.extract_array(warped), ext.extract_array(textured(256, seed=9))
    same = match_features(fa, fb)
    assert same["inliers"] >= 40
    assert match_features(fa, fc)["inliers"] <= 10
    # inliers agree with the true warp
    m = same["matches"][same["inlier_mask"]]
    p = np.c_[fa.locations[m[:, 0]], np.ones(len(m))] @ h.T
    err = np.linalg.norm(p[:, :2] / p[:, 2:] - fb.locations[m[:, 1]], axis=1)
    assert np.median(err) < 2.0


# -- verify on synthetic competitions ----------------------------------------------------------


def _solution(comp: Path) -> dict[str, int | None]:
    sol = pd.read_csv(comp / "solution.csv", dtype=str, keep_default_na=False)
    return {i: (int(s.split()[0]) if s.strip() else None) for i, s in zip(sol["id"], sol["landmarks"])}


def _preds(comp: Path, n: int = 3, seed: int = 0) -> pd.DataFrame:
    """Top-n predictions: the true class first for landmark queries (if any), then other classes."""
    rng = np.random.default_rng(seed)
    classes = sorted(pd.read_csv(comp / "train.csv")["landmark_id"].unique())
    rows = []
    for qid, truth in _solution(comp).items():
        others = [c for c in rng.permutation(classes) if c != truth]
        cands = ([truth] if truth is not None else []) + others
        for r, c in enumerate(cands[:n]):
            rows.append((qid, int(c), 1.0 - 0.1 * r, r))
    return pd.DataFrame(rows, columns=["id", "landmark_id", "score", "rank"])


def _auc(scores, positive) -> float:
    from scipy.stats import rankdata

    r = rankdata(scores)
    p, n = positive.sum(), (~positive).sum()
    return (r[positive].sum() - p * (p + 1) / 2) / (p * n)


@pytest.fixture(scope="module")
def verified(synth_comp, tmp_path_factory):
    """One default `verify` run on the session's synthetic competition (cache reused by later tests)."""
    tmp = tmp_path_factory.mktemp("verify")
    preds = _preds(synth_comp)
    write_predictions(preds, tmp / "preds.parquet")
    cache = tmp / "cache"
    table = verify(tmp / "preds.parquet", synth_comp, tmp / "inliers.parquet", candidates=3, k=2, cache_dir=cache)
    return tmp, preds, cache, table


def test_verify_separates_same_landmark_from_others(verified, synth_comp):
    tmp, preds, _, table = verified
    assert table.equals(read_inliers(tmp / "inliers.parquet"))
    truth = _solution(synth_comp)
    n_queries = preds["id"].nunique()
    assert len(table) == n_queries * 3 * 2  # one row per (query, class, ref)
    assert list(table.columns) == ["id", "landmark_id", "ref_id", "inliers"]
    train = pd.read_csv(synth_comp / "train.csv", dtype={"id": str}).set_index("id")["landmark_id"]
    assert (train[table["ref_id"]].to_numpy() == table["landmark_id"].to_numpy()).all()  # refs are of the class
    positive = np.array([truth[q] == lid for q, lid in zip(table["id"], table["landmark_id"])])
    assert positive.sum() > 20 and (~positive).sum() > 20
    auc = _auc(table["inliers"].to_numpy(), positive)
    assert auc >= 0.95, auc
    assert not list(tmp.glob(".inliers.parquet.parts-*"))  # parts removed after a complete run


def test_rerun_is_identical_and_resumes_from_parts(verified, synth_comp):
    tmp, preds, cache, table = verified
    # simulate an interrupted run: a parts folder holding a finished chunk with a marked count
    from pipeline.verify.inliers import _parts_dir, match_config, settings_fingerprint

    out = tmp / "resume.parquet"
    parts = _parts_dir(out, settings_fingerprint(synth_comp, make_config("sift"), match_config(seed=0))[1])
    parts.mkdir()
    marked = table.iloc[:4].assign(inliers=np.int32(12345))
    marked.to_parquet(parts / "chunk-old.parquet", index=False)
    again = verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache)
    assert (again.iloc[:4]["inliers"] == 12345).all()  # done pairs were skipped, not recomputed
    pd.testing.assert_frame_equal(again.iloc[4:].reset_index(drop=True), table.iloc[4:].reset_index(drop=True))
    assert not parts.exists()
    assert again.attrs == {"computed_pairs": len(table) - 4, "reused_pairs": 4}


def _mark(path: Path, n: int) -> None:
    """Overwrite the first n counts of a verify output with 12345, keeping its metadata (a count
    that survives a re-run was reused, not recomputed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    col = t.column("inliers").to_numpy().copy()
    col[:n] = 12345
    t = t.set_column(t.schema.get_field_index("inliers"), "inliers", pa.array(col, pa.int32()))
    pq.write_table(t, path)


def test_finished_run_rerun_computes_no_pair(verified, synth_comp):
    from pipeline.verify.inliers import table_settings

    tmp, preds, cache, table = verified
    info = table_settings(tmp / "inliers.parquet")
    assert info["computed_pairs"] == len(table) and info["reused_pairs"] == 0
    assert info["settings"]["features"]["name"] == "sift" and info["settings"]["match"]["ratio"] == 0.85
    out = tmp / "rerun.parquet"
    shutil.copy(tmp / "inliers.parquet", out)
    _mark(out, 5)
    again = verify(tmp / "preds.parquet", synth_comp, out, candidates=3, k=2, cache_dir=cache)
    assert again.attrs == {"computed_pairs": 0, "reused_pairs": len(table)}
    assert (again["inliers"].iloc[:5] == 12345).all()  # reused from the table, not recomputed
    pd.testing.assert_frame_equal(again.iloc[5:].reset_index(drop=True), table.iloc[5:].reset_index(drop=True))
    assert table_settings(out)["computed_pairs"] == 0
    assert read_inliers(out)["inliers"].iloc[:5].eq(12345).all()


def test_changed_settings_recompute_every_pair(verified, synth_comp):
    tmp, preds, cache, table = verified
    out = tmp / "changed.parquet"
    for options in ({"ratio": 0.7}, {"threshold": 6.0}, {"model": "homography"}, {"max_side": 48}):
        shutil.copy(tmp / "inliers.parquet", out)
        _mark(out, 5)
        again = verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache, **options)
        assert again.attrs == {"computed_pairs": len(table), "reused_pairs": 0}, options
        assert not (again["inliers"] == 12345).any(), options
    # a table without verify's metadata (hand-made, or by merge) is never trusted
    plain = tmp / "plain.parquet"
    table.assign(inliers=np.int32(12345)).to_parquet(plain, index=False)
    again = verify(preds, synth_comp, plain, candidates=3, k=2, cache_dir=cache)
    assert again.attrs["computed_pairs"] == len(table)
    pd.testing.assert_frame_equal(again, table)
    # the same settings again after a change: the changed table is not reused for the default run
    assert verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache).attrs["computed_pairs"] == len(table)


def test_pairs_added_to_the_plan_are_the_only_ones_computed(verified, synth_comp):
    tmp, preds, cache, table = verified  # table: candidates=3, k=2
    out = tmp / "grow.parquet"
    small = verify(preds, synth_comp, out, candidates=2, k=2, cache_dir=cache)
    assert small.attrs == {"computed_pairs": len(small), "reused_pairs": 0}
    _mark(out, 3)
    grown = verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache)
    assert grown.attrs == {"computed_pairs": len(table) - len(small), "reused_pairs": len(small)}
    key = ["id", "landmark_id", "ref_id"]
    marked = small.iloc[:3][key].merge(grown, on=key)
    assert len(marked) == 3 and (marked["inliers"] == 12345).all()  # old pairs kept their (marked) counts
    unmarked = grown[grown["inliers"] != 12345].reset_index(drop=True)
    want = table.merge(unmarked[key], on=key).reset_index(drop=True)
    pd.testing.assert_frame_equal(unmarked, want)
    assert len(grown) == len(table)
    # shrinking the plan reuses everything and writes only the planned pairs
    shrunk = verify(preds, synth_comp, out, candidates=1, k=2, cache_dir=cache)
    assert shrunk.attrs["computed_pairs"] == 0 and len(read_inliers(out)) == len(shrunk) < len(small)


def test_shards_merge_to_the_full_table(verified, synth_comp):
    tmp, preds, cache, table = verified
    outs = []
    for i in range(2):
        out = tmp / f"shard{i}.parquet"
        part = verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache, shard=f"{i}/2")
        assert all(stable_shard(q, 2) == i for q in part["id"])
        outs.append(out)
    # a shard with no queries writes an empty table with the schema
    one = preds[preds["id"] == preds["id"].iloc[0]]
    empty_shard = next(f"{i}/5" for i in range(5) if i != stable_shard(one["id"].iloc[0], 5))
    assert len(verify(one, synth_comp, tmp / "empty.parquet", cache_dir=cache, shard=empty_shard)) == 0
    assert list(read_inliers(tmp / "empty.parquet").columns) == ["id", "landmark_id", "ref_id", "inliers"]
    merged = merge(outs, tmp / "merged.parquet")
    full = table.sort_values(["id", "landmark_id", "ref_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, full)


def test_missing_or_unreadable_query_gets_zero_and_a_warning(synth_comp, tmp_path):
    comp = tmp_path / "comp"
    shutil.copytree(synth_comp, comp)
    from pipeline.acquire.competition import Competition

    c = Competition(comp)
    truth = _solution(comp)
    landmark_queries = [q for q, t in truth.items() if t is not None]
    gone, broken = landmark_queries[:2]
    c.image_path(gone, "test").unlink()
    c.image_path(broken, "test").write_bytes(b"\xff\xd8 truncated")
    preds = _preds(comp)
    with pytest.warns(UserWarning) as rec:
        table = verify(preds, comp, tmp_path / "out.parquet", candidates=2, k=2)
    msgs = " ".join(str(w.message) for w in rec)
    assert gone in msgs and broken in msgs
    assert (table[table["id"].isin([gone, broken])]["inliers"] == 0).all()
    assert len(table[table["id"].isin([gone, broken])]) == 2 * 2 * 2
    assert table["inliers"].max() > 10  # the others were verified
    assert (comp / ".glr-features").is_dir()  # default cache location


@pytest.mark.slow
def test_parallel_workers_match_serial(verified, synth_comp, tmp_path):
    _, preds, _, table = verified
    par = verify(preds, synth_comp, tmp_path / "par.parquet", candidates=3, k=2, workers=2,
                 cache_dir=tmp_path / "cache2", chunk_size=10)
    pd.testing.assert_frame_equal(par, table)


def test_plan_refs_first_random_nearest():
    train = pd.DataFrame({"id": [f"t{i}" for i in range(12)], "landmark_id": [1] * 6 + [2] * 6})
    preds = pd.DataFrame({"id": ["q1", "q1", "q2"], "landmark_id": [1, 2, 1], "score": [0.9, 0.5, 0.8],
                          "rank": [0, 1, 0]})
    first = plan_pairs(preds, train, candidates=2, k=2, refs="first")
    assert first["ref_id"].tolist() == ["t0", "t1", "t6", "t7", "t0", "t1"]
    rnd = plan_pairs(preds, train, candidates=2, k=2, refs="random", seed=3)
    q1c1 = rnd[(rnd["id"] == "q1") & (rnd["landmark_id"] == 1)]["ref_id"].tolist()
    q2c1 = rnd[(rnd["id"] == "q2") & (rnd["landmark_id"] == 1)]["ref_id"].tolist()
    assert q1c1 == q2c1  # same references for every query of a class: features are reused
    assert rnd.equals(plan_pairs(preds, train, candidates=2, k=2, refs="random", seed=3))
    assert len({tuple(plan_pairs(preds, train, k=2, refs="random", seed=s)["ref_id"]) for s in range(6)}) > 1
    # nearest: q1 points at t4/t5 (class 1) and t11 (class 2); q2 at t2
    r_vec = np.eye(12, dtype=np.float32)
    q_vec = np.zeros((2, 12), np.float32)
    q_vec[0, [4, 5, 11]] = [1.0, 0.9, 1.0]
    q_vec[1, 2] = 1.0
    near = plan_pairs(preds, train, candidates=2, k=2, refs="nearest", embeddings=(["q1", "q2"], q_vec),
                      ref_embeddings=([f"t{i}" for i in range(12)], r_vec))
    got = near.groupby(["id", "landmark_id"])["ref_id"].agg(list).to_dict()
    assert got[("q1", 1)] == ["t4", "t5"] and got[("q1", 2)][0] == "t11" and got[("q2", 1)][0] == "t2"
    # a query that is itself a training image never serves as its own reference
    own = plan_pairs(preds.assign(id=["t0", "t0", "q2"]), train, candidates=1, k=2, refs="first")
    assert own[own["id"] == "t0"]["ref_id"].tolist() == ["t1", "t2"]
    with pytest.raises(Exception, match="--embeddings"):
        plan_pairs(preds, train, refs="nearest")
    # a class without training images: warned, not verified
    with pytest.warns(UserWarning, match="no training images"):
        p = plan_pairs(preds.assign(landmark_id=[1, 99, 1]), train, candidates=2, k=2)
    assert 99 not in set(p["landmark_id"])


# -- command line -------------------------------------------------------------------------------


def test_cli_verify_merge_features_match(verified, synth_comp, tmp_path):
    tmp, preds, cache, table = verified
    runner = CliRunner()
    out = tmp_path / "cli.parquet"
    r = runner.invoke(cli, ["verify", str(tmp / "preds.parquet"), "--data-dir", str(synth_comp), "--out", str(out),
                            "--candidates", "3", "--k", "2", "--cache-dir", str(cache), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["pairs"] == len(table)
    pd.testing.assert_frame_equal(read_inliers(out), table)
    r = runner.invoke(cli, ["merge", str(out), str(out), "--out", str(tmp_path / "m.parquet")])
    assert r.exit_code == 0, r.output
    assert len(read_inliers(tmp_path / "m.parquet")) == len(table)
    r = runner.invoke(cli, ["features", str(synth_comp), "--split", "train", "--cache-dir", str(cache), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["images"] == len(pd.read_csv(synth_comp / "train.csv"))
    a = save(tmp_path / "a.png", textured(128, 4))
    b = save(tmp_path / "b.png", np.ascontiguousarray(textured(128, 4)[:, ::-1][:, ::-1]))
    r = runner.invoke(cli, ["match", str(a), str(b), "--plot", str(tmp_path / "m.png"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["inliers"] >= 20 and (tmp_path / "m.png").stat().st_size > 1000
    r = runner.invoke(cli, ["match", str(a), str(tmp_path / "nope.jpg")])
    assert r.exit_code != 0 and "nope.jpg" in str(r.exception or r.output)
    r = runner.invoke(cli, ["verify", str(tmp / "preds.parquet"), "--data-dir", str(synth_comp), "--out",
                            str(out), "--shard", "2/2"])
    assert r.exit_code != 0


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_to_the_same_table(synth_comp, tmp_path):
    import os
    import signal
    import time

    preds = _preds(synth_comp, n=6)
    write_predictions(preds, tmp_path / "preds.parquet")
    glr = str(Path(sys.executable).with_name("glr"))
    args = [glr, "verify", str(tmp_path / "preds.parquet"), "--data-dir", str(synth_comp), "--candidates", "6",
            "--k", "5", "--cache-dir", str(tmp_path / "cache"), "-q"]
    clean = verify(preds, synth_comp, tmp_path / "clean.parquet", candidates=6, k=5, cache_dir=tmp_path / "cache")
    out = tmp_path / "killed.parquet"
    proc = subprocess.Popen(args + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if len(list(tmp_path.glob(".killed.parquet.parts-*/chunk-*.parquet"))) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()  # really interrupted mid-run
    done_before = len(list(tmp_path.glob(".killed.parquet.parts-*/chunk-*.parquet")))
    assert done_before >= 2
    subprocess.run(args + ["--out", str(out)], check=True, capture_output=True)
    pd.testing.assert_frame_equal(read_inliers(out), clean)


def test_refs_nearest_reads_embedding_files(verified, synth_comp, tmp_path):
    from pipeline.model.embeddings import write_embeddings

    _, preds, cache, _ = verified
    train = pd.read_csv(synth_comp / "train.csv", dtype={"id": str})
    rng = np.random.default_rng(0)
    r_vec = rng.normal(size=(len(train), 16)).astype(np.float32)
    q_ids = sorted(preds["id"].unique())
    q_vec = rng.normal(size=(len(q_ids), 16)).astype(np.float32)
    write_embeddings(tmp_path / "q.npy", q_ids, q_vec)
    write_embeddings(tmp_path / "r.npy", train["id"].tolist(), r_vec)
    table = verify(preds, synth_comp, tmp_path / "near.parquet", candidates=1, k=2, refs="nearest",
                   embeddings=tmp_path / "q.npy", ref_embeddings=tmp_path / "r.npy", cache_dir=cache)
    r_unit = r_vec / np.linalg.norm(r_vec, axis=1, keepdims=True)
    for qid, grp in table.groupby("id"):
        lid = grp["landmark_id"].iloc[0]
        members = train.index[train["landmark_id"] == lid]
        sims = r_unit[members] @ q_vec[q_ids.index(qid)]
        want = train["id"].to_numpy()[members[np.argsort(-sims)[:2]]]
        assert grp["ref_id"].tolist() == want.tolist()
