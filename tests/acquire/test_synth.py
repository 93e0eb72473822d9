"""`glr synth`: Kaggle's 2021 layout, determinism, and realism that later stages rely on.

Realism is measured, not assumed: SIFT + RANSAC must separate same-landmark pairs from
different-landmark and distractor pairs, and a tiny pixel classifier must learn the
classes yet confuse the confusable groups.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.acquire.competition import Competition
from pipeline.images import load_rgb
from pipeline.acquire.synth import make_competition
from submissions.errors import UserError


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_plain_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# -- layout and contract ---------------------------------------------------------------------
def test_opens_with_competition_and_counts_match(synth_comp):
    comp = Competition(synth_comp)
    summary = comp.summary()
    assert summary["train_images"] == 6 * 8 and summary["classes"] == 6
    assert summary["test_images"] == 30 and summary["has_solution"]
    comp.check_images("train")
    comp.check_images("test")
    train = comp.train
    assert train["landmark_id"].value_counts().tolist() == [8] * 6
    # Kaggle-style ids: 16 lowercase hex characters, unique across train and test
    all_ids = train["id"].tolist() + comp.test_ids
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in all_ids)
    assert len(set(all_ids)) == len(all_ids)
    # landmark ids are not 0..n-1
    assert sorted(train["landmark_id"].unique().tolist()) != list(range(6))
    assert train["landmark_id"].max() > 100
    # hashed layout, 64 px RGB JPEGs
    some = train["id"].iloc[0]
    assert comp.image_path(some) == synth_comp / "train" / some[0] / some[1] / some[2] / f"{some}.jpg"
    assert load_rgb(comp.image_path(some)).shape == (64, 64, 3)
    assert load_rgb(comp.image_path(comp.test_ids[0], "test")).shape == (64, 64, 3)
    assert len(list((synth_comp / "test").rglob("*.jpg"))) == 30
    assert len(list((synth_comp / "train").rglob("*.jpg"))) == 48


def test_sample_submission_and_solution_match_kaggle_format(synth_comp):
    comp = Competition(synth_comp)
    text = (synth_comp / "sample_submission.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == "id,landmarks"
    assert all(re.fullmatch(r"[0-9a-f]{16},", line) for line in lines[1:])
    sample = read_plain_csv(synth_comp / "sample_submission.csv")
    solution = read_plain_csv(synth_comp / "solution.csv")
    assert list(solution.columns) == ["id", "landmarks", "Usage"]
    assert sample["id"].tolist() == comp.test_ids == solution["id"].tolist()
    train_lids = set(comp.train["landmark_id"].astype(str))
    distractors = solution["landmarks"] == ""
    assert distractors.sum() == 9  # round(30 * 0.3)
    assert set(solution.loc[~distractors, "landmarks"]) <= train_lids
    assert set(solution["Usage"]) == {"Public", "Private"}
    assert (solution["Usage"] == "Public").sum() == 15
    meta = json.loads((synth_comp / "synth.json").read_text())
    assert meta["distractors"] == 9 and meta["landmark_queries"] == 21
    assert all(len(g) in (2, 3) for g in meta["confusable_groups"])


def test_gap_is_zero_for_sample_and_one_for_perfect(synth_comp, tmp_path):
    runner = CliRunner()
    sample = synth_comp / "sample_submission.csv"
    result = runner.invoke(cli, ["gap", str(sample), str(synth_comp / "solution.csv"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["gap"] == 0.0
    solution = read_plain_csv(synth_comp / "solution.csv")
    perfect = solution.assign(landmarks=[f"{l} 0.9" if l else "" for l in solution["landmarks"]])
    perfect[["id", "landmarks"]].to_csv(tmp_path / "perfect.csv", index=False)
    result = runner.invoke(cli, ["gap", str(tmp_path / "perfect.csv"), str(synth_comp / "solution.csv"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["gap"] == 1.0 and report["n_landmark_queries"] == 21


def test_queries_are_new_views_not_copies(synth_comp):
    digests = tree_digest(synth_comp)
    train = {d for p, d in digests.items() if p.startswith("train/")}
    test = {d for p, d in digests.items() if p.startswith("test/")}
    assert len(train) == 48 and len(test) == 30 and not train & test


# -- determinism, atomic writes, options ------------------------------------------------------
TINY = dict(landmarks=3, per_landmark=2, test=5, size=32)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = make_competition(tmp_path / "a", seed=3, **TINY)
    make_competition(tmp_path / "b", seed=3, **TINY)
    make_competition(tmp_path / "c", seed=4, **TINY)
    da, db, dc = (tree_digest(tmp_path / n) for n in "abc")
    assert da == db
    assert len(da) == 3 * 2 + 5 + 4  # images + train.csv, sample_submission.csv, solution.csv, synth.json
    assert set(da.values()).isdisjoint(v for k, v in dc.items() if k.endswith(".jpg"))
    assert a["train_images"] == 6 and a["test_images"] == 5 and a["path"] == str(tmp_path / "a")


def test_refuses_non_empty_out_and_overwrites_atomically(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    make_competition(out, **TINY)  # an empty directory is fine
    before = tree_digest(out)
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        make_competition(out, seed=1, **TINY)
    assert tree_digest(out) == before
    (out / "mine.txt").write_text("x")
    make_competition(out, seed=1, overwrite=True, **TINY)
    after = tree_digest(out)
    assert "mine.txt" not in after and after != before
    # no temporary folders left beside OUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        make_competition(tmp_path / "file", **TINY)


@pytest.mark.parametrize("option, value, message", [
    ("size", 16, "--size 16"),
    ("distractor_frac", 1.5, "--distractor-frac 1.5"),
    ("landmarks", 0, "--landmarks 0"),
    ("per_landmark", 0, "--per-landmark 0"),
    ("test", -1, "--test -1"),
])
def test_bad_options_name_the_option(tmp_path, option, value, message):
    with pytest.raises(UserError, match=re.escape(message)):
        make_competition(tmp_path / "x", **{**TINY, option: value})
    assert not (tmp_path / "x").exists()


def test_edge_sizes(tmp_path):
    only_distractors = make_competition(tmp_path / "d", distractor_frac=1.0, **TINY)
    assert only_distractors["distractors"] == 5
    assert set(read_plain_csv(tmp_path / "d" / "solution.csv")["landmarks"]) == {""}
    no_test = make_competition(tmp_path / "n", landmarks=1, per_landmark=1, test=0, size=32)
    comp = Competition(tmp_path / "n")
    assert no_test["test_images"] == 0 and comp.test_ids == [] and len(comp.train) == 1


def test_cli_json_help_and_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "s"
    args = ["synth", str(out), "--landmarks", "2", "--per-landmark", "2", "--test", "4", "--size", "32", "--seed", "5"]
    result = runner.invoke(cli, args + ["--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["train_images"] == 4 and summary["test_images"] == 4 and summary["seed"] == 5
    assert Competition(out).summary()["train_images"] == 4
    result = runner.invoke(cli, args)
    assert isinstance(result.exception, UserError) and "--overwrite" in str(result.exception)
    result = runner.invoke(cli, args + ["--overwrite", "--quiet"])
    assert result.exit_code == 0 and "2 landmarks" in result.output
    result = runner.invoke(cli, ["synth", str(tmp_path / "t"), "--size", "8"])
    assert result.exit_code == 2 and "--size" in result.output
    help_text = runner.invoke(cli, ["synth", "--help"]).output
    assert "Example:" in help_text and "--distractor-frac" in help_text


# -- realism: local features ------------------------------------------------------------------
_SIFT = None


def sift_features(path: Path):
    global _SIFT
    _SIFT = _SIFT or cv2.SIFT_create()
    gray = cv2.cvtColor(load_rgb(path), cv2.COLOR_RGB2GRAY)
    return _SIFT.detectAndCompute(gray, None)


def ransac_inliers(a, b) -> int:
    """Inliers of a RANSAC homography on ratio-test (0.8) SIFT matches; 0 when under 4 matches."""
    (ka, da), (kb, db) = a, b
    if da is None or db is None or len(ka) < 2 or len(kb) < 2:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(da, db, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
    if len(good) < 4:
        return 0
    src = np.float32([ka[m.queryIdx].pt for m in good])
    dst = np.float32([kb[m.trainIdx].pt for m in good])
    _, mask = cv2.findHomography(src, dst, cv2.RANSAC, 4.0)
    return 0 if mask is None else int(mask.sum())


def roc_auc(pos, neg) -> float:
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def pair_inliers(root: Path, seed: int = 0) -> dict[str, list[int]]:
    """Inliers for same-landmark, different-landmark, confusable-group and distractor pairs."""
    comp = Competition(root)
    meta = json.loads((root / "synth.json").read_text())
    rng = np.random.default_rng(seed)
    by_class = comp.train.groupby("landmark_id")["id"].apply(list).to_dict()
    lids = sorted(by_class)
    cache: dict = {}

    def feats(i, split="train"):
        if (i, split) not in cache:
            cache[i, split] = sift_features(comp.image_path(i, split))
        return cache[i, split]

    def pick(lid):
        return by_class[lid][int(rng.integers(len(by_class[lid])))]

    out = {"same": [], "query": [], "different": [], "confusable": [], "distractor": []}
    for k in range(3 * len(lids)):
        lid = lids[k % len(lids)]
        a, b = rng.choice(by_class[lid], 2, replace=False)
        out["same"].append(ransac_inliers(feats(a), feats(b)))
        other = lids[(lids.index(lid) + 1 + int(rng.integers(len(lids) - 1))) % len(lids)]
        out["different"].append(ransac_inliers(feats(a), feats(pick(other))))
    for group in meta["confusable_groups"]:
        for l1, l2 in itertools.combinations(group, 2):
            for _ in range(3):
                out["confusable"].append(ransac_inliers(feats(pick(l1)), feats(pick(l2))))
    solution = read_plain_csv(root / "solution.csv")
    for row in solution.head(40).itertuples():
        ref = pick(int(row.landmarks)) if row.landmarks else pick(lids[int(rng.integers(len(lids)))])
        out["query" if row.landmarks else "distractor"].append(ransac_inliers(feats(row.id, "test"), feats(ref)))
    return out


@pytest.fixture(scope="module")
def comp64(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth64") / "c"
    make_competition(root, seed=0, landmarks=12, per_landmark=10, test=120, size=64)
    return root


@pytest.mark.parametrize("size", [96, 64])
def test_sift_ransac_separates_same_from_different_landmarks(size, tmp_path, comp64):
    if size == 64:
        root = comp64
    else:
        root = tmp_path / "c"
        make_competition(root, seed=0, landmarks=8, per_landmark=5, test=40, size=96)
    r = pair_inliers(root)
    negatives = r["different"] + r["confusable"] + r["distractor"]
    same = r["same"] + r["query"]
    summary = {k: float(np.median(v)) for k, v in r.items()}
    assert len(same) >= 40 and len(negatives) >= 40 and r["confusable"] and r["distractor"]
    assert np.median(same) >= 3 * max(np.median(negatives), 2), summary
    assert np.median(same) >= (25 if size == 96 else 12), summary
    assert np.median(r["query"]) >= 3 * max(np.median(r["distractor"]), 2), summary
    assert roc_auc(same, negatives) >= 0.95, summary
    # local features tell confusable landmarks apart
    assert roc_auc(same, r["confusable"]) >= 0.9, summary


# -- realism: learnable, yet confusable ---------------------------------------------------------
def thumbnails(paths) -> np.ndarray:
    return np.stack([cv2.resize(load_rgb(p), (8, 8), interpolation=cv2.INTER_AREA).ravel() for p in paths]) / 255.0


def test_classes_are_learnable_but_groups_confusable(comp64):
    comp = Competition(comp64)
    meta = json.loads((comp64 / "synth.json").read_text())
    group_of = {lid: gi for gi, g in enumerate(meta["confusable_groups"]) for lid in g}
    x = thumbnails(comp.image_paths(comp.train["id"].tolist()))
    y = comp.train["landmark_id"].to_numpy()
    solution = read_plain_csv(comp64 / "solution.csv")
    queries = solution[solution["landmarks"] != ""]
    q = thumbnails(comp.image_paths(queries["id"].tolist(), "test"))
    truth = queries["landmarks"].astype(int).to_numpy()
    dist = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    pred = y[dist.argmin(1)]  # 1-nearest neighbour on 8×8 colour thumbnails
    correct = pred == truth
    grouped = np.array([t in group_of for t in truth])
    same_group = np.array([group_of.get(p, -1 - p) == group_of.get(t, -1 - t) for p, t in zip(pred, truth)])
    chance = 1 / len(np.unique(y))
    assert correct.mean() >= 3 * chance  # learnable
    assert grouped.any() and (~grouped).any()
    # …but confusable: telling the group is much easier than telling the landmark, and the
    # mistakes on grouped landmarks mostly stay inside their group (chance: about 1 in 7)
    assert same_group.mean() >= correct.mean() + 0.1
    errors = grouped & ~correct
    assert errors.sum() >= 5 and (same_group[errors]).mean() >= 0.5
    # distractors: some look as close to a landmark as a real query does (confident mistakes)
    dq = dist.min(1)
    d = thumbnails(comp.image_paths(solution.loc[solution["landmarks"] == "", "id"].tolist(), "test"))
    dd = ((d[:, None, :] - x[None, :, :]) ** 2).sum(-1).min(1)
    assert (dd < np.median(dq)).mean() >= 0.1


def test_default_run_is_fast(tmp_path):
    """The default `glr synth out/` (800 images at 96 px) must take seconds, not minutes."""
    import time

    t = time.perf_counter()
    summary = make_competition(tmp_path / "out")
    elapsed = time.perf_counter() - t
    assert summary["train_images"] == 600 and summary["test_images"] == 200
    assert elapsed < 20, elapsed
