"""`glr rescore` and `glr write-submission`: the written files, and that tune's GAP is the GAP of
the submission written from the rescored table."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from submissions.errors import UserError
from submissions.format import check_submission, read_solution, read_submission
from submissions.metric import evaluate
from submissions.tables import read_predictions
from tests.tuning.test_tune import write_tables
from tuning.search import tune
from tuning.split import split_parts


def sample_submission(path, ids):
    pd.DataFrame({"id": ids, "landmarks": ""}).to_csv(path, index=False)
    return path


def test_rescore_then_write_submission_scores_what_tune_reported(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=500)
    tune(preds, inliers, solution, tmp_path / "policy.json", trials=15, holdout=0.0, bootstrap=20, plots=False)
    r = CliRunner().invoke(cli, ["rescore", str(preds), str(inliers), "--policy", str(tmp_path / "policy.json"),
                                 "--out", str(tmp_path / "rescored.parquet")])
    assert r.exit_code == 0, r.output
    rescored = read_predictions(tmp_path / "rescored.parquet")
    original = read_predictions(preds)
    assert len(rescored) == len(original)
    assert rescored.groupby("id")["rank"].apply(lambda s: sorted(s) == list(range(len(s)))).all()
    # same candidate set per query, in any order
    key = ["id", "landmark_id"]
    assert rescored[key].sort_values(key).reset_index(drop=True).equals(original[key].sort_values(key).reset_index(drop=True))

    sol = pd.read_csv(solution, dtype=str, keep_default_na=False)
    ids = list(sol["id"]) + ["never_predicted"]
    sample = sample_submission(tmp_path / "sample_submission.csv", ids)
    r = CliRunner().invoke(cli, ["write-submission", str(tmp_path / "rescored.parquet"), "--data-dir", str(tmp_path),
                                 "--out", str(tmp_path / "submission.csv")])
    assert r.exit_code == 0, r.output
    assert "501 rows, 500 with a prediction" in r.output
    check_submission(tmp_path / "submission.csv", sample)
    written = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    assert list(written["id"]) == ids and written["landmarks"].iloc[-1] == ""
    got = evaluate(read_submission(tmp_path / "submission.csv"), read_solution(solution))["gap"]
    part, _ = split_parts(preds, inliers, solution, holdout=0.0)
    assert got == pytest.approx(part.gap(json.loads((tmp_path / "policy.json").read_text())), abs=1e-12)


def test_rescore_presets_and_bad_policy(tmp_path):
    preds, inliers, _ = write_tables(tmp_path, n=50)
    r = CliRunner().invoke(cli, ["rescore", str(preds), str(inliers), "--policy", "seed-rules", "--out",
                                 str(tmp_path / "r.parquet"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["queries"] == 50
    (tmp_path / "v9.json").write_text(json.dumps({"format": "glr-policy", "version": 9, "kind": "identity"}))
    r = CliRunner().invoke(cli, ["rescore", str(preds), str(inliers), "--policy", str(tmp_path / "v9.json"), "--out",
                                 str(tmp_path / "x.parquet")])
    assert isinstance(r.exception, UserError) and "policy version 9" in str(r.exception)
    assert not (tmp_path / "x.parquet").exists()


def test_write_submission_takes_the_sample_path_and_refuses_foreign_predictions(tmp_path):
    preds, _, _ = write_tables(tmp_path, n=20)
    ids = list(dict.fromkeys(pd.read_parquet(preds)["id"]))
    sample = sample_submission(tmp_path / "s.csv", ids[:10])  # half the predicted ids are not test ids
    r = CliRunner().invoke(cli, ["write-submission", str(preds), "--data-dir", str(sample), "--out",
                                 str(tmp_path / "sub.csv")])
    assert r.exit_code == 0, r.output
    assert "10 prediction ids not in sample_submission.csv dropped" in r.output
    assert list(pd.read_csv(tmp_path / "sub.csv", dtype=str)["id"]) == ids[:10]
    sample_submission(tmp_path / "other.csv", ["a", "b"])
    r = CliRunner().invoke(cli, ["write-submission", str(preds), "--data-dir", str(tmp_path / "other.csv"), "--out",
                                 str(tmp_path / "sub2.csv")])
    assert isinstance(r.exception, UserError) and "none of its 20 ids" in str(r.exception)
    empty_dir = tmp_path / "comp"
    empty_dir.mkdir()
    r = CliRunner().invoke(cli, ["write-submission", str(preds), "--data-dir", str(empty_dir), "--out",
                                 str(tmp_path / "sub3.csv")])
    assert isinstance(r.exception, UserError) and "sample_submission.csv: no such file" in str(r.exception)
