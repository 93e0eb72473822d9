"""The id,landmarks file: round trip, validation with exact line numbers, solution.csv."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from submissions.errors import UserError
from submissions.format import (
    align_submission,
    check_submission,
    read_sample_ids,
    read_solution,
    read_submission,
    submission_from_predictions,
    validate_submission,
    write_submission,
    write_submission_file,
)
from submissions.metric import gap


def canonical(ids, lids, confs) -> pd.DataFrame:
    return pd.DataFrame(
        {"id": pd.Series(ids, dtype="str"), "landmark_id": pd.array(lids, dtype="Int64"), "confidence": np.array(confs, dtype=float)}
    )


def write(tmp_path, text: str, name: str = "sub.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------ round trip


def test_round_trip_keeps_ranking_of_confidences_differing_past_the_9th_digit(tmp_path):
    base = 0.123456789
    confs = [base + k * 1e-13 for k in range(6)] + [base * (1 + 1e-15), 1e-300, 5e-324, 1.7e308, 0.0, 123456789.123456789]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(confs))
    df = canonical([f"id{k}" for k in range(len(confs))], list(range(len(confs))), np.array(confs)[perm])
    path = write_submission(df, tmp_path / "out" / "s.csv")
    back = read_submission(path)
    pd.testing.assert_frame_equal(back, df)
    assert (np.argsort(back["confidence"].to_numpy(), kind="stable") == np.argsort(df["confidence"].to_numpy(), kind="stable")).all()
    assert back["confidence"].nunique() == df["confidence"].nunique() == len(confs)  # no two collapsed


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=6).filter(lambda s: s.strip() == s),
            st.none() | st.tuples(st.integers(0, 10**12), st.floats(0, 1e300, allow_nan=False)),
        ),
        unique_by=lambda r: r[0],
        max_size=20,
    )
)
def test_round_trip_property(tmp_path_factory, rows):
    ids = [r[0] for r in rows]
    lids = [r[1][0] if r[1] else None for r in rows]
    confs = [r[1][1] if r[1] else np.nan for r in rows]
    df = canonical(ids, lids, confs)
    path = write_submission(df, tmp_path_factory.mktemp("rt") / "s.csv")
    pd.testing.assert_frame_equal(read_submission(path), df)


def test_write_is_atomic_and_needs_canonical_columns(tmp_path):
    target = write(tmp_path, "id,landmarks\nold,1 0.5\n")
    with pytest.raises(UserError, match="lacks column"):
        write_submission(pd.DataFrame({"id": ["a"], "landmarks": ["1 0.5"]}), target)
    with pytest.raises(UserError, match="confidence"):
        write_submission(canonical(["a"], [1], [-1.0]), target)
    assert target.read_text() == "id,landmarks\nold,1 0.5\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]  # no temp file left behind
    write_submission(canonical(["a", "b"], [3, None], [0.25, np.nan]), target)
    assert target.read_text() == "id,landmarks\na,3 0.25\nb,\n"


def test_reads_crlf_bom_and_quotes(tmp_path):
    path = write(tmp_path, '\ufeffid,landmarks\r\n"a","1 0.5"\r\nb,2 0.25\r\nc,\r\nd,""\r\n')
    df = read_submission(path)
    assert df["id"].tolist() == ["a", "b", "c", "d"]
    assert df["landmark_id"].tolist()[:2] == [1, 2] and df["landmark_id"][2:].isna().all()
    assert df["confidence"].tolist()[:2] == [0.5, 0.25]


# ------------------------------------------------------------------------------ the one grammar

# (cell, what every reader makes of it: (landmark, confidence), None = no prediction, or the problem)
GRAMMAR = [
    ("1 0.5", (1, 0.5)), ("7 1e-5", (7, 1e-5)), ("7 1E+5", (7, 1e5)), ("8 3", (8, 3.0)), ("005 0.5", (5, 0.5)),
    ("9223372036854775807 1", (2**63 - 1, 1.0)), ("5 1e-400", (5, 0.0)), ("", None),
    ("5 1e400", "infinite"), ("5 0_5", "not a plain decimal"), ("5 ٠.٥", "not a plain decimal"),
    ("5 .5", "not a plain decimal"), ("5 5.", "not a plain decimal"), ("5 +0.5", "not a plain decimal"),
    ("5 -0.0", "negative"), ("5 -1", "negative"), ("5 nan", "NaN"), ("5 inf", "infinite"),
    ("5 Infinity", "infinite"), ("5 0x10", "not a plain decimal"), ("5 1e5.5", "not a plain decimal"),
    ("5 0.5 ", "one space"), (" 5 0.5", "one space"), ("5  0.5", "one space"), ("5\t0.5", "one space"),
    (" ", "one space"), ("+5 0.5", "not a non-negative integer"), ("-0 0.5", "not a non-negative integer"),
    ("1_0 0.5", "not a non-negative integer"), ("١ 0.5", "not a non-negative integer"),
    ("9223372036854775808 1", "below 2^63"), ("1.0 0.5", "not a non-negative integer"),
]


@pytest.mark.parametrize("cell, expected", GRAMMAR)
def test_one_grammar_for_every_reader(tmp_path, cell, expected):
    """read_submission (glr gap), validate_submission (glr submit, glr write-submission) and the
    scalar parser agree on every cell: the same value, or the same one-line problem."""
    from submissions.format import parse_landmarks_cell

    path = write(tmp_path, f"id,landmarks\nq,{cell}\nr,2 0.25\n")
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            parse_landmarks_cell(cell)
        problems = validate_submission(path)
        assert len(problems) == 1 and problems[0].startswith("line 2: ") and expected in problems[0]
        with pytest.raises(UserError, match=f"1 problem: line 2: .*{re.escape(expected)}"):
            read_submission(path)
        return
    assert parse_landmarks_cell(cell) == expected
    assert validate_submission(path) == []
    df = read_submission(path)
    got = None if pd.isna(df["landmark_id"][0]) else (int(df["landmark_id"][0]), float(df["confidence"][0]))
    assert got == expected


def test_what_write_submission_writes_is_in_the_grammar(tmp_path):
    confs = [0.0, -0.0, 1e-7, 5e-324, 0.1, 1.0, 100.0, 1e16, 1e21, 1.2345678901234568e20, 1 / 3, 2.0**-1074]
    df = canonical([f"q{i}" for i in range(len(confs))], list(range(len(confs))), confs)
    path = write_submission(df, tmp_path / "s.csv")
    assert validate_submission(path) == []
    assert "-0" not in path.read_text()
    back = read_submission(path)
    assert back["confidence"].tolist() == [c + 0.0 for c in confs]


# ------------------------------------------------------------------------------ validation

BAD = (
    "id,landmarks\n"  # 1
    "a,1 0.5\n"  # 2
    "b,1 0.5,x\n"  # 3  too many fields
    ",2 0.5\n"  # 4  empty id
    "c\n"  # 5  too few fields
    "f,1.5 0.2\n"  # 6  non-integer landmark
    "g,3 nan\n"  # 7  NaN
    "h,4 -1\n"  # 8  negative
    "i,5 inf\n"  # 9  infinite
    "j,abc\n"  # 10 unparsable
    "k,1 2 3\n"  # 11 unparsable (two predictions)
    "a,7 0.1\n"  # 12 duplicate
    "l,x 0.1\n"  # 13 non-integer landmark
    "m,1 zero\n"  # 14 confidence not a number
    "n,\n"  # 15 fine: no prediction
    "o,  8   0.25 \n"  # 16 loose whitespace
)

EXPECTED = [
    "line 3: expected 2 fields (id,landmarks), found 3",
    "line 4: empty id",
    "line 5: expected 2 fields (id,landmarks), found 1",
    "line 6: landmark id '1.5' is not a non-negative integer below 2^63",
    "line 7: confidence 'nan' is NaN",
    "line 8: confidence '-1' is negative",
    "line 9: confidence 'inf' is infinite",
    "line 10: cannot parse landmarks 'abc': expected '<landmark_id> <confidence>' separated by one space, or empty",
    "line 11: cannot parse landmarks '1 2 3': expected '<landmark_id> <confidence>' separated by one space, or empty",
    "line 12: duplicate id 'a' (first on line 2)",
    "line 13: landmark id 'x' is not a non-negative integer below 2^63",
    "line 14: confidence 'zero' is not a plain decimal number (ASCII digits, optional .digits and e±digits; no sign)",
    "line 16: cannot parse landmarks '  8   0.25 ': expected '<landmark_id> <confidence>' separated by one space, or empty",
]


def test_validate_reports_every_problem_with_its_line(tmp_path):
    assert validate_submission(write(tmp_path, BAD)) == EXPECTED


def test_validate_against_sample_reports_missing_and_extra_ids(tmp_path):
    sub = write(tmp_path, "id,landmarks\na,1 0.5\nzz,2 0.1\nb,\nyy,\n")
    sample = write(tmp_path, "id,landmarks\na,\nb,\nc,\nd,\n", "sample_submission.csv")
    assert validate_submission(sub, sample) == [
        "line 3: id 'zz' is not in sample_submission.csv",
        "line 5: id 'yy' is not in sample_submission.csv",
        "sample_submission.csv line 4: id 'c' has no row in the submission",
        "sample_submission.csv line 5: id 'd' has no row in the submission",
    ]
    good = write(tmp_path, "id,landmarks\nd,\nc,3 1e-3\nb,\na,1 0.5\n", "good.csv")
    assert validate_submission(good, sample) == []
    check_submission(good, sample)


def test_wrong_header(tmp_path):
    path = write(tmp_path, "id,landmark\na,1 0.5\n")
    assert validate_submission(path) == ["line 1: header is 'id,landmark', expected 'id,landmarks'"]
    with pytest.raises(UserError, match=r"sub\.csv: line 1: header is 'id,landmark'"):
        read_submission(path)


def test_check_and_read_summarise_in_one_line(tmp_path):
    path = write(tmp_path, BAD)
    with pytest.raises(UserError) as e:
        check_submission(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: 13 problems: line 3: expected 2 fields")
    assert "line 12: duplicate id 'a'" in msg and "… and 3 more" in msg and "line 14" not in msg
    with pytest.raises(UserError, match=r"13 problems: line 3"):
        read_submission(path)
    for text, error in [("", "empty"), ("id,landmarks\n" + "x,1 0.5\n" * 3, "line 3: duplicate id 'x'")]:
        with pytest.raises(UserError, match=error):
            read_submission(write(tmp_path, text, "other.csv"))
    with pytest.raises(UserError, match="no such file"):
        read_submission(tmp_path / "missing.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(UserError, match="binary.csv"):
        read_submission(tmp_path / "binary.csv")


# ------------------------------------------------------------------------------ solution


def test_read_solution(tmp_path):
    path = write(
        tmp_path,
        "id,landmarks,Usage\n"
        "a,1,Public\n"
        "b,,Private\n"
        "c,3 4  5,private\n"
        "d,6,Ignored\n"
        "e,7 8, public \n"
        "f,9 10,Public\n",
        "solution.csv",
    )
    sol = read_solution(path)
    assert sol["id"].tolist() == ["a", "b", "c", "d", "e", "f"]
    assert sol["landmarks"].tolist() == [(1,), (), (3, 4, 5), (6,), (7, 8), (9, 10)]
    assert sol["usage"].tolist() == ["Public", "Private", "Private", "Ignored", "Public", "Public"]
    singles = read_solution(write(tmp_path, "id,landmarks,Usage\na,1,Public\nb,2,Private\n", "s1.csv"))
    assert singles["landmarks"].tolist() == [(1,), (2,)] and singles["usage"].tolist() == ["Public", "Private"]
    # read_solution's uniqueness check is trusted only for the very ids it read
    twice = pd.concat([sol, sol], ignore_index=True)
    with pytest.raises(UserError, match="duplicate"):
        gap(canonical(twice["id"], [1] * len(twice), [0.5] * len(twice)), twice)
    assert gap(canonical(sol["id"], [1, 2, 3, 6, 8, 1], [0.1] * 6), sol) == pytest.approx((1 + 2 / 3 + 3 / 4) / 4)  # ties by id; d Ignored
    no_usage = read_solution(write(tmp_path, "id,landmarks\na,1\nb,\n", "s2.csv"))
    assert no_usage["usage"].tolist() == ["All", "All"]
    sub = canonical(["a", "b"], [1, None], [0.5, np.nan])
    assert gap(sub, no_usage, "Public") == gap(sub, no_usage, "Private") == 1.0


def test_read_solution_errors(tmp_path):
    with pytest.raises(UserError, match=r"line 1: solution lacks column\(s\) landmarks"):
        read_solution(write(tmp_path, "id,landmark_id\na,1\n", "s.csv"))
    path = write(tmp_path, "id,landmarks,Usage\na,1,Public\nb,x,Public\nc,2,Secret\na,3,Private\n", "s.csv")
    with pytest.raises(UserError) as e:
        read_solution(path)
    msg = str(e.value)
    assert "line 3: landmarks 'x' is not a space-separated list" in msg
    assert "line 4: Usage 'Secret' is not one of Public, Private, Ignored" in msg
    assert "line 5: duplicate id 'a' (first on line 2)" in msg


# ------------------------------------------------------------------------------ conversions


def test_submission_from_predictions_and_align(tmp_path):
    preds = pd.DataFrame(
        {
            "id": ["q2", "q2", "q1", "q1", "q3"],
            "landmark_id": [7, 8, 5, 6, 9],
            "score": np.array([0.9, 0.1, 0.3, 0.2, 0.5], dtype=np.float32),
            "rank": [0, 1, 0, 1, 0],
        }
    )
    sub = submission_from_predictions(preds)
    assert sub["id"].tolist() == ["q2", "q1", "q3"]
    assert sub["landmark_id"].tolist() == [7, 5, 9]
    assert sub["confidence"].tolist() == [float(np.float32(x)) for x in (0.9, 0.3, 0.5)]
    preds.loc[4, "rank"] = 1  # q3 without a rank-0 row: no silent "no prediction", one line
    with pytest.raises(UserError, match=r"row 4: column 'rank': id 'q3' has ranks 1, expected 0\.\.0"):
        submission_from_predictions(preds)
    sub = sub.iloc[:2]
    assert sub["landmark_id"].dtype == "Int64" and sub["confidence"].dtype == "float64"
    sample = write(tmp_path, "id,landmarks\nq1,\nq4,\nq2,\n", "sample.csv")
    aligned = align_submission(sub, read_sample_ids(sample))
    assert aligned["id"].tolist() == ["q1", "q4", "q2"]
    assert aligned["landmark_id"].tolist()[0] == 5 and pd.isna(aligned["landmark_id"][1])
    path = write_submission(aligned, tmp_path / "sub.csv")
    assert validate_submission(path, sample) == []


def test_write_submission_file_aligns_to_the_sample_and_counts(tmp_path):
    preds = pd.DataFrame({"id": ["q2", "q2", "q1", "stray"], "landmark_id": [7, 8, 5, 3],
                          "score": np.array([0.9, 0.1, 0.3, 0.4], dtype=np.float32), "rank": [0, 1, 0, 0]})
    comp = tmp_path / "comp"
    comp.mkdir()
    write(comp, "id,landmarks\nq1,\nq4,\nq2,\n", "sample_submission.csv")
    preds.to_parquet(tmp_path / "preds.parquet")
    for source, sample in ((preds, comp), (tmp_path / "preds.parquet", comp / "sample_submission.csv")):
        out = tmp_path / "out" / "sub.csv"
        info = write_submission_file(source, sample, out)
        assert info == {"path": str(out), "rows": 3, "predicted": 2, "dropped_ids": 1}
        conf = [repr(float(np.float32(x))) for x in (0.3, 0.9)]
        assert out.read_text() == f"id,landmarks\nq1,5 {conf[0]}\nq4,\nq2,7 {conf[1]}\n"
        assert [p.name for p in out.parent.iterdir()] == ["sub.csv"]  # no temporary file left


def test_write_submission_file_refuses_and_keeps_the_previous_file(tmp_path):
    preds = pd.DataFrame({"id": ["q1", "q2"], "landmark_id": [5, 7], "score": np.float32(0.5), "rank": [0, 0]})
    out = write(tmp_path, "id,landmarks\nq1,5 0.5\n", "sub.csv")  # a good file from an earlier run
    with pytest.raises(UserError, match="no such file .*sample_submission.csv"):
        write_submission_file(preds, tmp_path / "nowhere", out)
    with pytest.raises(UserError, match="none of its 2 ids is in"):
        write_submission_file(preds, write(tmp_path, "id,landmarks\na,\nb,\n", "other.csv"), out)
    # a sample that breaks its contract (a repeated or empty id, a short row, a repeated column) is
    # refused before anything is written, naming the sample's line
    for name, text, error in [
        ("dup.csv", "id,landmarks\nq1,\nq2,\nq1,\n", r"dup\.csv: 1 problem: line 4: duplicate id 'q1' \(first on line 2\)"),
        ("empty.csv", "id,landmarks\nq1,\n,\nq2,\n", r"empty\.csv: 1 problem: line 3: empty id"),
        ("short.csv", "id,landmarks\nq1,\nq2\n", r"short\.csv: 1 problem: line 3: expected 2 fields"),
        ("cols.csv", "id,id\nq1,q1\n", r"cols\.csv: line 1: column 'id' appears more than once"),
    ]:
        with pytest.raises(UserError, match=error) as e:
            write_submission_file(preds, write(tmp_path, text, name), out)
        assert ".sub.csv." not in str(e.value) and "\n" not in str(e.value)
    assert out.read_text() == "id,landmarks\nq1,5 0.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cols.csv", "dup.csv", "empty.csv", "other.csv",
                                                         "short.csv", "sub.csv"]


def test_header_only_files_and_repeated_columns(tmp_path):
    """A header without rows (with or without its newline) is an empty file of that kind, in every reader;
    a repeated column name is one line naming it, not a traceback."""
    for end in ("", "\n", "\r\n"):
        assert read_submission(write(tmp_path, "id,landmarks" + end)).empty
        assert validate_submission(write(tmp_path, "id,landmarks" + end)) == []
        assert read_sample_ids(write(tmp_path, "id,landmarks" + end, "sample.csv")).empty
        assert read_solution(write(tmp_path, "id,landmarks,Usage" + end, "sol.csv")).empty
    for reader, header in [(read_submission, "id,landmarks,landmarks"), (read_sample_ids, "id,landmarks,id"),
                           (read_solution, "id,landmarks,Usage,landmarks")]:
        with pytest.raises(UserError, match=r"line 1: column '(id|landmarks)' appears more than once"):
            reader(write(tmp_path, header + "\na,1,1,1\n", "dup.csv"))


CELLS = ["1 0.5", "2 0.25", "", "7 1e-5", "8 3", "+5 0.5", "-0 0.5", "5 +0.5", "5 -0.0", "5 nan", "5 inf",
         "5  0.5", " 5 0.5", "5 0.5 ", "5\t0.5", "1.0 0.5", "5 .5", "5 5.", "005 0.5", "x", "5 1e400", "99999999999999999999 1",
         "NA NA", "null 0.5", "5 NA", "NaN NaN", "N/A", "0000000000000000000005 0.5", "9223372036854775807 1",
         "9223372036854775808 1", "١ 0.5", "5 0_5", "5 ٠.٥", "5 1E5", "5 1e+5", "5 Infinity", "5 1e5.5", " ",
         "5 1e-400", "5 0x1p3"]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(CELLS), max_size=4), st.sampled_from(["", "dup", "empty", "space"]),
       st.booleans(), st.booleans())
def test_fast_and_checking_readers_agree(tmp_path_factory, cells, odd_id, blank_line, final_newline):
    """read_submission's one-pass reader must accept exactly what the checking reader accepts."""
    from submissions.format import _load_submission

    ids = [f"q{k}" for k in range(len(cells))]
    if ids and odd_id:
        ids[-1] = {"dup": ids[0], "empty": "", "space": "q 9"}[odd_id]
    lines = [f"{i},{c}" for i, c in zip(ids, cells)]
    if blank_line and lines:
        lines.insert(len(lines) // 2, "")
    text = "id,landmarks\n" + "\n".join(lines) + ("\n" if final_newline or not lines else "")
    path = write(tmp_path_factory.mktemp("fast"), text)
    frame, _, problems = _load_submission(path)
    if problems:
        with pytest.raises(UserError):
            read_submission(path)
    else:
        pd.testing.assert_frame_equal(read_submission(path), frame)
