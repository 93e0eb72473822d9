"""Issue 15 class 6: one validator per table contract, applied by every reader.

A table that breaks its contract (submissions.tables' docstring) is refused by every command that
reads it, with one line naming the file, the row and the column — never read differently by
different commands (evaluate vs write-submission vs rescore vs ensemble), never wrapped.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.model.ensemble import ensemble_tables
from submissions.errors import UserError
from submissions.format import write_submission_file
from submissions.metric import evaluate_predictions
from submissions.tables import read_inliers, read_predictions, validate_inliers, validate_predictions
from tuning.policy import rescore

SOLUTION = "id,landmarks,Usage\nq1,5,Public\nq2,7,Private\n"


def preds(**columns) -> pd.DataFrame:
    base = {"id": ["q1", "q1", "q2", "q2"], "landmark_id": [5, 6, 7, 8],
            "score": np.array([0.9, 0.1, 0.8, 0.2], dtype=np.float32), "rank": [0, 1, 0, 1]}
    return pd.DataFrame({**base, **columns})


def inliers(**columns) -> pd.DataFrame:
    base = {"id": ["q1", "q1", "q2"], "landmark_id": [5, 5, 7], "ref_id": ["r1", "r2", "r3"], "inliers": [10, 3, 40]}
    return pd.DataFrame({**base, **columns})


@pytest.fixture()
def comp(tmp_path):
    (tmp_path / "comp").mkdir()
    (tmp_path / "comp" / "sample_submission.csv").write_text("id,landmarks\nq1,\nq2,\n")
    (tmp_path / "comp" / "solution.csv").write_text(SOLUTION)
    return tmp_path / "comp"


def every_reader(path, comp, tmp_path) -> list[str]:
    """The message each command that reads a predictions table gives for `path` (evaluate,
    write-submission, rescore/tune, ensemble, the reader itself); each must refuse."""
    readers = [
        lambda: read_predictions(path),
        lambda: evaluate_predictions(path, comp / "solution.csv"),
        lambda: write_submission_file(path, comp, tmp_path / "out.csv"),
        lambda: rescore(path, None, "identity"),
        lambda: ensemble_tables([read_predictions(path)]),
    ]
    messages = []
    for read in readers:
        with pytest.raises(UserError) as e:
            read()
        messages.append(str(e.value))
    assert not (tmp_path / "out.csv").exists()
    return messages


# (change to the valid table, the message every reader gives; "{at}" is "row N" for Parquet)
BAD_PREDICTIONS = [
    (dict(rank=[1, 2, 0, 1]), "{at1}: column 'rank': id 'q1' has ranks 1, 2, expected 0..1"),  # no rank 0
    (dict(rank=[0, 2, 0, 1]), "{at1}: column 'rank': id 'q1' has ranks 0, 2, expected 0..1"),  # a gap
    (dict(rank=[0, 0, 0, 1]), "{at1}: column 'rank': id 'q1' has ranks 0, 0, expected 0..1"),  # repeated
    (dict(rank=[-1, 0, 0, 1]), "{at0}: column 'rank' is -1, expected an integer from 0 to 32767"),
    (dict(rank=np.array([0, 65536, 0, 1], dtype=np.int32)), "{at1}: column 'rank' is 65536, expected an integer"),
    (dict(landmark_id=np.array([5, 2**63, 7, 8], dtype=np.uint64)),
     "{at1}: column 'landmark_id' is 9223372036854775808, expected an integer from 0 to 9223372036854775807"),
    (dict(landmark_id=[5, -6, 7, 8]), "{at1}: column 'landmark_id' is -6, expected an integer"),
    (dict(landmark_id=[5.0, 6.5, 7.0, 8.0]), "{at1}: column 'landmark_id' is 6.5, expected an integer"),
    (dict(landmark_id=[5, 5, 7, 8]), "{at1}: column 'landmark_id': id 'q1' lists landmark 5 twice (also on {at0})"),
    (dict(score=np.array([0.9, np.nan, 0.8, 0.2])), "{at1}: column 'score' is nan: not a finite number"),
    (dict(score=np.array([0.9, np.inf, 0.8, 0.2])), "{at1}: column 'score' is inf: not a finite number"),
    (dict(score=np.array([0.9, 1e39, 0.8, 0.2])), "{at1}: column 'score' is 1e+39: not a finite number"),  # float32
    (dict(score=np.array([0.9, -0.1, 0.8, 0.2])), "{at1}: column 'score' is -0.1: negative"),
    (dict(id=["q1", "", "q2", "q2"]), "{at1}: column 'id' is empty"),
]


@pytest.mark.parametrize("change, message", BAD_PREDICTIONS)
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_every_reader_refuses_a_broken_predictions_table_the_same_way(tmp_path, comp, change, message, suffix):
    path = tmp_path / f"preds{suffix}"
    df = preds(**change)
    df.to_parquet(path) if suffix == ".parquet" else df.to_csv(path, index=False)
    at = (lambda r: f"line {r + 2}") if suffix == ".csv" else (lambda r: f"row {r}")
    expected = f"{path}: " + message.format(at0=at(0), at1=at(1))
    if suffix == ".csv":  # a CSV's cells are named as written, quoted: NaN is an empty cell there
        expected = re.sub(r"column '(\w+)' is ([^:,]+)([:,])", r"column '\1' is '\2'\3", expected)
        expected = expected.replace("is 'nan':", "is '':")
    for got in every_reader(path, comp, tmp_path):
        assert "\n" not in got
        assert got.startswith(expected), (got, expected)


def test_a_valid_table_means_the_same_to_every_reader(tmp_path, comp):
    path = tmp_path / "preds.parquet"
    preds(score=np.array([0.9, 0.1, 0.8, -0.0], dtype=np.float32)).to_parquet(path)  # -0.0 reads as 0.0
    table = read_predictions(path)
    assert str(table["score"].dtype) == "float32" and not np.signbit(table["score"]).any()
    report = evaluate_predictions(path, comp / "solution.csv")
    assert report["gap"] == 1.0 and report["n_predicted"] == 2
    write_submission_file(path, comp, tmp_path / "sub.csv")
    assert (tmp_path / "sub.csv").read_text().splitlines()[1:] == [f"q1,5 {float(np.float32(0.9))!r}",
                                                                    f"q2,7 {float(np.float32(0.8))!r}"]
    assert rescore(path, None, "identity")[lambda d: d["rank"] == 0]["landmark_id"].tolist() == [5, 7]
    assert ensemble_tables([table])["landmark_id"].tolist()[::2] == [5, 7]


def test_largest_values_that_fit_are_kept_exactly(tmp_path):
    path = tmp_path / "preds.parquet"
    preds(landmark_id=np.array([2**63 - 1, 6, 7, 8], dtype=np.uint64), rank=[0, 1, 0, 1]).to_parquet(path)
    assert read_predictions(path)["landmark_id"][0] == 2**63 - 1
    deep = pd.DataFrame({"id": ["q"] * 32768, "landmark_id": np.arange(32768), "score": np.float32(0.5),
                         "rank": np.arange(32768)})
    assert validate_predictions(deep)["rank"].max() == 32767
    inl = validate_inliers(inliers(inliers=np.array([2**31 - 1, 0, 3], dtype=np.int64)))
    assert inl["inliers"].dtype == "int32" and inl["inliers"][0] == 2**31 - 1


def test_ensemble_refuses_a_repeated_class_instead_of_summing_it():
    twice = preds(landmark_id=[5, 5, 7, 8])
    with pytest.raises(UserError, match=r"predictions table 2: row 1: column 'landmark_id': id 'q1' lists landmark 5"):
        ensemble_tables([preds(), twice])
    out = ensemble_tables([preds(), preds(score=np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32))])
    assert out["score"].max() <= 1.0 and validate_predictions(out) is not None


BAD_INLIERS = [
    (dict(inliers=np.array([10, 2**31, 40], dtype=np.int64)), "row 1: column 'inliers' is 2147483648, expected an integer from 0 to 2147483647"),
    (dict(inliers=[10, -3, 40]), "row 1: column 'inliers' is -3, expected an integer"),
    (dict(inliers=[10.0, 3.5, 40.0]), "row 1: column 'inliers' is 3.5, expected an integer"),
    (dict(ref_id=["r1", "r1", "r3"]), "row 1: column 'ref_id': the pair (id 'q1', landmark 5) has reference 'r1' twice"),
    (dict(ref_id=["r1", "", "r3"]), "row 1: column 'ref_id' is empty"),
    (dict(landmark_id=np.array([5, 5, 2**63], dtype=np.uint64)), "row 2: column 'landmark_id' is 9223372036854775808"),
]


@pytest.mark.parametrize("change, message", BAD_INLIERS)
def test_inliers_contract(tmp_path, change, message):
    path = tmp_path / "inliers.parquet"
    inliers(**change).to_parquet(path)
    for read in (lambda: read_inliers(path), lambda: rescore(preds(), path, "identity")):
        with pytest.raises(UserError) as e:
            read()
        assert str(e.value).startswith(f"{path}: {message}")


def test_csv_tables_repeated_columns_header_only_and_literal_ids(tmp_path):
    path = tmp_path / "preds.csv"
    path.write_text("id,landmark_id,score,rank,rank\nq1,5,0.5,0,0\n")
    with pytest.raises(UserError, match=r"preds\.csv: line 1: column 'rank' appears more than once"):
        read_predictions(path)
    path.write_text("id,landmark_id,score,rank")  # header only, no newline: an empty table
    assert read_predictions(path).empty
    path.write_text("id,landmark_id,score,rank\nNA,5,0.5,0\nnull,5,0.5,0\n")  # ids are text, never "missing"
    assert read_predictions(path)["id"].tolist() == ["NA", "null"]
    path.write_text("id,landmark_id,score,rank\nq1,5,0.5,0,extra\nq2,6,0.5\n")
    with pytest.raises(UserError, match=r"preds\.csv: 2 problems: line 2: expected 4 fields \(id,landmark_id,score,rank\), "
                                        r"found 5; line 3: expected 4 fields .*found 3$"):
        read_predictions(path)
    path.write_text("id,landmark_id,score,rank\nq1,5,0.5,0\nq1,abc,0.25,1\n")
    with pytest.raises(UserError, match=r"preds\.csv: line 3: column 'landmark_id' is 'abc', expected an integer"):
        read_predictions(path)
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(UserError, match=r"dir\.parquet: is a directory"):
        read_predictions(tmp_path / "dir.parquet")
    twice = pa.Table.from_arrays([pa.array(["q1"]), pa.array(["q1"])], names=["id", "id"])
    pq.write_table(twice, tmp_path / "twice.parquet")
    with pytest.raises(UserError, match=r"twice\.parquet: column 'id' appears more than once"):
        read_inliers(tmp_path / "twice.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"junk\.parquet: cannot read as a Parquet table"):
        read_inliers(tmp_path / "junk.parquet")
