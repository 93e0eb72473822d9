"""Issue 15 class 2: nothing is written or uploaded that was not checked.

`glr submit`'s pre-upload check (`check_before_upload`) holds the file to the one grammar of the
format (the same reader as `glr gap`) and its ids to the competition's sample_submission.csv; a
missing sample is refused, never silently skipped. The refusals here come before any request: run
in process with no Kaggle credentials, a file that passed the check would fail at the credentials.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.acquire.kaggle import check_before_upload
from pipeline.cli import cli
from submissions.errors import UserError
from submissions.format import read_submission

SAMPLE = "id,landmarks\nq1,\nq2,\nq3,\n"
GOOD = "id,landmarks\nq1,5 0.9\nq2,\nq3,7 0.25\n"


@pytest.fixture()
def comp(tmp_path):
    (tmp_path / "comp").mkdir()
    (tmp_path / "comp" / "sample_submission.csv").write_text(SAMPLE)
    return tmp_path / "comp"


def submission(tmp_path, text: str = GOOD):
    path = tmp_path / "submission.csv"
    path.write_text(text, encoding="utf-8")
    return path


def submit(*args, env=None):
    """`glr submit` in process: (exit code, the UserError's message or the output)."""
    result = CliRunner(env=env).invoke(cli, ["submit", *map(str, args), "-c", "landmark-recognition-2019", "-m", "x"])
    if isinstance(result.exception, UserError):
        return result.exit_code, str(result.exception)
    return result.exit_code, result.output


def test_a_valid_file_passes_against_the_folder_or_the_sample_itself(tmp_path, comp):
    sub = submission(tmp_path)
    assert check_before_upload(sub, data_dir=comp) == comp / "sample_submission.csv"
    assert check_before_upload(sub, data_dir=comp / "sample_submission.csv") == comp / "sample_submission.csv"
    assert check_before_upload(sub, check_ids=False) is None  # the explicit --no-id-check


def test_no_sample_means_no_upload(tmp_path, comp, monkeypatch):
    sub = submission(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"empty/sample_submission\.csv: no such file \(need the competition's"):
        check_before_upload(sub, data_dir=empty)
    with pytest.raises(UserError, match=r"give --data-dir .* or --no-id-check"):
        check_before_upload(sub)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    code, message = submit(sub, "--data-dir", empty)
    assert code == 1 and "sample_submission.csv: no such file" in message
    code, message = submit(sub)
    assert code == 1 and "--no-id-check" in message


# (text of the submission, the problem every reader names)
REFUSED = [
    ("id,landmarks\nq1,5 1e400\nq2,\nq3,\n", "line 2: confidence '1e400' is infinite"),
    ("id,landmarks\nq1,5 0_5\nq2,\nq3,\n", "line 2: confidence '0_5' is not a plain decimal number"),
    ("id,landmarks\nq1,5 ٠.٥\nq2,\nq3,\n", "line 2: confidence '٠.٥' is not a plain decimal number"),
    ("id,landmarks\nq1,٥ 0.5\nq2,\nq3,\n", "line 2: landmark id '٥' is not a non-negative integer"),
    ("id,landmarks\nq1,5 inf\nq2,\nq3,\n", "line 2: confidence 'inf' is infinite"),
    ("id,landmarks\nq1,5 -0\nq2,\nq3,\n", "line 2: confidence '-0' is negative"),
    ("id,landmarks\nq1,5 .5\nq2,\nq3,\n", "line 2: confidence '.5' is not a plain decimal number"),
    ("id,landmarks\nq1,5  0.5\nq2,\nq3,\n", "line 2: cannot parse landmarks '5  0.5'"),
    ("id, landmarks\nq1,5 0.5\nq2,\nq3,\n", "line 1: header is 'id, landmarks'"),
]


@pytest.mark.parametrize("text, problem", REFUSED)
def test_gap_and_submit_refuse_the_same_numbers_with_the_same_words(tmp_path, comp, text, problem):
    sub = submission(tmp_path, text)
    with pytest.raises(UserError) as gap_error:
        read_submission(sub)  # what glr gap reads
    with pytest.raises(UserError) as submit_error:
        check_before_upload(sub, data_dir=comp)  # what glr submit checks
    for e in (gap_error, submit_error):
        assert problem in str(e.value) and "\n" not in str(e.value)


def test_ids_are_checked_against_the_sample(tmp_path, comp):
    sub = submission(tmp_path, "id,landmarks\nq1,5 0.9\nq4,\nq3,\n")  # q2 missing, q4 extra
    with pytest.raises(UserError) as e:
        check_before_upload(sub, data_dir=comp)
    assert "line 3: id 'q4' is not in sample_submission.csv" in str(e.value)
    assert "sample_submission.csv line 3: id 'q2' has no row in the submission" in str(e.value)
    (comp / "sample_submission.csv").write_text("id,landmarks\nq1,\nq1,\n")  # a broken sample: refused itself
    with pytest.raises(UserError, match=r"sample_submission\.csv: 1 problem: line 3: duplicate id 'q1'"):
        check_before_upload(submission(tmp_path), data_dir=comp)
