"""The verify run (`verify`/`merge`: plan, resume, reuse, shards) and the `features`/`verify`/`merge`/`match`
commands, on synthetic data."""
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
from pipeline.parallel import stable_shard
from pipeline.verify.features import make_config
from pipeline.verify.inliers import merge, verify
from submissions.tables import read_inliers, write_predictions
from tests.verify.test_features import save, textured


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
    table = verify(tmp / "preds.parquet", synth_comp, tmp / "inliers.parquet", candidates=3, k=2, cache_dir=cache).table
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
    from pipeline.acquire.competition import Competition
    from pipeline.verify.inliers import _parts_dir, images_digest, settings_fingerprint
    from pipeline.verify.matching import match_config

    out = tmp / "resume.parquet"
    fingerprint = settings_fingerprint(synth_comp, make_config("sift"), match_config(seed=0))[1]
    parts = _parts_dir(out, fingerprint, images_digest(Competition(synth_comp), table))
    parts.mkdir()
    marked = table.iloc[:4].assign(inliers=np.int32(12345))
    marked.to_parquet(parts / "chunk-old.parquet", index=False)
    res = verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache)
    again = res.table
    assert (again.iloc[:4]["inliers"] == 12345).all()  # done pairs were skipped, not recomputed
    pd.testing.assert_frame_equal(again.iloc[4:].reset_index(drop=True), table.iloc[4:].reset_index(drop=True))
    assert not parts.exists()
    assert (res.computed_pairs, res.reused_pairs) == (len(table) - 4, 4)
    assert not again.attrs  # statistics travel in the result, not on the frame


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
    res = verify(tmp / "preds.parquet", synth_comp, out, candidates=3, k=2, cache_dir=cache)
    again = res.table
    assert (res.computed_pairs, res.reused_pairs) == (0, len(table))
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
        res = verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache, **options)
        again = res.table
        assert (res.computed_pairs, res.reused_pairs) == (len(table), 0), options
        assert not (again["inliers"] == 12345).any(), options
    # a table without verify's metadata (hand-made, or by merge) is never trusted
    plain = tmp / "plain.parquet"
    table.assign(inliers=np.int32(12345)).to_parquet(plain, index=False)
    res = verify(preds, synth_comp, plain, candidates=3, k=2, cache_dir=cache)
    assert res.computed_pairs == len(table)
    pd.testing.assert_frame_equal(res.table, table)
    # the same settings again after a change: the changed table is not reused for the default run
    assert verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache).computed_pairs == len(table)


def test_pairs_added_to_the_plan_are_the_only_ones_computed(verified, synth_comp):
    tmp, preds, cache, table = verified  # table: candidates=3, k=2
    out = tmp / "grow.parquet"
    res = verify(preds, synth_comp, out, candidates=2, k=2, cache_dir=cache)
    small = res.table
    assert (res.computed_pairs, res.reused_pairs) == (len(small), 0)
    _mark(out, 3)
    res = verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache)
    grown = res.table
    assert (res.computed_pairs, res.reused_pairs) == (len(table) - len(small), len(small))
    key = ["id", "landmark_id", "ref_id"]
    marked = small.iloc[:3][key].merge(grown, on=key)
    assert len(marked) == 3 and (marked["inliers"] == 12345).all()  # old pairs kept their (marked) counts
    unmarked = grown[grown["inliers"] != 12345].reset_index(drop=True)
    want = table.merge(unmarked[key], on=key).reset_index(drop=True)
    pd.testing.assert_frame_equal(unmarked, want)
    assert len(grown) == len(table)
    # shrinking the plan reuses everything and writes only the planned pairs
    res = verify(preds, synth_comp, out, candidates=1, k=2, cache_dir=cache)
    assert res.computed_pairs == 0 and len(read_inliers(out)) == len(res.table) < len(small)


def test_shards_merge_to_the_full_table(verified, synth_comp):
    tmp, preds, cache, table = verified
    outs = []
    for i in range(2):
        out = tmp / f"shard{i}.parquet"
        part = verify(preds, synth_comp, out, candidates=3, k=2, cache_dir=cache, shard=f"{i}/2").table
        assert all(stable_shard(q, 2) == i for q in part["id"])
        outs.append(out)
    # a shard with no queries writes an empty table with the schema
    one = preds[preds["id"] == preds["id"].iloc[0]]
    empty_shard = next(f"{i}/5" for i in range(5) if i != stable_shard(one["id"].iloc[0], 5))
    assert len(verify(one, synth_comp, tmp / "empty.parquet", cache_dir=cache, shard=empty_shard).table) == 0
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
        table = verify(preds, comp, tmp_path / "out.parquet", candidates=2, k=2).table
    msgs = " ".join(str(w.message) for w in rec)
    assert gone in msgs and broken in msgs
    assert (table[table["id"].isin([gone, broken])]["inliers"] == 0).all()
    assert len(table[table["id"].isin([gone, broken])]) == 2 * 2 * 2
    assert table["inliers"].max() > 10  # the others were verified
    assert (comp / ".glr-cache" / "features").is_dir()  # default cache location: DATA_DIR/.glr-cache


@pytest.mark.slow
def test_parallel_workers_match_serial(verified, synth_comp, tmp_path):
    _, preds, _, table = verified
    par = verify(preds, synth_comp, tmp_path / "par.parquet", candidates=3, k=2, workers=2,
                 cache_dir=tmp_path / "cache2", chunk_size=10).table
    pd.testing.assert_frame_equal(par, table)


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
    clean = verify(preds, synth_comp, tmp_path / "clean.parquet", candidates=6, k=5, cache_dir=tmp_path / "cache").table
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
                   embeddings=tmp_path / "q.npy", ref_embeddings=tmp_path / "r.npy", cache_dir=cache).table
    r_unit = r_vec / np.linalg.norm(r_vec, axis=1, keepdims=True)
    for qid, grp in table.groupby("id"):
        lid = grp["landmark_id"].iloc[0]
        members = train.index[train["landmark_id"] == lid]
        sims = r_unit[members] @ q_vec[q_ids.index(qid)]
        want = train["id"].to_numpy()[members[np.argsort(-sims)[:2]]]
        assert grp["ref_id"].tolist() == want.tolist()


def test_the_one_inliers_writer_keeps_metadata_and_the_empty_frame_has_the_schema(tmp_path):
    """submissions.tables.write_inliers validates, writes atomically and stores key-value metadata (verify's
    settings record); empty_inliers is the frame a run without pairs reads back."""
    from pipeline.verify.inliers import META_KEY, table_settings
    from submissions.tables import INLIERS, empty_inliers, write_inliers

    empty = empty_inliers()
    assert list(empty.columns) == list(INLIERS) and len(empty) == 0
    write_inliers(empty, tmp_path / "e.parquet", {META_KEY: json.dumps({"fingerprint": "x"})})
    back = read_inliers(tmp_path / "e.parquet")
    pd.testing.assert_frame_equal(back, empty)
    assert table_settings(tmp_path / "e.parquet") == {"fingerprint": "x"}
    rows = pd.DataFrame({"id": ["q"], "landmark_id": [3], "ref_id": ["r"], "inliers": [7]})
    write_inliers(rows, tmp_path / "r.parquet")
    assert table_settings(tmp_path / "r.parquet") is None  # no record: never reused by verify
    with pytest.raises(Exception, match="negative|inliers.* -1"):
        write_inliers(rows.assign(inliers=-1), tmp_path / "bad.parquet")


def test_an_image_fixed_or_replaced_in_place_is_recounted(synth_comp, tmp_path):
    """Counts are reused only from the same image files: fixing a broken query or replacing a
    reference in place recounts (issue 15: never reuse a stale result)."""
    from PIL import Image

    from pipeline.acquire.competition import Competition

    comp = tmp_path / "comp"
    shutil.copytree(synth_comp, comp)
    c = Competition(comp)
    query = next(q for q, t in _solution(comp).items() if t is not None)
    good = c.image_path(query, "test").read_bytes()
    c.image_path(query, "test").write_bytes(b"\xff\xd8 truncated")
    preds, out = _preds(comp), tmp_path / "out.parquet"
    with pytest.warns(UserWarning, match=query):
        first = verify(preds, comp, out, candidates=2, k=2)
    assert first.table.loc[first.table["id"] == query, "inliers"].eq(0).all()
    assert verify(preds, comp, out, candidates=2, k=2).computed_pairs == 0  # nothing changed: all reused

    c.image_path(query, "test").write_bytes(good)  # fixed in place
    fixed = verify(preds, comp, out, candidates=2, k=2)
    assert fixed.computed_pairs == len(fixed.table) and fixed.reused_pairs == 0
    assert fixed.table.loc[fixed.table["id"] == query, "inliers"].max() > 10

    ref = fixed.table["ref_id"].iloc[0]
    path = c.image_path(ref, "train")
    Image.open(path).transpose(Image.Transpose.ROTATE_90).save(path)  # replaced in place: same name
    assert verify(preds, comp, out, candidates=2, k=2).computed_pairs == len(fixed.table)
