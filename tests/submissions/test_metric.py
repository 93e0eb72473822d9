"""GAP against a slow, obviously-correct reference; accuracy; bootstrap; paired bootstrap."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from submissions.errors import UserError
from submissions.metric import (
    _gap_from_counts,
    _harmonic,
    cumulative_gap,
    evaluate,
    evaluate_predictions,
    gap,
    gap_curve,
    gap_score,
    is_correct,
    paired_bootstrap,
    score,
    sorted_gap,
)

SETTINGS = settings(max_examples=150, derandomize=True, deadline=None)


# ------------------------------------------------------------------------------ the reference


def reference_gap(preds: dict, truth: dict, usage: dict, which: str = "all") -> tuple[float, int, int]:
    """The competitions' GAP, written as plainly as possible: (gap, n_correct, M).

    preds: id -> (landmark, confidence); truth: id -> tuple of landmarks; usage: id -> Usage.
    Order: sort by id, then stably by confidence descending (tensorflow/models DELF metrics.py)."""

    def counted(i):
        u = usage[i]
        if u == "Ignored":
            return False
        return which == "all" or u == which or u == "All"

    scored = {i: t for i, t in truth.items() if counted(i)}
    m = sum(1 for t in scored.values() if len(t) > 0)
    items = sorted(((i, lc[0], lc[1]) for i, lc in preds.items() if i in scored), key=lambda x: x[0])
    items.sort(key=lambda x: -x[2])
    hits, total, s = 0, 0, 0.0
    for i, landmark, _ in items:
        total += 1
        if landmark in scored[i]:
            hits += 1
            s += hits / total
    return (s / m if m else 0.0), hits, m


def frames(preds: dict, truth: dict, usage: dict, order: list | None = None, extra: dict | None = None):
    """Canonical submission (every solution id, in `order`, plus `extra` ids) and solution frames."""
    ids = order if order is not None else list(truth)
    rows = [(i, *preds.get(i, (None, np.nan))) for i in ids]
    rows += [(i, lid, c) for i, (lid, c) in (extra or {}).items()]
    sub = pd.DataFrame(rows, columns=["id", "landmark_id", "confidence"])
    sub["landmark_id"] = sub["landmark_id"].astype("Int64")
    sub["confidence"] = sub["confidence"].astype("float64")
    sol = pd.DataFrame({"id": list(truth), "landmarks": [tuple(truth[i]) for i in truth], "usage": [usage[i] for i in truth]})
    return sub, sol


# few distinct confidences and landmarks -> many ties and many hits
confidences = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.5000000001, 1.0]), st.floats(0, 1e6, allow_nan=False))
landmark = st.integers(0, 4)


@st.composite
def competitions(draw, fixed_width: bool = False):
    # equal-width ids take the numpy hash join; others Arrow's hash table
    names = st.text("abc0", min_size=3, max_size=3) if fixed_width else st.text("abcÿé0", min_size=1, max_size=4)
    ids = draw(st.lists(names, unique=True, max_size=30))
    truth, usage, preds = {}, {}, {}
    for i in ids:
        truth[i] = tuple(draw(st.lists(landmark, max_size=3, unique=True)))  # () = non-landmark query
        usage[i] = draw(st.sampled_from(["Public", "Private", "Ignored", "All"]))
        if draw(st.booleans()) or draw(st.booleans()):  # 3/4 of queries get a prediction
            preds[i] = (draw(landmark), draw(confidences))
    order = draw(st.permutations(ids))
    extra = {f"zz{k}": (draw(landmark), draw(confidences)) for k in range(draw(st.integers(0, 3)))}  # not in solution
    return preds, truth, usage, order, extra


@SETTINGS
@given(st.booleans().flatmap(competitions), st.sampled_from(["all", "Public", "Private"]))
def test_gap_equals_reference(comp, which):
    preds, truth, usage, order, extra = comp
    sub, sol = frames(preds, truth, usage, order, extra)
    expected, hits, m = reference_gap(preds, truth, usage, which)
    assert gap(sub, sol, usage=which) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    report = evaluate(sub, sol, usage=which)
    assert report["gap"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert report["n_landmark_queries"] == m
    assert report["n_correct"] == hits
    assert report["accuracy"] == pytest.approx(hits / m if m else 0.0)


@SETTINGS
@given(
    st.lists(st.tuples(st.sampled_from([0.1, 0.2, 0.3]) | st.floats(-5, 5), st.booleans()), max_size=60),
    st.integers(0, 80),
    st.randoms(use_true_random=False),
)
def test_gap_score_equals_reference_with_tie_key(rows, extra_m, rnd):
    conf = np.array([r[0] for r in rows], dtype=float)
    correct = np.array([r[1] for r in rows], dtype=bool)
    m = int(correct.sum()) + extra_m
    keys = list(range(len(rows)))
    rnd.shuffle(keys)
    items = sorted(zip(keys, conf, correct))
    items.sort(key=lambda x: -x[1])
    hits, s = 0, 0.0
    for pos, (_, _, ok) in enumerate(items, 1):
        if ok:
            hits += 1
            s += hits / pos
    expected = s / m if m else 0.0
    assert gap_score(conf, correct, m, tie_key=np.array(keys, dtype=np.int64)) == pytest.approx(expected, rel=1e-12)
    # without tie_key the arrays' order is the tie order: pre-sorted by key, same answer
    by_key = np.argsort(keys)
    assert gap_score(conf[by_key], correct[by_key], m) == pytest.approx(expected, rel=1e-12)


@SETTINGS
@given(
    st.lists(st.tuples(st.sampled_from([0.1, 0.2, 0.3]) | st.floats(-5, 5), st.booleans()), max_size=60),
    st.integers(0, 80),
)
def test_gap_curve_is_the_gap_of_every_prefix_and_ends_at_gap_score_exactly(rows, extra_m):
    conf = np.array([r[0] for r in rows], dtype=float)
    correct = np.array([r[1] for r in rows], dtype=bool)
    m = int(correct.sum()) + extra_m
    key = np.arange(len(rows))[::-1].copy()
    thresholds, curve = gap_curve(conf, correct, m, tie_key=key)
    assert len(thresholds) == len(curve) == len(rows) and (np.diff(thresholds) <= 0).all()
    if len(rows) and m:
        assert curve[-1] == gap_score(conf, correct, m, tie_key=key)  # exactly: the same sum
        order = np.lexsort((key, -conf))
        for i in range(len(rows)):  # each point: GAP of the predictions ranked at or above it
            assert curve[i] == pytest.approx(sorted_gap(correct[order][: i + 1], m), rel=1e-12, abs=1e-15)
    assert (cumulative_gap(correct, 0) == 0).all()


@SETTINGS
@given(st.booleans().flatmap(competitions))
def test_is_correct_is_membership_in_the_true_landmarks(comp):
    preds, truth, _, _, _ = comp
    ids = list(truth)
    lids = np.array([preds[i][0] if i in preds else np.nan for i in ids], dtype=float)
    want = [i in preds and preds[i][0] in truth[i] for i in ids]
    assert is_correct(lids, [truth[i] for i in ids]).tolist() == want  # NaN: no prediction, never correct
    # several candidates per query ([n, C]): each compared with its own query's landmarks
    cands = np.array([[k, k + 1, 4 - k] for k in range(len(ids))], dtype=np.int64) % 5
    got = is_correct(cands, pd.Series([truth[i] for i in ids], dtype=object))
    assert got.tolist() == [[int(c) in truth[i] for c in row] for i, row in zip(ids, cands)]


def test_evaluate_predictions_scores_the_top1_rows_from_frames_or_files(tmp_path):
    from submissions.format import read_solution, submission_from_predictions
    from submissions.tables import write_predictions

    preds = pd.DataFrame({"id": ["q1", "q1", "q2", "q3"], "landmark_id": [7, 8, 9, 7],
                          "score": [0.9, 0.1, 0.8, 0.3], "rank": [0, 1, 0, 0]})
    (tmp_path / "solution.csv").write_text("id,landmarks,Usage\nq1,7,Public\nq2,8 9,Private\nq3,,Public\n"
                                           "q4,7,Ignored\n")
    write_predictions(preds, tmp_path / "p.parquet")
    sol = read_solution(tmp_path / "solution.csv")
    want = evaluate(submission_from_predictions(preds), sol)
    assert want["gap"] == pytest.approx(1.0) and want["accuracy"] == pytest.approx(1.0)
    assert evaluate_predictions(tmp_path / "p.parquet", tmp_path / "solution.csv") == want
    assert evaluate_predictions(preds, sol) == want
    assert evaluate_predictions(preds, sol, usage="Public")["n_queries"] == 2
    with pytest.raises(UserError, match="no such file"):
        evaluate_predictions(tmp_path / "nope.parquet", sol)


def test_report_gap_curve_ends_at_the_gap_the_metric_reports(tmp_path):
    """The report's GAP-vs-confidence curve (pipeline.run.report) ranks and sums with the metric's code:
    its end is exactly `gap()`, ties, several true landmarks, Ignored rows and unpredicted queries included."""
    from pipeline.run.report import gap_curve as report_gap_curve
    from pipeline.run.report import top1_with_truth
    from submissions.format import read_solution, submission_from_predictions

    rng = np.random.default_rng(5)
    n = 300
    ids = [f"q{k:04d}" for k in rng.permutation(n)]
    truth = [" ".join(map(str, rng.choice(6, size=int(rng.integers(0, 3)), replace=False))) for _ in ids]
    usage = rng.choice(["Public", "Private", "Ignored"], size=n, p=[0.45, 0.45, 0.1])
    pd.DataFrame({"id": ids, "landmarks": truth, "Usage": usage}).to_csv(tmp_path / "solution.csv", index=False)
    kept = rng.random(n) < 0.9  # some queries get no prediction
    preds = pd.DataFrame({"id": np.array(ids)[kept], "landmark_id": rng.integers(0, 6, kept.sum()),
                          "score": np.round(rng.random(kept.sum()), 1), "rank": 0})  # rounded: many ties
    top = top1_with_truth(preds.astype({"score": "float32"}), tmp_path / "solution.csv")
    thresholds, curve = report_gap_curve(top)
    expected = gap(submission_from_predictions(preds.astype({"score": "float32"})),
                   read_solution(tmp_path / "solution.csv"))
    assert 0 < expected < 1 and curve[-1] == expected
    assert (np.diff(thresholds) <= 0).all()


def test_known_values_and_tie_rule():
    truth = {"a": (1,), "b": (2,), "c": (), "d": (4, 5)}
    usage = dict.fromkeys(truth, "Public")
    # ranked a(0.9, right), c(0.8, wrong: non-landmark), then b and d tied at 0.5 -> b first (id order)
    preds = {"a": (1, 0.9), "c": (3, 0.8), "b": (2, 0.5), "d": (7, 0.5)}
    sub, sol = frames(preds, truth, usage)
    assert gap(sub, sol) == pytest.approx((1 / 1 + 2 / 3) / 3)
    # d right (its second true landmark) but ranked after b by id: (1 + 2/3 + 3/4) / 3
    preds["d"] = (5, 0.5)
    sub, sol = frames(preds, truth, usage)
    assert gap(sub, sol) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # b wrong and d right: the tie order decides, d comes after b -> P = 2/4 at d
    preds["b"] = (9, 0.5)
    sub, sol = frames(preds, truth, usage)
    assert gap(sub, sol) == pytest.approx((1 + 2 / 4) / 3)
    assert evaluate(sub, sol)["accuracy"] == pytest.approx(2 / 3)


def test_all_right_all_wrong_and_no_predictions():
    truth = {f"q{i}": ((i % 3,) if i % 4 else ()) for i in range(20)}
    usage = dict.fromkeys(truth, "Private")
    right = {i: (t[0], 1.0 / (k + 1)) for k, (i, t) in enumerate(truth.items()) if t}
    assert gap(*frames(right, truth, usage)) == pytest.approx(1.0)
    wrong = {i: (7, 0.5) for i in truth}
    assert gap(*frames(wrong, truth, usage)) == 0.0
    assert gap(*frames({}, truth, usage)) == 0.0
    assert gap(*frames(right, truth, usage), usage="Public") == 0.0  # no Public rows: M = 0
    # a confident wrong prediction on a non-landmark query costs precision
    costly = dict(right, q0=(1, 2.0))
    assert gap(*frames(costly, truth, usage)) < 1.0


def test_gap_score_is_fast_enough_for_tuning_loops():
    rng = np.random.default_rng(0)
    conf, correct = rng.random(100_000), rng.random(100_000) < 0.5
    gap_score(conf, correct, 100_000)
    import time

    t = time.perf_counter()
    for _ in range(5):
        gap_score(conf, correct, 100_000)
    assert (time.perf_counter() - t) / 5 < 0.1  # a per-row Python loop takes far longer


def test_hash_join_matches_ids_exactly():
    """Equal-width ids in another order, ids absent from the solution, and duplicates."""
    truth = {f"{k:04x}": (k % 3,) for k in range(50)}
    usage = dict.fromkeys(truth, "Public")
    preds = {i: (t[0], k / 50) for k, (i, t) in enumerate(truth.items()) if k % 5}
    order = sorted(truth, reverse=True)
    extra = {"ffff": (1, 0.99), "fffe": (0, 0.98)}
    sub, sol = frames(preds, truth, usage, order, extra)
    expected, hits, m = reference_gap(preds, truth, usage)
    assert gap(sub, sol) == pytest.approx(expected) and evaluate(sub, sol)["n_ignored_predictions"] == 2
    with pytest.raises(UserError, match="submission has duplicate ids"):
        gap(pd.concat([sub, sub.iloc[[3]]]), sol)
    with pytest.raises(UserError, match="solution has duplicate ids"):
        gap(sub, pd.concat([sol, sol.iloc[[3]]]))


def test_errors():
    truth = {"a": (1,), "b": (2,)}
    sub, sol = frames({"a": (1, 0.5)}, truth, dict.fromkeys(truth, "Public"))
    with pytest.raises(UserError, match="duplicate"):
        gap(pd.concat([sub, sub]), sol)
    with pytest.raises(UserError, match="usage"):
        gap(sub, sol, usage="secret")
    with pytest.raises(UserError, match="landmarks"):
        gap(sub, sol.drop(columns="landmarks"))
    with pytest.raises(UserError, match="duplicate"):
        gap(sub.iloc[:1], pd.concat([sol, sol]))
    bad = sub.copy()
    bad.loc[0, "confidence"] = np.inf
    with pytest.raises(UserError, match="confidence"):
        gap(bad, sol)
    assert gap(sub, sol, usage="PUBLIC") == gap(sub, sol, usage="public") == 0.5


# ------------------------------------------------------------------------------ bootstrap


@settings(max_examples=60, derandomize=True, deadline=None)
@given(competitions(), st.integers(0, 2**32 - 1))
def test_resample_gap_equals_gap_of_the_materialised_resample(comp, seed):
    preds, truth, usage, order, extra = comp
    sub, sol = frames(preds, truth, usage, order, extra)
    s = score(sub, sol)
    if s.n_queries == 0:
        return
    rng = np.random.default_rng(seed)
    counts = np.bincount(rng.integers(0, s.n_queries, s.n_queries), minlength=s.n_queries)
    # materialise: each prediction repeated counts[query] times; copies tie with their own id only
    scored_ids = [i for i in truth if usage[i] != "Ignored"]
    id_rank = {i: r for r, i in enumerate(sorted(scored_ids))}
    qid = np.array(scored_ids, dtype=object)[s.query]
    reps = counts[s.query]
    conf = np.repeat(s.confidence, reps)
    correct = np.repeat(s.correct, reps)
    key = np.repeat(np.array([id_rank[i] for i in qid], dtype=np.int64), reps)
    m = int(counts[s.is_landmark].sum())
    expected = gap_score(conf, correct, m, tie_key=key)
    assert _gap_from_counts(s, counts, _harmonic(s.n_queries)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _random_case(n=400, seed=1):
    rng = np.random.default_rng(seed)
    ids = [f"{k:05d}" for k in range(n)]
    truth = {i: ((int(rng.integers(0, 5)),) if rng.random() < 0.8 else ()) for i in ids}
    usage = {i: ("Public" if rng.random() < 0.5 else "Private") for i in ids}
    noisy = {i: (int(rng.integers(0, 5)), float(rng.random())) for i in ids}
    better = {i: ((t[0] if t and rng.random() < 0.7 else int(rng.integers(0, 5))), float(rng.random())) for i, t in truth.items()}
    return truth, usage, noisy, better


def test_bootstrap_interval_is_seeded_and_sane():
    truth, usage, noisy, better = _random_case()
    sub, sol = frames(better, truth, usage)
    a = evaluate(sub, sol, bootstrap=200, seed=3)
    b = evaluate(sub, sol, bootstrap=200, seed=3)
    c = evaluate(sub, sol, bootstrap=200, seed=4)
    assert a == b
    assert a["gap_ci"] != c["gap_ci"]
    lo, hi = a["gap_ci"]
    assert 0 <= lo < a["gap"] < hi <= 1
    narrow = evaluate(sub, sol, bootstrap=200, seed=3, confidence_level=0.5)["gap_ci"]
    assert lo <= narrow[0] <= narrow[1] <= hi


def test_paired_bootstrap():
    truth, usage, noisy, better = _random_case()
    sub_a, sol = frames(noisy, truth, usage)
    sub_b, _ = frames(better, truth, usage)
    r = paired_bootstrap(sub_a, sub_b, sol, n=300, seed=0)
    assert r["gap_a"] == pytest.approx(gap(sub_a, sol)) and r["gap_b"] == pytest.approx(gap(sub_b, sol))
    assert r["delta"] == pytest.approx(r["gap_b"] - r["gap_a"]) and r["delta"] > 0.2
    assert r["p_value"] == 0.0 and 0 < r["delta_ci"][0] < r["delta"] < r["delta_ci"][1]
    reverse = paired_bootstrap(sub_b, sub_a, sol, n=300, seed=0)
    assert reverse["p_value"] == 1.0 and reverse["delta_ci"] == pytest.approx([-x for x in r["delta_ci"][::-1]])
    same = paired_bootstrap(sub_a, sub_a, sol, n=50, seed=0)
    assert same["delta"] == 0.0 and same["delta_ci"] == [0.0, 0.0] and same["p_value"] == 1.0
    # a tiny, noisy difference is not significant
    almost = dict(noisy)
    first = next(i for i, t in truth.items() if t)
    almost[first] = (truth[first][0], 0.5)
    close = paired_bootstrap(sub_a, frames(almost, truth, usage)[0], sol, n=300, seed=0)
    assert close["p_value"] > 0.05
