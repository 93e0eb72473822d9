"""The non-landmark signal and the policy's nonlandmark term: the signal equals a brute-force reference,
a planted signal makes tuning with the term beat tuning without it on the held-out part, policies
without the term are unchanged by the table, and bad tables / policies are one-line errors."""
from __future__ import annotations

import json

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.model.embeddings import normalise, write_embeddings
from pipeline.model.nonlandmark import nonlandmark_scores, write_nonlandmark
from submissions.errors import UserError
from tuning.policy import apply_policy, check_policy, identity, prepare, read_nonlandmark, rescore, seed_rules
from tuning.search import tune
from tuning.split import split_parts

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_tables(n=1200, classes=30, cands=3, refs=3, seed=0):
    """Validation predictions, inliers and solution as test_tune makes them without an inlier signal
    (Poisson 8 for every candidate: rescoring by inliers cannot help), plus a planted non-landmark
    signal: high (0.7 ± 0.12) for non-landmark queries, low (0.3 ± 0.12) for landmark ones."""
    from tests.tuning.test_tune import make_tables as tune_tables

    preds, inliers, solution = tune_tables(n=n, classes=classes, cands=cands, refs=refs, signal=False, seed=seed)
    has = (solution["landmarks"] != "").to_numpy()
    rng = np.random.default_rng(seed + 1)
    signal = np.clip(np.where(has, 0.3, 0.7) + rng.normal(0, 0.12, n), 0.0, 1.0)
    return preds, inliers, solution, pd.DataFrame({"id": solution["id"], "nonlandmark": signal})


# ------------------------------------------------------------------------------ the signal


def brute_force(q_ids, q, p_ids, p, k):
    sims = q.astype(np.float64) @ p.astype(np.float64).T
    sims[np.asarray(q_ids)[:, None] == np.asarray(p_ids)[None, :]] = -np.inf  # own row skipped
    top = -np.sort(-sims, axis=1)[:, :k]
    top = np.where(np.isneginf(top), 0.0, top)
    if top.shape[1] < k:
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])))
    return np.clip(top, 0, 1).mean(axis=1)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("self_pool", [False, True])
def test_scores_equal_brute_force(k, self_pool):
    rng = np.random.default_rng(k)
    q = normalise(rng.normal(size=(37, 8)))
    q_ids = [f"q{i}" for i in range(len(q))]
    if self_pool:  # the queries are their own pool: a query's own row must not count
        p, p_ids = q, q_ids
    else:
        p = normalise(rng.normal(size=(53, 8)))
        p_ids = [f"p{i}" for i in range(len(p))]
    got = nonlandmark_scores(q_ids, q, p_ids, p, k=k, block_size=7, query_block=5)
    assert list(got["id"]) == q_ids
    np.testing.assert_allclose(got["nonlandmark"], brute_force(q_ids, q, p_ids, p, k), atol=1e-6)
    assert got["nonlandmark"].between(0, 1).all() and got["nonlandmark"].std() > 0


def test_near_duplicate_gets_high_signal_and_small_pool_counts_missing_as_zero():
    rng = np.random.default_rng(3)
    pool = normalise(rng.normal(size=(2, 16)))
    q = normalise(np.vstack([pool[0] + 0.01 * rng.normal(size=16), rng.normal(size=16)]))
    got = nonlandmark_scores(["a", "b"], q, ["x", "y"], pool, k=1)["nonlandmark"].to_numpy()
    assert got[0] > 0.99 and got[1] < 0.6
    three = nonlandmark_scores(["a", "b"], q, ["x", "y"], pool, k=3)["nonlandmark"].to_numpy()
    np.testing.assert_allclose(three, brute_force(["a", "b"], q, ["x", "y"], pool, 3), atol=1e-6)
    with pytest.raises(UserError, match="pool is empty"):
        nonlandmark_scores(["a"], q[:1], [], np.zeros((0, 16), np.float32))


def test_cli_nonlandmark_then_rescore(tmp_path):
    rng = np.random.default_rng(0)
    preds, inliers, _, _ = make_tables(n=40)
    ids = sorted(preds["id"].unique())
    write_embeddings(tmp_path / "q.npy", ids, rng.normal(size=(len(ids), 8)))
    write_embeddings(tmp_path / "pool.npy", [f"p{i}" for i in range(10)], rng.normal(size=(10, 8)))
    preds.to_parquet(tmp_path / "preds.parquet")
    inliers.to_parquet(tmp_path / "inl.parquet")
    r = CliRunner().invoke(cli, ["nonlandmark", str(tmp_path / "q.npy"), str(tmp_path / "pool.npy"),
                                 "--out", str(tmp_path / "nl.parquet"), "--k", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["queries"] == len(ids)
    nl = read_nonlandmark(tmp_path / "nl.parquet")
    policy = {**identity(), "nonlandmark": {"above": float(np.median(nl["nonlandmark"])), "factor": 0.5}}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    base = [str(tmp_path / "preds.parquet"), str(tmp_path / "inl.parquet"), "--policy", str(tmp_path / "policy.json"),
            "--out", str(tmp_path / "out.parquet")]
    r = CliRunner().invoke(cli, ["rescore", *base])
    assert isinstance(r.exception, UserError) and "--nonlandmark" in str(r.exception)
    r = CliRunner().invoke(cli, ["rescore", *base, "--nonlandmark", str(tmp_path / "nl.parquet")])
    assert r.exit_code == 0, r.output
    out = pd.read_parquet(tmp_path / "out.parquet")
    top = out[out["rank"] == 0].set_index("id")["score"]
    before = preds[preds["rank"] == 0].set_index("id")["score"]
    high = nl.set_index("id")["nonlandmark"] >= policy["nonlandmark"]["above"]
    np.testing.assert_allclose(top[high.index[high]], before[high.index[high]] * np.float32(0.5), rtol=1e-6)
    np.testing.assert_array_equal(top[high.index[~high]], before[high.index[~high]])


# ------------------------------------------------------------------------------ the policy term


def test_policies_without_the_term_are_unchanged_by_the_table():
    preds, inliers, _, nl = make_tables(n=300)
    plain, with_table = prepare(preds, inliers), prepare(preds, inliers, nonlandmark=nl)
    for pol in (identity(), seed_rules(), {**seed_rules(), "frequency": {"max_share": 0.05, "factor": 0.3}},
                {**identity(), "aggregator": "mean", "k": 2, "swap": {"margin": 3}}):
        a, b = apply_policy(pol, plain), apply_policy(pol, with_table)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    pd.testing.assert_frame_equal(rescore(preds, inliers, "identity", nl), rescore(preds, inliers, "identity"))
    # the term at its neutral point (factor 1) is the identity too
    neutral = {**identity(), "nonlandmark": {"above": 0.0, "factor": 1.0}}
    np.testing.assert_array_equal(apply_policy(neutral, with_table)[1], apply_policy(identity(), plain)[1])


def test_term_demotes_exactly_the_queries_at_or_above_the_threshold():
    preds, inliers, _, nl = make_tables(n=200)
    d = prepare(preds, inliers, nonlandmark=nl)
    t = 0.5
    _, conf = apply_policy({**identity(), "nonlandmark": {"above": t, "factor": 0.25}}, d)
    s0 = d.score[:, 0].astype(np.float32).astype(np.float64)
    hit = d.extra["nonlandmark"] >= t
    assert 0 < hit.sum() < d.n
    np.testing.assert_array_equal(conf[~hit], s0[~hit])
    np.testing.assert_allclose(conf[hit], s0[hit] * 0.25, rtol=1e-6)


def test_planted_signal_tuning_with_the_term_beats_tuning_without_it_on_held_out(tmp_path):
    preds, inliers, sol, nl = make_tables()
    solution = tmp_path / "solution.csv"
    sol.to_csv(solution, index=False)
    kw = dict(policy="auto", trials=40, bootstrap=0, plots=False, force=True, seed=0)
    without = tune(preds, inliers, solution, tmp_path / "without.json", **kw)
    with_term = tune(preds, inliers, solution, tmp_path / "with.json", nonlandmark=nl, **kw)
    gap_without, gap_with = without["holdout"]["after"]["gap"], with_term["holdout"]["after"]["gap"]
    assert gap_with > gap_without + 0.03, (gap_with, gap_without)
    chosen = json.loads((tmp_path / "with.json").read_text())
    assert chosen["nonlandmark"] is not None and chosen["nonlandmark"]["factor"] < 1.0
    assert "nonlandmark" not in json.loads((tmp_path / "without.json").read_text())  # old space, old policies
    # the written policy gives the reported held-out GAP when re-applied to that part with the table
    _, hold = split_parts(preds, inliers, solution, holdout=0.3, seed=0)
    from tuning.policy import attach_nonlandmark

    attach_nonlandmark(hold.data, nl)
    assert hold.gap(chosen) == pytest.approx(gap_with)
    again = tune(preds, inliers, solution, tmp_path / "again.json", nonlandmark=nl, **kw)  # deterministic
    assert again["holdout"]["after"]["gap"] == gap_with


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("table, message", [
    (pd.DataFrame({"id": ["q00000"], "nonlandmark": [np.nan]}), r"row 0: column 'nonlandmark' is nan"),
    (pd.DataFrame({"id": ["q00000"], "nonlandmark": [1.5]}), "from 0 to 1"),
    (pd.DataFrame({"id": ["q00000"], "nonlandmark": [-0.1]}), "from 0 to 1"),
    (pd.DataFrame({"id": ["q00000"], "nonlandmark": ["high"]}), "'high'"),
    (pd.DataFrame({"id": ["q00000", "q00000"], "nonlandmark": [0.1, 0.2]}), "appears twice"),
    (pd.DataFrame({"id": ["q00000"], "signal": [0.1]}), "lacks column"),
    (pd.DataFrame({"id": [""], "nonlandmark": [0.1]}), "'id' is empty"),
])
def test_bad_nonlandmark_table_is_one_line(table, message):
    with pytest.raises(UserError, match=message) as e:
        read_nonlandmark(table)
    assert "\n" not in str(e.value)


def test_table_missing_a_query_and_file_errors(tmp_path):
    preds, inliers, _, nl = make_tables(n=50)
    with pytest.raises(UserError, match="1 query id.*'q00007'"):
        prepare(preds, inliers, nonlandmark=nl.drop(index=7))
    extra = pd.concat([nl, pd.DataFrame({"id": ["test-only"], "nonlandmark": [0.9]})])
    assert prepare(preds, inliers, nonlandmark=extra).extra["nonlandmark"].shape == (50,)  # extra ids ignored
    pd.DataFrame({"id": ["q00000"], "nonlandmark": [2.0]}).to_csv(tmp_path / "nl.csv", index=False)
    with pytest.raises(UserError, match=r"nl\.csv: row 0"):
        read_nonlandmark(tmp_path / "nl.csv")
    with pytest.raises(UserError, match="no such file"):
        read_nonlandmark(tmp_path / "missing.parquet")
    with pytest.raises(UserError, match="from 0 to 1"):
        write_nonlandmark(pd.DataFrame({"id": ["a"], "nonlandmark": [1.01]}), tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("term, message", [
    ({"above": 0.5, "factor": 0.5, "weight": 1}, r"unknown key 'weight'"),
    ({"abov": 0.5, "factor": 0.5}, r"did you mean 'above'"),
    ({"above": 1.5, "factor": 0.5}, r"'above' is 1.5, expected a number from 0.0 to 1.0"),
    ({"above": 0.5, "factor": -1}, r"'factor' is -1"),
    ({"above": 0.5, "factor": float("nan")}, "finite number"),
    ({"above": 0.5}, r"missing key 'factor'"),
    ("yes", "nonlandmark must be null or an object"),
])
def test_bad_nonlandmark_term_is_refused(term, message):
    for base in (identity(), seed_rules()):
        with pytest.raises(UserError, match=message):
            check_policy({**base, "nonlandmark": term})


def test_term_without_table_is_one_line_user_error():
    preds, inliers, _, _ = make_tables(n=30)
    pol = {**seed_rules(), "nonlandmark": {"above": 0.5, "factor": 0.5}}
    with pytest.raises(UserError, match="no non-landmark table") as e:
        apply_policy(check_policy(pol), prepare(preds, inliers))
    assert "\n" not in str(e.value)
