"""report.html: its figures from real tables, and what a browser (headless Chromium) shows."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from pipeline.run.localval import make_local_validation
from pipeline.run.report import gap_curve, render, top1_with_truth, write_report
from pipeline.acquire.synth import make_competition
from submissions.format import read_solution, submission_from_predictions
from submissions.metric import gap
from submissions.tables import write_inliers, write_predictions


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browser(*args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium here: install Debian's `chromium` (make test does it when run as root with apt-get)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def fake_predictions(solution: pd.DataFrame, classes: np.ndarray, seed: int, noise: float) -> pd.DataFrame:
    """Top-3 predictions: the truth at rank 0 for most landmark queries, confident mistakes otherwise."""
    rng = np.random.default_rng(seed)
    rows = []
    for qid, truth in zip(solution["id"], solution["landmarks"]):
        cands = list(rng.choice(classes, size=3, replace=False))
        if truth and rng.random() > noise:
            t = int(truth[0])
            cands = [t] + [c for c in cands if c != t][:2]
        scores = np.sort(rng.random(3))[::-1]
        rows += [(qid, int(c), float(s), r) for r, (c, s) in enumerate(zip(cands, scores))]
    return pd.DataFrame(rows, columns=["id", "landmark_id", "score", "rank"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with the artefacts the report reads, made with the real writers on synthetic data."""
    root = tmp_path_factory.mktemp("report")
    make_competition(root / "comp", landmarks=6, per_landmark=8, test=20, size=64, seed=1)
    run = root / "run"
    make_local_validation(root / "comp", run / "localval", holdout_frac=0.25, unseen_class_frac=0.17, seed=0)
    sol = read_solution(run / "localval" / "solution.csv")
    train = pd.read_csv(run / "localval" / "train.csv", dtype={"id": str})
    classes = train["landmark_id"].unique()
    preds = fake_predictions(sol, classes, 0, noise=0.4)
    write_predictions(preds, run / "ens.val.parquet")
    rng = np.random.default_rng(0)
    truth = dict(zip(sol["id"], sol["landmarks"]))
    refs = train.groupby("landmark_id")["id"].first()
    inl = preds.assign(ref_id=preds["landmark_id"].map(refs))
    right = np.array([lid in truth[q] for q, lid in zip(inl["id"], inl["landmark_id"])])
    inl["inliers"] = np.where(right, rng.integers(15, 40, len(inl)), rng.integers(0, 8, len(inl)))
    write_inliers(inl[["id", "landmark_id", "ref_id", "inliers"]], run / "inliers.val.parquet")
    resc = preds.copy()
    resc["score"] = np.where(right, resc["score"], resc["score"] * 0.1).astype("float32")
    write_predictions(resc, run / "rescored.val.parquet")
    return run


def test_gap_curve_ends_at_the_metrics_gap(run_dir):
    from submissions.tables import read_predictions

    preds = read_predictions(run_dir / "ens.val.parquet")
    sol_path = run_dir / "localval" / "solution.csv"
    x, y = gap_curve(top1_with_truth(preds, sol_path))
    assert np.all(np.diff(x) <= 0) and np.all(np.diff(y) >= -1e-12)
    expected = gap(submission_from_predictions(preds), read_solution(sol_path))
    assert y[-1] == pytest.approx(expected, abs=1e-9)


def test_render_without_artefacts_notes_what_is_missing(tmp_path):
    text = render(tmp_path, {"data": {"data_dir": str(tmp_path)}, "run": {"name": "empty"}}, {"stages": {}})
    assert "no verified validation queries yet" in text and "tuning has not run yet" in text


@pytest.mark.slow
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    cfg = {"run": {"name": "t"}, "data": {"data_dir": str(run_dir / "localval")}, "verify": {"extractor": "sift"},
           "report": {"examples": 3}}
    manifest = {"plan": ["data", "localval", "tune"], "stages": {
        "data": {"status": "done", "seconds": 0.5, "metrics": {}},
        "ensemble": {"status": "done", "seconds": 1.0, "metrics": {"val": {"gap": 0.5}}},
        "rescore": {"status": "done", "seconds": 1.0, "metrics": {"val": {"gap": 0.7}}},
        "tune": {"status": "done", "seconds": 2.0,
                 "metrics": {"tune": {"before": 0.5, "after": 0.72}, "holdout": {"before": 0.48, "after": 0.66}}}}}
    import json

    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    path = write_report(run_dir, cfg)
    text = path.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch
    dom = browser("--dump-dom", path.as_uri()).stdout
    for sid in ("summary", "training", "gap-confidence", "inliers", "optuna", "examples", "manifest"):
        assert f'id="{sid}"' in dom, sid
    assert "GAP vs. confidence" in dom and "correct top-1" in dom and "held-out part" in dom
    assert 'data-images-broken="0"' in dom, "an embedded image does not decode"
    n_ok = int(dom.split('data-images-ok="')[1].split('"')[0])
    assert n_ok >= 1 + 1 + 3  # GAP curve, inlier histogram, three examples
    shot = tmp_path / "report.png"
    browser(f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri())
    assert shot.exists() and shot.stat().st_size > 10_000
    if os.environ.get("GLR_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["GLR_KEEP_SCREENSHOT"])
