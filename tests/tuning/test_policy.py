"""Rescoring policies: the prepared inlier aggregates, each rule on hand-made queries, a per-query
reference implementation checked against the vectorised one, JSON round trips and bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from submissions.errors import UserError
from tuning.policy import (AGGREGATORS, apply_policy, check_policy, identity, load_policy, prepare, rescore,
                           save_policy, seed_rules)


def preds_table(rows):
    """rows: (id, landmark, score) in rank order per id."""
    df = pd.DataFrame(rows, columns=["id", "landmark_id", "score"])
    df["rank"] = df.groupby("id").cumcount()
    return df


def inliers_table(rows):
    """rows: (id, landmark, [counts per reference in order])."""
    out = [(q, lm, f"{q}-{lm}-{i}", c) for q, lm, counts in rows for i, c in enumerate(counts)]
    return pd.DataFrame(out, columns=["id", "landmark_id", "ref_id", "inliers"])


def test_prepare_aggregates_first_k_references_in_table_order():
    p = preds_table([("b", 1, 0.9), ("b", 2, 0.5), ("a", 3, 0.7)])
    inl = inliers_table([("b", 1, [4, 9, 1]), ("a", 3, [7])])
    d = prepare(p, inl)
    assert list(d.ids) == ["a", "b"]  # id order = the metric's tie order
    assert d.kmax == 3
    # query b (row 1), candidate 0: refs 4, 9, 1
    assert [float(d.agg["max"][k, 1, 0]) for k in range(3)] == [4, 9, 9]
    assert [float(d.agg["mean"][k, 1, 0]) for k in range(3)] == pytest.approx([4, 6.5, 14 / 3])
    assert [float(d.agg["second"][k, 1, 0]) for k in range(3)] == [0, 4, 4]
    # query a has one reference: the 2nd largest is 0, max stays 7 for every K
    assert float(d.agg["second"][2, 0, 0]) == 0 and float(d.agg["max"][2, 0, 0]) == 7
    # b's second candidate was not verified; a has no second candidate
    assert np.isnan(d.agg["max"][:, 1, 1]).all() and np.isnan(d.score[0, 1])


def test_identity_keeps_everything():
    p = preds_table([("q1", 5, 0.3), ("q1", 6, 0.2), ("q2", 7, 0.8)])
    out = rescore(p, inliers_table([("q1", 6, [50, 50])]), "identity")
    pd.testing.assert_frame_equal(
        out.sort_values(["id", "rank"]).reset_index(drop=True),
        p.astype({"score": "float32", "rank": "int16"}).sort_values(["id", "rank"]).reset_index(drop=True),
        check_dtype=False,
    )


def test_seed_rules_on_hand_made_queries():
    rows = [("low_few", 1, 0.30), ("low_many", 2, 0.30), ("low_k3", 3, 0.30), ("mid_few", 4, 0.50),
            ("high_ok", 5, 0.70), ("top_few", 6, 0.90), ("low_unverified", 7, 0.35)]
    inl = inliers_table([
        ("low_few", 1, [2, 1]),          # max over K=2 is 2 < 3 → 0
        ("low_many", 2, [3, 12]),        # 12 ≥ 10 → 0.6
        ("low_k3", 3, [1, 2, 100]),      # the 3rd reference is beyond K=2 → still demoted
        ("mid_few", 4, [4, 1]),          # medium band, < 5 → halved
        ("high_ok", 5, [6, 0]),          # ≥ 5: unchanged
        ("top_few", 6, [0, 0]),          # top band: never changed
    ])
    d = prepare(preds_table(rows), inl)
    chosen, conf = apply_policy(seed_rules(), d)
    got = dict(zip(d.ids, conf))
    assert (chosen == 0).all()
    assert got["low_few"] == 0.0 and got["low_k3"] == 0.0
    assert got["low_many"] == pytest.approx(0.6)
    assert got["mid_few"] == pytest.approx(0.25)
    assert got["high_ok"] == pytest.approx(0.7)
    assert got["top_few"] == pytest.approx(0.9)
    assert got["low_unverified"] == pytest.approx(0.35)


def test_swap_takes_the_clearly_better_verified_candidate():
    p = preds_table([("q", 10, 0.8), ("q", 20, 0.6), ("q", 30, 0.5), ("r", 10, 0.7), ("r", 20, 0.6)])
    inl = inliers_table([("q", 10, [2]), ("q", 20, [9]), ("q", 30, [30]), ("r", 10, [5]), ("r", 20, [8])])
    pol = {**identity(), "aggregator": "max", "k": 1, "swap": {"margin": 10}}
    out = rescore(p, inl, pol)
    top = out[out["rank"] == 0].set_index("id")
    assert top.loc["q", "landmark_id"] == 30  # 30 ≥ 2 + 10
    assert top.loc["q", "score"] == pytest.approx(0.8)  # the query keeps its top score
    assert top.loc["r", "landmark_id"] == 10  # 8 < 5 + 10: no swap
    q = out[out["id"] == "q"].sort_values("rank")
    assert list(q["landmark_id"]) == [30, 10, 20] and list(q["rank"]) == [0, 1, 2]


def test_frequency_demotes_a_catch_all_class():
    rows = [(f"q{i}", 99 if i < 6 else i, 0.9) for i in range(10)]
    pol = {**identity(), "frequency": {"max_share": 0.5, "factor": 0.1}}
    d = prepare(preds_table(rows), None)
    _, conf = apply_policy(pol, d)
    got = dict(zip(d.ids, conf))
    assert got["q0"] == pytest.approx(0.09) and got["q7"] == pytest.approx(0.9)


def test_blend_formula_and_identity_corner():
    p = preds_table([("q", 1, 0.8), ("u", 2, 0.4)])
    d = prepare(p, inliers_table([("q", 1, [10])]))
    pol = {**identity(), "kind": "blend", "aggregator": "max", "k": 1, "a": 0.5, "b": 6.0, "floor": 0.2}
    _, conf = apply_policy(pol, d)
    expected = 0.8 * (0.2 + 0.8 / (1 + np.exp(-0.5 * (10 - 6))))
    assert conf[0] == pytest.approx(expected, rel=1e-6)
    assert conf[1] == pytest.approx(0.4)  # not verified: unchanged
    _, same = apply_policy({**pol, "floor": 1.0}, d)
    assert same == pytest.approx([0.8, 0.4])


# ------------------------------------------------------------------ vectorised == per-query reference


def reference(policy, preds, inliers):
    """Slow, obvious per-query implementation of the documented semantics."""
    refs = {}
    for r in inliers.itertuples():
        refs.setdefault((r.id, r.landmark_id), []).append(r.inliers)
    ids = sorted(set(preds["id"]))
    n = len(ids)
    out = {}
    picks = {}

    def agg(vals, name, k):
        vals = vals[:k]
        if not vals:
            return None
        if name == "max":
            return max(vals)
        if name == "mean":
            return sum(vals) / len(vals)
        return sorted(vals)[-2] if len(vals) >= 2 else 0

    for q in ids:
        c = preds[preds["id"] == q].sort_values("rank")
        lms, scores = list(c["landmark_id"]), [float(np.float32(s)) for s in c["score"]]
        s0 = scores[0]
        if policy["kind"] == "bands":
            band = sum(1 for e in policy["edges"] if s0 >= e)
            k = policy["bands"][band]["k"]
        else:
            band, k = None, policy.get("k", 1)
        aggs = [agg(refs.get((q, lm), []), policy.get("aggregator", "max"), k) for lm in lms]
        pick = 0
        if policy.get("swap") and len(lms) > 1:
            top = aggs[0] or 0
            best_j, best = None, None
            for j in range(1, len(lms)):
                if aggs[j] is not None and (best is None or aggs[j] > best):
                    best_j, best = j, aggs[j]
            if best is not None and best >= top + policy["swap"]["margin"]:
                pick = best_j
        a = aggs[pick]
        conf = s0
        if policy["kind"] == "bands" and a is not None:
            b = policy["bands"][band]
            if a < b["demote_below"]:
                conf = conf * b["demote_to"] if b["demote"] == "factor" else min(conf, b["demote_to"])
            if b["promote_at"] is not None and a >= b["promote_at"]:
                conf = max(conf, b["promote_to"])
        elif policy["kind"] == "blend" and a is not None:
            conf = conf * (policy["floor"] + (1 - policy["floor"]) / (1 + np.exp(-policy["a"] * (a - policy["b"]))))
        out[q], picks[q] = conf, lms[pick]
    if policy.get("frequency"):
        counts = pd.Series(list(picks.values())).value_counts()
        for q in ids:
            if counts[picks[q]] > policy["frequency"]["max_share"] * n:
                out[q] *= policy["frequency"]["factor"]
    return out, picks


@st.composite
def cases(draw):
    n = draw(st.integers(1, 12))
    rows, inl = [], []
    for i in range(n):
        c = draw(st.integers(1, 3))
        lms = draw(st.lists(st.integers(0, 4), min_size=c, max_size=c, unique=True))
        scores = sorted(draw(st.lists(st.floats(0, 1, width=32), min_size=c, max_size=c)), reverse=True)
        for lm, s in zip(lms, scores):
            rows.append((f"q{i}", lm, s))
            if draw(st.booleans()):
                inl.append((f"q{i}", lm, draw(st.lists(st.integers(0, 30), min_size=1, max_size=4))))
    kind = draw(st.sampled_from(["bands", "blend", "identity"]))
    pol = {**identity(), "kind": kind, "aggregator": draw(st.sampled_from(AGGREGATORS))}
    if kind != "bands":  # bands have a k per band
        pol["k"] = draw(st.integers(1, 4))
    if kind == "bands":
        edges = sorted(draw(st.lists(st.floats(0, 1), min_size=0, max_size=3)))
        pol["edges"] = edges
        pol["bands"] = [{
            "k": draw(st.integers(1, 4)), "demote_below": draw(st.integers(0, 20)),
            "demote": draw(st.sampled_from(["factor", "value"])), "demote_to": draw(st.floats(0, 1)),
            "promote_at": draw(st.one_of(st.none(), st.integers(1, 25))), "promote_to": draw(st.floats(0, 1)),
        } for _ in range(len(edges) + 1)]
    elif kind == "blend":
        pol.update(a=draw(st.floats(0, 2)), b=draw(st.floats(0, 20)), floor=draw(st.floats(0, 1)))
    if draw(st.booleans()):
        pol["swap"] = {"margin": draw(st.integers(1, 15))}
    if draw(st.booleans()):
        pol["frequency"] = {"max_share": draw(st.floats(0.05, 0.9)), "factor": draw(st.floats(0, 1))}
    return preds_table(rows), inliers_table(inl), pol


@settings(max_examples=150, deadline=None)
@given(cases())
def test_vectorised_policy_equals_per_query_reference(case):
    preds, inliers, pol = case
    check_policy(pol)
    d = prepare(preds, inliers)
    chosen, conf = apply_policy(pol, d)
    want, picks = reference(pol, preds, inliers)
    for i, q in enumerate(d.ids):
        assert conf[i] == pytest.approx(float(np.float32(max(want[q], 0.0))), rel=1e-5, abs=1e-7), q
        assert d.landmark[i, chosen[i]] == picks[q], q


# ------------------------------------------------------------------ JSON and bad input


def test_policy_json_round_trip(tmp_path):
    path = save_policy(seed_rules(), tmp_path / "p.json")
    assert load_policy(path) == seed_rules()
    assert load_policy("seed-rules") == seed_rules()


def test_policy_of_another_version_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**seed_rules(), "version": 2}))
    with pytest.raises(UserError, match=r"old.json: policy version 2, but this glr reads version 1"):
        load_policy(path)
    broken = {**seed_rules()}
    del broken["bands"][1]["demote_to"]
    with pytest.raises(UserError, match=r"bands\[1\]: missing key 'demote_to'"):
        check_policy(broken)
    with pytest.raises(UserError, match="no such policy file"):
        load_policy(tmp_path / "nope.json")


def test_inliers_with_unknown_query_ids_are_refused():
    p = preds_table([("a", 1, 0.5)])
    with pytest.raises(UserError, match=r"row 1: query id 'zz' is not in predictions \(1 unknown query id\)"):
        prepare(p, inliers_table([("a", 1, [3]), ("zz", 1, [4])]))


def test_predictions_without_scores_or_with_negative_scores_are_refused():
    p = preds_table([("a", 1, 0.5)])
    with pytest.raises(UserError, match="lacks column.*score"):
        prepare(p.drop(columns="score"), None)
    p.loc[0, "score"] = -0.2
    with pytest.raises(UserError, match="negative"):
        prepare(p, None)


# ------------------------------------------------------------------ issue 15 class 7: wrong policy JSON


def _band0(**change) -> str:
    """seed_rules() as JSON text with bands[0] changed (None removes a key)."""
    pol = seed_rules()
    for key, value in change.items():
        if value is None:
            del pol["bands"][0][key]
        else:
            pol["bands"][0][key] = value
    return json.dumps(pol)


def _top(**change) -> str:
    return json.dumps({**seed_rules(), **change})


BAD_POLICIES = [
    # values JSON should not hold, and values out of their range
    (_band0(demote_to="NaNMARK"), "NaN is not a number JSON allows"),
    (_band0(promote_to="InfMARK"), "Infinity is not a number JSON allows"),
    (_band0(demote_below="-InfMARK"), "-Infinity is not a number JSON allows"),
    (_band0(demote_to="1e400MARK"), "bands[0]: key 'demote_to' is inf, expected a finite number"),
    (_band0(demote_to=-1), "bands[0]: key 'demote_to' is -1, expected a number >= 0.0"),
    (_band0(k=0), "bands[0]: k is 0, expected an integer from 1 to 16"),
    (_band0(k=1000), "bands[0]: k is 1000, expected an integer from 1 to 16"),
    (_band0(k=2.5), "bands[0]: k is 2.5, expected an integer"),
    (_band0(k=True), "bands[0]: k is True, expected an integer"),
    (_band0(demote_below="3"), "bands[0]: key 'demote_below' is '3', expected a finite number"),
    (_top(frequency={"max_share": 5, "factor": 0.5}), "frequency: key 'max_share' is 5, expected a number from 0.0 to 1.0"),
    (json.dumps({**identity(), "kind": "blend", "aggregator": "max", "k": 2, "a": 1, "b": 2, "floor": 2}),
     "key 'floor' is 2, expected a number from 0.0 to 1.0"),
    (_top(version=True), "policy version True"),
    (_top(edges=[0.4, "InfMARK", 0.8]), "Infinity is not a number JSON allows"),
    # misspelt or unknown keys: never silently "never promote"
    (_band0(promote_at=None, promte_at=10), "bands[0]: unknown key 'promte_at' (did you mean 'promote_at'?)"),
    (_band0(promote_at=None), "bands[0]: missing key 'promote_at'"),
    (_top(edgs=[0.5]), "unknown key 'edgs' (did you mean 'edges'?)"),
    (_top(k=3), "unknown key 'k'"),  # a bands policy has a k per band
    (_top(swap={"margn": 3}), "swap: unknown key 'margn' (did you mean 'margin'?)"),
    (_top(frequency={"max_share": 0.1, "factr": 0.5}), "frequency: unknown key 'factr' (did you mean 'factor'?)"),
    (_top(study="tuned by hand"), "study must be null or an object"),
    (_top()[:-1] + ', "swap": null}', "key 'swap' is given twice in one object"),
    # not a policy at all
    ('{"format": "glr-policy", "version": 1, "kind": "bands",', "line 1: not a JSON policy"),
    ("[1, 2]", "a policy is a JSON object, got list"),
]


@pytest.mark.parametrize("text, message", BAD_POLICIES)
def test_wrong_policy_json_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "policy.json"
    for mark, constant in (("\"NaNMARK\"", "NaN"), ("\"-InfMARK\"", "-Infinity"), ("\"InfMARK\"", "Infinity"),
                           ("\"1e400MARK\"", "1e400")):
        text = text.replace(mark, constant)
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_policy(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError):  # rescore reads the policy before any table
        rescore(preds_table([("a", 1, 0.5)]), None, str(path))


def test_policy_path_that_is_a_directory_or_not_text(tmp_path):
    (tmp_path / "policies").mkdir()
    with pytest.raises(UserError, match=r"policies: is a directory, expected a policy JSON file"):
        load_policy(tmp_path / "policies")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(UserError, match=r"bin.json: not a UTF-8 text file"):
        load_policy(tmp_path / "bin.json")


def test_every_policy_glr_writes_reads_back(tmp_path):
    """The strict checks refuse nothing glr itself writes: presets, and a tuned policy with its study record."""
    for name in ("identity", "seed-rules"):
        pol = load_policy(name)
        assert load_policy(save_policy(pol, tmp_path / f"{name}.json")) == pol
    tuned = {**seed_rules(), "swap": {"margin": 4}, "frequency": {"max_share": 0.2, "factor": 0.5},
             "study": {"name": "s", "storage": "j", "best_trial": 3, "trials": 10, "gap_holdout": 0.5}}
    assert load_policy(save_policy(tuned, tmp_path / "tuned.json")) == tuned
    blend = {**identity(), "kind": "blend", "aggregator": "mean", "k": 16, "a": 0.5, "b": 3, "floor": 0.0}
    assert load_policy(blend) == blend
