"""Issue 15's property test: random corruptions of a valid submission, sample_submission.csv,
predictions table and policy file. Every reader either accepts what all readers agree on, or
refuses with one line (a UserError: exit 1, or click's usage error: exit 2) — never a traceback,
never a silently different result between `glr gap`, `glr submit` (its pre-upload check; nothing
is uploaded) and `glr write-submission`, nor between `glr evaluate`, `glr rescore` and
`glr ensemble` for a predictions table.

The commands run in process through click's CliRunner; a reference reader written from the
documented grammar (submissions.format's docstring) says what a submission file means.
Deterministic (derandomize=True) and small (60 examples per property).
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from pipeline.acquire.kaggle import check_before_upload
from pipeline.cli import cli
from submissions.errors import UserError
from submissions.tables import empty_inliers, write_inliers
from tuning.policy import seed_rules

PROPERTY = settings(max_examples=60, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

IDS = ["q0", "q1", "q2", "q3", "q4"]
SOLUTION = "id,landmarks,Usage\nq0,5,Public\nq1,7,Private\nq2,,Public\nq3,9 10,Private\nq4,11,Public\n"
SAMPLE = "id,landmarks\n" + "".join(f"{i},\n" for i in IDS)
SUBMISSION = "id,landmarks\nq0,5 0.9\nq1,8 0.4\nq2,3 0.7\nq3,10 0.55\nq4,\n"


def glr(*args) -> tuple[int, str]:
    """Run a glr command in process: (exit code, output or the one-line error). A traceback — any
    exception other than a UserError — fails the property."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        if isinstance(result.exception, UserError):
            message = str(result.exception)
            assert result.exit_code == 1 and message and "\n" not in message, message
            return 1, message
        raise result.exception
    assert result.exit_code in (0, 2), result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    (root / "comp").mkdir()
    (root / "comp" / "sample_submission.csv").write_text(SAMPLE)
    (root / "comp" / "solution.csv").write_text(SOLUTION)
    write_inliers(empty_inliers(), root / "inliers.parquet")
    return root


# ------------------------------------------------------------------ the documented grammar, by hand

_CELL = re.compile(r"([0-9]+) ([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)")


def reference_read(text: str) -> dict | None:
    """What the docstring says a submission file means: {id: (landmark, confidence) or None}, or
    None when the file breaks the grammar."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not lines or lines[0] not in ("id,landmarks", '"id","landmarks"'):
        return None
    out: dict = {}
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) != 2 or not fields[0] or fields[0] in out:
            return None
        cell = fields[1]
        if cell == "":
            out[fields[0]] = None
            continue
        m = _CELL.fullmatch(cell)
        if m is None or int(m.group(1)) >= 2**63 or math.isinf(float(m.group(2))):
            return None
        out[fields[0]] = (int(m.group(1)), float(m.group(2)))
    return out


def reference_gap(pred: dict, truth: dict) -> float:
    """GAP over the solution's non-Ignored rows, by the competitions' definition (ties by id)."""
    ranked = sorted(((c, i, lm) for i, p in pred.items() if p and i in truth for lm, c in [p]), key=lambda t: (-t[0], t[1]))
    correct, total = 0, 0.0
    for k, (_, i, lm) in enumerate(ranked, 1):
        if lm in truth[i]:
            correct += 1
            total += correct / k
    m = sum(1 for t in truth.values() if t)
    return total / m if m else 0.0


TRUTH = {"q0": (5,), "q1": (7,), "q2": (), "q3": (9, 10), "q4": (11,)}

# ------------------------------------------------------------------ corruptions

NASTY_TOKENS = ["1e400", "0_5", "٠.٥", "٥", "inf", "nan", "-0", "+0.5", ".5", "5.", "1E5", "1e-400", "0x1p3", "",
                "9223372036854775808", "9223372036854775807", "00", "1 2", "  ", "\t", "NaN", "Infinity", "-1",
                "0.5", "3", "１"]
CHARS = [" ", "\t", ",", "_", "٠", "e", "E", "-", "+", ".", "0", "9", "x", "\ufeff", "é"]


@st.composite
def corrupted_text(draw, text: str):
    """`text` with one corruption: a token replaced, a character inserted or deleted, a line
    repeated, dropped or blanked, the header changed, the text cut, CRLF or a BOM."""
    lines = text.split("\n")[:-1]
    op = draw(st.sampled_from(["token", "insert", "delete", "repeat", "drop", "blank", "header", "cut", "crlf",
                               "bom"]))
    event(f"corruption: {op}")
    row = draw(st.integers(1, len(lines) - 1))
    if op == "token":
        ident, _, cell = lines[row].partition(",")
        parts = cell.split(" ") if cell else ["", ""]
        parts[draw(st.integers(0, len(parts) - 1))] = draw(st.sampled_from(NASTY_TOKENS))
        lines[row] = f"{ident},{' '.join(parts)}"
    elif op in ("insert", "delete"):
        line = lines[row]
        at = draw(st.integers(0, max(0, len(line) - 1)))
        lines[row] = line[:at] + draw(st.sampled_from(CHARS)) + line[at:] if op == "insert" else line[:at] + line[at + 1:]
    elif op == "repeat":
        lines.insert(row, lines[row])
    elif op == "drop":
        del lines[row]
    elif op == "blank":
        lines.insert(row, "")
    elif op == "header":
        lines[0] = draw(st.sampled_from(["id,landmark", "landmarks,id", "id,landmarks,x", "ID,landmarks",
                                         "id, landmarks", '"id","landmarks"', "id,id", "id"]))
    elif op == "cut":
        joined = "\n".join(lines)
        return joined[: draw(st.integers(0, len(joined)))]
    elif op == "crlf":
        return "\r\n".join(lines) + "\r\n"
    else:
        return "\ufeff" + "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ submission: gap and submit agree


@PROPERTY
@given(text=corrupted_text(SUBMISSION))
@example(text=SUBMISSION.replace("0.9", "1e400"))  # the cases, always run
@example(text=SUBMISSION.replace("0.9", "0_5"))
@example(text=SUBMISSION.replace("0.9", "٠.٩"))
@example(text=SUBMISSION.replace("q4,\n", ""))  # an id missing: gap scores it, submit refuses it
def test_gap_and_submit_read_a_corrupted_submission_alike(comp, tmp_path_factory, text):
    path = tmp_path_factory.mktemp("sub") / "submission.csv"
    path.write_text(text, encoding="utf-8")
    want = reference_read(text)
    code, out = glr("gap", path, comp / "comp" / "solution.csv", "--json")
    try:
        check_before_upload(path, data_dir=comp / "comp")
        uploadable = True
    except UserError as e:
        assert "\n" not in str(e)
        uploadable = False
    event(f"gap: {'refused' if want is None else 'accepted'}, submit: {'uploadable' if uploadable else 'refused'}")
    if want is None:  # broken grammar: every reader refuses
        assert code == 1 and not uploadable, (text, out)
        return
    assert code == 0, (text, out)
    assert json.loads(out)["gap"] == pytest.approx(reference_gap(want, TRUTH), abs=1e-12)
    # submit also wants exactly the sample's ids; gap scores any ids
    assert uploadable == (set(want) == set(IDS)), (text, want)


# ------------------------------------------------------------------ sample: write-submission and submit agree


@PROPERTY
@given(text=corrupted_text(SAMPLE))
@example(text="id,id\nq0,q0\n")  # a repeated column name (was a KeyError traceback)
@example(text="id,landmarks")  # header only, no newline (was Arrow jargon)
@example(text=SAMPLE + "q0,\n")  # a repeated id
def test_write_submission_and_submit_read_a_corrupted_sample_alike(comp, tmp_path_factory, text):
    root = tmp_path_factory.mktemp("sample")
    (root / "comp").mkdir()
    (root / "comp" / "sample_submission.csv").write_text(text, encoding="utf-8")
    preds = root / "preds.parquet"
    pd.DataFrame({"id": IDS, "landmark_id": [5, 7, 3, 10, 11], "score": np.float32(0.5),
                  "rank": 0}).to_parquet(preds)
    sub = root / "submission.csv"
    sub.write_text(SUBMISSION)
    code, out = glr("write-submission", preds, "--data-dir", root / "comp", "--out", root / "out.csv")
    try:
        check_before_upload(sub, data_dir=root / "comp")
        fixed_ok = True
    except UserError:
        fixed_ok = False
    event(f"write-submission: {'refused' if code else 'wrote'}")
    if code != 0:
        assert not (root / "out.csv").exists()  # nothing half-checked is left behind
        return
    # what write-submission wrote passes submit's check against the same sample, and gap reads it
    written = (root / "out.csv").read_text()
    check_before_upload(root / "out.csv", data_dir=root / "comp")
    assert reference_read(written) is not None
    assert glr("gap", root / "out.csv", comp / "comp" / "solution.csv")[0] == 0
    sample_ids = [line.split(",")[0].lstrip("\ufeff") for line in text.replace("\r", "").split("\n")[1:] if line]
    assert [line.split(",")[0] for line in written.splitlines()[1:]] == sample_ids
    assert fixed_ok == (sorted(sample_ids) == sorted(IDS))


# ------------------------------------------------------------------ predictions: evaluate, write-submission, rescore, ensemble

VALUES = [-1, 0, 1, 2**15, 65536, 2**31, 2**63, -0.0, 0.5, 1.5, np.nan, np.inf, 1e39, "", "x", "NA", "../x", "٥"]


@st.composite
def corrupted_predictions(draw) -> pd.DataFrame:
    df = pd.DataFrame({"id": np.repeat(IDS, 2), "landmark_id": [5, 6, 7, 8, 3, 4, 10, 9, 11, 12],
                       "score": np.array([0.9, 0.05, 0.4, 0.3, 0.7, 0.1, 0.55, 0.2, 0.35, 0.3], dtype=np.float32),
                       "rank": [0, 1] * 5})
    op = draw(st.sampled_from(["cell", "cell", "repeat", "drop", "swap_ranks", "rename"]))
    row = draw(st.integers(0, len(df) - 1))
    if op == "cell":
        col = draw(st.sampled_from(list(df.columns)))
        df = df.astype({col: object})
        df.at[row, col] = draw(st.sampled_from(VALUES))
    elif op == "repeat":
        df = pd.concat([df, df.iloc[[row]]], ignore_index=True)
    elif op == "drop":
        df = df.drop(index=row).reset_index(drop=True)
    elif op == "swap_ranks":
        df.loc[[row, row ^ 1], "rank"] = df.loc[[row ^ 1, row], "rank"].to_numpy()
        df.at[row, "rank"] = draw(st.sampled_from([0, 1, 2, -1]))
    else:
        df = df.rename(columns={draw(st.sampled_from(list(df.columns))): draw(st.sampled_from(["ID", "rank ", "lid"]))})
    return df


NO_RANK_0 = pd.DataFrame({"id": ["q0", "q0", "q1"], "landmark_id": [5, 6, 7], "score": np.float32(0.5), "rank": [1, 2, 0]})
TWICE = pd.DataFrame({"id": ["q0", "q0", "q1"], "landmark_id": [5, 5, 7], "score": np.float32(0.6), "rank": [0, 1, 0]})


@PROPERTY
@given(df=corrupted_predictions(), as_csv=st.booleans())
@example(df=NO_RANK_0, as_csv=False)  # was GAP 0 in evaluate, an empty submission, rank 1 in rescore
@example(df=TWICE, as_csv=False)  # was summed by ensemble to a score > 1
@example(df=NO_RANK_0.assign(rank=[0, 65536, 1]), as_csv=True)  # was wrapped to 0 in int16
def test_every_command_reads_a_corrupted_predictions_table_alike(comp, tmp_path_factory, df, as_csv):
    root = tmp_path_factory.mktemp("preds")
    path = root / ("preds.csv" if as_csv else "preds.parquet")
    if as_csv:
        df.to_csv(path, index=False)
    else:
        try:
            df.to_parquet(path)
        except (ValueError, TypeError, OverflowError):  # a column pyarrow cannot type (mixed text and numbers)
            assume(False)
    solution = comp / "comp" / "solution.csv"
    results = {
        "evaluate": glr("evaluate", path, "--solution", solution, "--json"),
        "write-submission": glr("write-submission", path, "--data-dir", comp / "comp", "--out", root / "sub.csv"),
        "rescore": glr("rescore", path, comp / "inliers.parquet", "--policy", "identity", "--out", root / "r.parquet"),
        "ensemble": glr("ensemble", path, "--out", root / "e.parquet"),
    }
    codes = {name: code for name, (code, _) in results.items()}
    event(f"predictions: {'accepted' if codes['evaluate'] == 0 else 'refused'}")
    assert len(set(codes.values())) == 1, (codes, results, df)  # all accept or all refuse
    if codes["evaluate"] != 0:
        messages = {msg for _, msg in results.values()}
        assert len(messages) == 1, messages  # and they say the same thing
        assert not (root / "sub.csv").exists()
        return
    # accepted: the written submission scores what evaluate scored, and the identity rescore keeps it
    gap = json.loads(results["evaluate"][1])["gap"]
    assert json.loads(glr("gap", root / "sub.csv", solution, "--json")[1])["gap"] == gap
    assert json.loads(glr("evaluate", root / "r.parquet", "--solution", solution, "--json")[1])["gap"] == gap
    check_before_upload(root / "sub.csv", data_dir=comp / "comp")
    ensembled = pd.read_parquet(root / "e.parquet")
    assert (ensembled["score"] <= df["score"].astype(float).max() + 1e-6).all()


# ------------------------------------------------------------------ policy files

POLICY_KEYS = {  # the module docstring's keys, written out independently of tuning.policy
    "top": {"format", "version", "kind", "aggregator", "edges", "bands", "k", "a", "b", "floor", "swap", "frequency",
            "study"},
    "band": {"k", "demote_below", "demote", "demote_to", "promote_at", "promote_to"},
    "swap": {"margin"}, "frequency": {"max_share", "factor"},
}
JSON_VALUES = ["NaN", "Infinity", "-Infinity", "1e400", "-1", "0", "1000", "true", "null", '"3"', "[]", "{}", "0.5",
               "2", '"max"', '"factor"']


def _objects(policy: dict):
    """(kind of object, the object) for every object of a policy document."""
    yield "top", policy
    for band in policy.get("bands") or []:
        yield "band", band
    for key in ("swap", "frequency"):
        if isinstance(policy.get(key), dict):
            yield key, policy[key]


@st.composite
def corrupted_policy(draw) -> str:
    policy = {**seed_rules(), "swap": {"margin": 3}, "frequency": {"max_share": 0.4, "factor": 0.5}}
    objects = list(_objects(policy))
    _, obj = objects[draw(st.integers(0, len(objects) - 1))]
    key = draw(st.sampled_from(sorted(obj)))
    op = draw(st.sampled_from(["typo", "delete", "value", "value", "value", "extra", "cut", "none"]))
    marker = "\u0000VALUE\u0000"
    if op == "typo":
        at = draw(st.integers(0, len(key) - 1))
        obj[key[:at] + key[at + 1:] or "x"] = obj.pop(key)
    elif op == "delete":
        del obj[key]
    elif op in ("value", "extra"):
        obj[key if op == "value" else draw(st.sampled_from(["promote", "edge", "K", "notes"]))] = marker
    text = json.dumps(policy).replace(json.dumps(marker), draw(st.sampled_from(JSON_VALUES)))
    return text[: draw(st.integers(0, len(text)))] if op == "cut" else text


MISSPELT = json.dumps(seed_rules()).replace('"promote_at": 10', '"promte_at": 10')


@PROPERTY
@given(text=corrupted_policy())
@example(text=MISSPELT)  # was read as "never promote"
@example(text=json.dumps(seed_rules()).replace('"demote_to": 0.0', '"demote_to": NaN'))
@example(text=json.dumps(seed_rules()))  # the valid one
def test_a_corrupted_policy_is_refused_in_one_line_or_means_what_it_says(comp, tmp_path_factory, text):
    root = tmp_path_factory.mktemp("policy")
    (root / "policy.json").write_text(text)
    preds = root / "preds.parquet"
    pd.DataFrame({"id": np.repeat(IDS, 2), "landmark_id": [5, 6, 7, 8, 3, 4, 10, 9, 11, 12],
                  "score": np.array([0.9, 0.05, 0.4, 0.3, 0.7, 0.1, 0.55, 0.2, 0.35, 0.3], dtype=np.float32),
                  "rank": [0, 1] * 5}).to_parquet(preds)
    code, out = glr("rescore", preds, comp / "inliers.parquet", "--policy", root / "policy.json",
                    "--out", root / "r.parquet")
    event(f"policy: {'accepted' if code == 0 else 'refused'}")
    if code != 0:
        assert out.startswith(f"{root / 'policy.json'}: "), out
        return
    policy = json.loads(text)  # accepted: strict JSON, every key a documented one, the result sound
    for kind, obj in _objects(policy):
        assert set(obj) <= POLICY_KEYS[kind], (kind, obj)
    rescored = pd.read_parquet(root / "r.parquet")
    assert np.isfinite(rescored["score"]).all() and (rescored["score"] >= 0).all()
