"""`glr gap`: text and JSON output, bootstrap, --compare, and one-line errors for bad files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli

GLR = Path(sys.executable).with_name("glr")

SOLUTION = (
    "id,landmarks,Usage\n"
    "a,1,Public\n"
    "b,2,Private\n"
    "c,,Public\n"
    "d,4 5,Private\n"
    "e,6,Ignored\n"
)
# ranked: a (right), c (wrong: non-landmark), d (right, 2nd true landmark), b (wrong)
SUBMISSION = "id,landmarks\na,1 0.9\nb,9 0.1\nc,3 0.8\nd,5 0.5\ne,6 1.0\n"
BASELINE = "id,landmarks\na,1 0.9\nb,9 0.1\nc,\nd,\ne,\n"


@pytest.fixture()
def files(tmp_path):
    paths = {}
    for name, text in [("solution.csv", SOLUTION), ("sub.csv", SUBMISSION), ("base.csv", BASELINE)]:
        paths[name] = tmp_path / name
        paths[name].write_text(text)
    return paths


def run(*args):
    result = CliRunner().invoke(cli, ["gap", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_text_output(files):
    out = run(files["sub.csv"], files["solution.csv"])
    assert out.splitlines() == [
        "GAP (all): 0.555556",  # (1/1 + 2/3) / 3
        "accuracy: 0.666667 (2 correct / 3 landmark queries)",
        "queries: 4 scored, 3 with a landmark, 4 predicted; 1 prediction(s) on ids outside the scored rows",
    ]


def test_json_usage_and_bootstrap(files):
    report = json.loads(run(files["sub.csv"], files["solution.csv"], "--json"))
    assert report["gap"] == pytest.approx((1 + 2 / 3) / 3)
    assert (report["n_queries"], report["n_landmark_queries"], report["n_predicted"]) == (4, 3, 4)
    assert report["accuracy"] == pytest.approx(2 / 3)
    public = json.loads(run(files["sub.csv"], files["solution.csv"], "--json", "--usage", "public"))
    assert public["gap"] == pytest.approx(1 / 1) and public["n_queries"] == 2 and public["usage"] == "Public"
    private = json.loads(run(files["sub.csv"], files["solution.csv"], "--json", "--usage", "Private"))
    assert private["gap"] == pytest.approx(1 / 2) and private["n_landmark_queries"] == 2
    boot = json.loads(run(files["sub.csv"], files["solution.csv"], "--json", "--bootstrap", "50", "--seed", "7"))
    lo, hi = boot["gap_ci"]
    assert 0 <= lo <= boot["gap"] <= hi <= 1 and boot["bootstrap"] == 50
    assert boot == json.loads(run(files["sub.csv"], files["solution.csv"], "--json", "--bootstrap", "50", "--seed", "7"))
    assert "95% CI" in run(files["sub.csv"], files["solution.csv"], "--bootstrap", "20")


def test_compare(files):
    report = json.loads(run(files["sub.csv"], files["solution.csv"], "--compare", files["base.csv"], "--json", "--bootstrap", "100"))
    c = report["compare"]
    assert c["baseline"] == str(files["base.csv"])
    assert c["gap_a"] == pytest.approx(1 / 3) and c["gap_b"] == pytest.approx(report["gap"])
    assert c["delta"] == pytest.approx(report["gap"] - 1 / 3) and c["n_resamples"] == 100
    assert 0 <= c["p_value"] <= 1
    text = run(files["sub.csv"], files["solution.csv"], "--compare", files["base.csv"])
    assert "vs " in text and "delta +0.222222" in text and "1000 paired resamples" in text


def test_help_has_example():
    result = CliRunner().invoke(cli, ["gap", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--compare" in result.output


@pytest.mark.parametrize(
    "case, expected",
    [
        ("bad_row", "sub.csv: 2 problems: line 3: cannot parse landmarks 'oops'"),
        ("missing", "nope.csv: no such file"),
        ("bad_solution", "solution.csv: 1 problem: line 2: Usage 'Everyone' is not one of"),
        ("bad_usage", "Invalid value for '--usage'"),
    ],
)
def test_errors_are_one_line_without_traceback(files, case, expected):
    sub, sol = files["sub.csv"], files["solution.csv"]
    extra = []
    if case == "bad_row":
        sub.write_text("id,landmarks\na,1 0.9\nb,oops\nc,1 -2\n")
    elif case == "missing":
        sub = sub.with_name("nope.csv")
    elif case == "bad_solution":
        sol.write_text("id,landmarks,Usage\na,1,Everyone\n")
    else:
        extra = ["--usage", "secret"]
    proc = subprocess.run([str(GLR), "gap", str(sub), str(sol), *extra], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr
    if case != "bad_usage":  # click's usage errors print a usage line too
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ")


def test_warns_when_no_prediction_is_on_a_scored_id(files, tmp_path):
    other = tmp_path / "other_solution.csv"
    other.write_text("id,landmarks,Usage\nx,1,Public\ny,,Private\n")
    result = CliRunner().invoke(cli, ["gap", str(files["sub.csv"]), str(other), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["gap"] == 0.0
    assert "Warning: none of the 5 predictions is on a scored id" in result.stderr
    quiet = CliRunner().invoke(cli, ["gap", str(files["sub.csv"]), str(files["solution.csv"])])
    assert "Warning" not in quiet.stderr
