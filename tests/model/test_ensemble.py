"""Ensemble of predictions tables and `glr evaluate` (pure pandas: fast, no TensorFlow)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.model.ensemble import ensemble, ensemble_tables
from pipeline.options import ENSEMBLE, parse_list
from submissions.errors import UserError
from submissions.metric import evaluate_predictions
from submissions.tables import read_predictions, write_predictions


def table(rows):
    """rows: [(id, landmark_id, score)], ranks assigned by score within each id."""
    df = pd.DataFrame(rows, columns=["id", "landmark_id", "score"])
    df = df.sort_values(["id", "score"], ascending=[True, False], kind="stable")
    df["rank"] = df.groupby("id").cumcount()
    return df.reset_index(drop=True)


def scores(df, image_id):
    sub = df[df["id"] == image_id]
    return dict(zip(sub["landmark_id"].tolist(), np.round(sub["score"].astype(float), 6).tolist()))


def test_weighted_average_counts_absent_classes_as_zero():
    a = table([("q1", 1, 0.6), ("q1", 2, 0.3), ("q2", 5, 0.9)])
    b = table([("q1", 2, 0.5), ("q1", 3, 0.4), ("q2", 5, 0.2), ("q2", 6, 0.7)])
    out = ensemble_tables([a, b], weights=[3, 1], top_k=5)
    # q1: class 1 only in a: 3*0.6/4; class 2: (3*0.3 + 0.5)/4; class 3 only in b: 0.4/4
    assert scores(out, "q1") == pytest.approx({1: 0.45, 2: 0.35, 3: 0.1}, abs=1e-6)
    assert scores(out, "q2") == pytest.approx({5: (2.7 + 0.2) / 4, 6: 0.7 / 4}, abs=1e-6)
    top = out[out["rank"] == 0].set_index("id")["landmark_id"].to_dict()
    assert top == {"q1": 1, "q2": 5}
    # ranks are 0..n-1 in decreasing score, table schema holds
    for _, g in out.groupby("id"):
        assert g["rank"].tolist() == list(range(len(g)))
        assert (np.diff(g["score"].to_numpy()) <= 0).all()
    assert str(out["rank"].dtype) == "int16" and str(out["score"].dtype) == "float32"


def test_equal_weights_and_top_k_cut():
    a = table([("q", c, s) for c, s in [(1, 0.4), (2, 0.3), (3, 0.2)]])
    b = table([("q", c, s) for c, s in [(4, 0.5), (2, 0.3), (5, 0.1)]])
    out = ensemble_tables([a, b], top_k=2)
    assert out["landmark_id"].tolist() == [2, 4]  # 0.3 then 0.25 (1 → 0.2, 3 → 0.1, 5 → 0.05)
    assert out["score"].tolist() == pytest.approx([0.3, 0.25])


def test_image_missing_from_one_table_is_averaged_over_the_others():
    a = table([("q1", 1, 0.8), ("q2", 2, 0.6)])
    b = table([("q1", 1, 0.4)])  # q2 unreadable for model b
    out = ensemble_tables([a, b], top_k=3)
    assert scores(out, "q2") == pytest.approx({2: 0.6})
    assert scores(out, "q1") == pytest.approx({1: 0.6})


def test_ensemble_single_model_is_identity(tmp_path):
    a = table([("q1", 1, 0.6), ("q1", 2, 0.3), ("q2", 5, 0.9)])
    write_predictions(a, tmp_path / "a.parquet")
    out = ensemble([tmp_path / "a.parquet"], out=tmp_path / "e.parquet", top_k=5)
    back = read_predictions(tmp_path / "e.parquet")
    pd.testing.assert_frame_equal(back, read_predictions(tmp_path / "a.parquet"))
    assert len(out) == 3


def test_weight_errors(tmp_path):
    weights = ENSEMBLE["weights"]  # --weights is parsed by the option schema, checked by ensemble()
    assert parse_list(weights, "1, 2") == [1.0, 2.0]
    assert parse_list(weights, "") == []
    with pytest.raises(UserError, match="comma-separated"):
        parse_list(weights, "1;2")
    a = table([("q", 1, 0.5)])
    write_predictions(a, tmp_path / "a.parquet")
    with pytest.raises(UserError, match="2 weight"):
        ensemble([tmp_path / "a.parquet"] * 3, weights=[1.0, 2.0], out=tmp_path / "e.parquet")
    assert ensemble([tmp_path / "a.parquet"] * 2, weights=[], out=tmp_path / "e.parquet")["score"].tolist() == [0.5]
    with pytest.raises(UserError, match="non-negative"):
        ensemble_tables([a, a], weights=[1, -1])
    with pytest.raises(UserError, match="no predictions"):
        ensemble_tables([])


def test_cli_ensemble_and_evaluate(tmp_path):
    a = table([("q1", 1, 0.9), ("q1", 2, 0.1), ("q2", 2, 0.3), ("q2", 1, 0.2), ("q3", 1, 0.8)])
    b = table([("q1", 1, 0.7), ("q2", 2, 0.9), ("q3", 3, 0.6), ("q3", 1, 0.3)])
    write_predictions(a, tmp_path / "a.parquet")
    write_predictions(b, tmp_path / "b.parquet")
    # q1 → 1, q2 → 2 (landmarks); q3 is a non-landmark query
    (tmp_path / "solution.csv").write_text("id,landmarks,Usage\nq1,1,Public\nq2,2,Private\nq3,,Public\n")
    r = CliRunner().invoke(cli, ["ensemble", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"),
                                 "--weights", "1,1", "--out", str(tmp_path / "e.parquet")])
    assert r.exit_code == 0, r.output
    e = read_predictions(tmp_path / "e.parquet")
    assert e[e["rank"] == 0].set_index("id")["landmark_id"].to_dict() == {"q1": 1, "q2": 2, "q3": 1}
    # confidences q1 0.8, q2 0.6, q3 0.55 (wrong, non-landmark): both correct ranked first → GAP 1
    res = evaluate_predictions(tmp_path / "e.parquet", tmp_path / "solution.csv")
    assert res["gap"] == pytest.approx(1.0) and res["accuracy"] == pytest.approx(1.0)
    # model a alone: q1 0.9 ✓, q3 0.8 ✗, q2 0.3 ✓ → (1 + 2/3) / 2
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "a.parquet"), "--solution", str(tmp_path / "solution.csv"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads(r.output)
    assert res["gap"] == pytest.approx((1 + 2 / 3) / 2)
    r = CliRunner().invoke(cli, ["ensemble", str(tmp_path / "a.parquet"), "--weights", "1,2",
                                 "--out", str(tmp_path / "x.parquet")])
    assert r.exit_code != 0 and "1 predictions table" in str(r.exception)
