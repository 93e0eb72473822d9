"""`glr tune`: planted signal vs no signal on held-out queries, resume after kill -9, two processes
on one journal storage, RDB storage, plots, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from submissions.errors import UserError
from tuning.policy import identity, seed_rules
from tuning.search import PolicyRejected, tune
from tuning.split import split_parts
from tuning.storage import open_storage, recover_dead_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)
GLR = Path(sys.executable).with_name("glr")


def make_tables(n=1500, classes=40, cands=3, refs=5, signal=True, seed=0):
    """Validation predictions, inliers and solution. With a signal, the true class gets many inliers
    (Poisson 25), a wrong class or a non-landmark few (Poisson 2); without, every candidate gets
    Poisson 8 whatever its correctness. Scores barely separate right from wrong, as in the study."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"q{i:05d}" for i in range(n)], dtype=object)
    has = rng.random(n) < 0.6
    truth = rng.integers(0, classes, n)
    lm = np.stack([rng.permutation(classes)[:cands] for _ in range(n)])
    right = has & (rng.random(n) < 0.5)
    fix = right & ~(lm[:, 0] == truth)
    lm[fix, 1:] = np.where(lm[fix, 1:] == truth[fix, None], lm[fix, :1], lm[fix, 1:])
    lm[fix, 0] = truth[fix]
    score = np.sort(rng.random((n, cands)), axis=1)[:, ::-1] * 0.9 + 0.05
    score[right, 0] = np.minimum(1.0, score[right, 0] + 0.05)
    correct = (lm == truth[:, None]) & has[:, None]
    lam = np.where(correct, 25.0, 2.0) if signal else np.full(correct.shape, 8.0)
    inl = rng.poisson(np.repeat(lam[:, :, None], refs, axis=2))
    preds = pd.DataFrame({"id": np.repeat(ids, cands), "landmark_id": lm.ravel(), "score": score.ravel().astype(np.float32),
                          "rank": np.tile(np.arange(cands, dtype=np.int16), n)})
    inliers = pd.DataFrame({"id": np.repeat(ids, cands * refs), "landmark_id": np.repeat(lm.ravel(), refs),
                            "ref_id": [f"r{k}" for k in range(n * cands * refs)], "inliers": inl.ravel().astype(np.int32)})
    solution = pd.DataFrame({"id": ids, "landmarks": [str(t) if h else "" for t, h in zip(truth, has)],
                             "Usage": np.where(rng.random(n) < 0.5, "Public", "Private")})
    return preds, inliers, solution


def write_tables(tmp_path, **kw):
    preds, inliers, solution = make_tables(**kw)
    preds.to_parquet(tmp_path / "preds.parquet")
    inliers.to_parquet(tmp_path / "inliers.parquet")
    solution.to_csv(tmp_path / "solution.csv", index=False)
    return tmp_path / "preds.parquet", tmp_path / "inliers.parquet", tmp_path / "solution.csv"


def complete_trials(storage: str, study: str):
    s = optuna.load_study(study_name=study, storage=open_storage(storage, "unused.json"))
    return s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), s


@pytest.mark.slow
def test_planted_signal_beats_identity_and_seed_rules_on_held_out(tmp_path):
    preds, inliers, solution = write_tables(tmp_path)
    res = tune(preds, inliers, solution, tmp_path / "policy.json", trials=60, bootstrap=300)
    assert res["verdict"] == "gain", res["message"]
    assert res["holdout"]["delta_ci"][0] > 0.05
    # on the held-out part, compare the written policy with identity and the study's seed rules
    _, hold = split_parts(preds, inliers, solution, holdout=0.3, seed=0)
    written = json.loads((tmp_path / "policy.json").read_text())
    tuned, ident, seed = hold.gap(written), hold.gap(identity()), hold.gap(seed_rules())
    assert tuned == pytest.approx(res["holdout"]["after"]["gap"])
    assert tuned > ident + 0.1 and tuned > seed + 0.02, (tuned, ident, seed)
    assert written["study"]["trials"] == 60
    # plots beside the policy, as PNG
    for name in ("history", "importance", "threshold"):
        png = tmp_path / f"policy.{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_no_signal_gives_no_held_out_gain_and_says_so(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, signal=False, seed=1)
    args = ["tune", str(preds), str(inliers), "--solution", str(solution), "--out", str(tmp_path / "p.json"),
            "--trials", "40"]
    r = CliRunner().invoke(cli, args)
    if r.exit_code == 0:  # written: the gain must be reported as noise
        assert "within noise" in r.output, r.output
    else:  # refused: it lost on the held-out part, and nothing was written
        assert isinstance(r.exception, PolicyRejected), r.output
        assert "loses on the held-out part" in str(r.exception)
        assert not (tmp_path / "p.json").exists()
        r = CliRunner().invoke(cli, args + ["--force", "--json"])
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        assert res["message"].startswith("WARNING") and (tmp_path / "p.json").exists()
    res = json.loads(CliRunner().invoke(cli, args + ["--force", "--json", "--no-plots"]).stdout)
    assert res["verdict"] in ("noise", "loss")
    lo, hi = res["holdout"]["delta_ci"]
    assert lo <= 0.0  # no gain beyond noise
    assert res["holdout"]["delta"] < 0.02


def test_seed_rules_and_identity_presets_are_evaluated_not_searched(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=400)
    r = CliRunner().invoke(cli, ["tune", str(preds), str(inliers), "--solution", str(solution), "--out",
                                 str(tmp_path / "seed.json"), "--policy", "seed-rules", "--force"])
    assert r.exit_code == 0, r.output
    assert "tuning part" in r.output and "held-out part" in r.output and "->" in r.output
    written = json.loads((tmp_path / "seed.json").read_text())
    assert {k: v for k, v in written.items() if k != "study"} == seed_rules()
    assert not (tmp_path / "seed.optuna.journal").exists()
    res = tune(preds, inliers, solution, tmp_path / "id.json", policy="identity", bootstrap=50)
    assert res["holdout"]["delta"] == 0.0 and res["verdict"] == "noise"


def test_study_resumes_and_few_trials_skip_importance(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=300)
    out = tmp_path / "p.json"
    tune(preds, inliers, solution, out, trials=6, bootstrap=20, study="s")
    assert not (tmp_path / "p.importance.png").exists()  # too few trials for importances
    assert (tmp_path / "p.history.png").exists() and (tmp_path / "p.threshold.png").exists()
    res = tune(preds, inliers, solution, out, trials=9, bootstrap=20, study="s", plots=False)
    assert res["trials"] == 9
    trials, _ = complete_trials(str(tmp_path / "p.optuna.journal"), "s")
    assert [t.number for t in trials] == list(range(9))
    assert trials[0].user_attrs["start"] == "identity" and trials[1].user_attrs["start"] == "seed-rules"


@pytest.mark.slow
def test_kill_minus_9_then_rerun_continues_without_losing_trials(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=600)
    journal = str(tmp_path / "p.optuna.journal")
    cmd = [str(GLR), "tune", str(preds), str(inliers), "--solution", str(solution), "--out", str(tmp_path / "p.json"),
           "--study", "k", "--no-plots", "--quiet"]
    proc = subprocess.Popen(cmd + ["--trials", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.5)
            if os.path.exists(journal):
                try:
                    if len(complete_trials(journal, "k")[0]) >= 15:
                        break
                except KeyError:  # study not created yet
                    pass
            assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before, _ = complete_trials(journal, "k")
    values = {t.number: t.value for t in before}
    n = len(before)
    assert n >= 15
    r = subprocess.run(cmd + ["--trials", str(n + 5), "--force"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    after, study = complete_trials(journal, "k")
    assert len(after) == n + 5
    assert all(values[t.number] == t.value for t in after if t.number in values)  # none lost or changed
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))  # the killed trial was failed …
    for failed in study.get_trials(states=(optuna.trial.TrialState.FAIL,)):  # … and re-queued with its params
        assert any(t.user_attrs.get("retry_of") == failed.number and failed.params.items() <= t.params.items()
                   for t in after)


@pytest.mark.slow
def test_two_processes_share_one_journal_study(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=1000)
    journal = str(tmp_path / "shared.journal")
    procs = [
        subprocess.Popen([str(GLR), "tune", str(preds), str(inliers), "--solution", str(solution), "--out",
                          str(tmp_path / f"p{i}.json"), "--storage", journal, "--study", "shared", "--trials", "150",
                          "--seed", "0", "--no-plots", "--force", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    trials, _ = complete_trials(journal, "shared")
    assert 150 <= len(trials) <= 151
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2  # both processes ran trials of the one study
    numbers = sorted(t.number for t in trials)
    assert len(set(numbers)) == len(numbers)


def _tune_json(tmp_path, name, preds, inliers, solution, hash_seed):
    """`glr tune --json` in its own process and fresh storage; the result and the written policy
    with this run's folder taken out of the paths."""
    d = tmp_path / name
    d.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "GLR_QUIET": "1"}
    r = subprocess.run([str(GLR), "tune", str(preds), str(inliers), "--solution", str(solution), "--out",
                        str(d / "p.json"), "--trials", "40", "--seed", "3", "--no-plots", "--force", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (d / "p.optuna.journal").exists()  # its own storage
    return r.stdout.replace(str(d), "RUN"), (d / "p.json").read_text().replace(str(d), "RUN")


def test_fresh_sequential_runs_with_one_seed_give_identical_results(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=500, seed=4)
    a = _tune_json(tmp_path, "a", preds, inliers, solution, hash_seed=1)
    b = _tune_json(tmp_path, "b", preds, inliers, solution, hash_seed=2)  # other str hash order too
    res = json.loads(a[0])
    assert res["trials"] == 40 and res["best_trial"] >= 2 and "delta_ci" in res["holdout"]  # TPE chose it
    assert a == b  # every GAP, interval, p-value, trial number and the policy JSON, to the last digit


def test_split_does_not_depend_on_the_solution_row_order(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=300, seed=5)
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(solution, dtype=str, keep_default_na=False).sample(frac=1, random_state=7).to_csv(shuffled, index=False)
    parts = [split_parts(preds, inliers, sol, holdout=0.3, seed=2) for sol in (solution, shuffled)]
    for mine, theirs in zip(parts[0], parts[1]):
        assert list(mine.data.ids) == list(theirs.data.ids)
        assert mine.n_landmark_queries == theirs.n_landmark_queries
        assert mine.gap(seed_rules()) == theirs.gap(seed_rules())
    res = [tune(preds, inliers, sol, tmp_path / f"{i}.json", trials=6, bootstrap=30, plots=False, force=True, seed=2)
           for i, sol in enumerate((solution, shuffled))]
    for key in ("study", "tune", "holdout", "best_trial"):
        assert res[0][key] == res[1][key], key


def test_jobs_two_processes_and_rdb_storage(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=300)
    res = tune(preds, inliers, solution, tmp_path / "j.json", trials=40, jobs=2, bootstrap=20, plots=False, force=True)
    trials, _ = complete_trials(str(tmp_path / "j.optuna.journal"), res["study"])
    assert len(trials) >= 40 and len({t.user_attrs["worker"] for t in trials}) == 2
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    res = tune(preds, inliers, solution, tmp_path / "r.json", trials=5, storage=url, bootstrap=20, plots=False, force=True)
    assert res["storage"] == url and res["trials"] == 5
    res = tune(preds, inliers, solution, tmp_path / "r.json", trials=7, storage=url, bootstrap=20, plots=False, force=True)
    assert res["trials"] == 7
    assert open_storage(url, "unused.json").get_heartbeat_interval() == 30  # dead workers' trials are retried
    trials, _ = complete_trials(url, res["study"])
    assert len(trials) == 7


def test_bad_input_is_a_clear_error(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=100)
    base = ["tune", str(preds), str(inliers), "--solution", str(solution), "--out", str(tmp_path / "p.json")]
    bad = pd.read_parquet(inliers)
    bad.loc[3, "id"] = "ghost"
    bad.to_parquet(tmp_path / "bad_inliers.parquet")
    r = CliRunner().invoke(cli, base[:2] + [str(tmp_path / "bad_inliers.parquet")] + base[3:])
    assert r.exit_code != 0 and isinstance(r.exception, UserError)
    assert "bad_inliers.parquet: row 3: query id 'ghost' is not in" in str(r.exception)
    pd.read_parquet(preds).drop(columns="score").to_parquet(tmp_path / "noscore.parquet")
    r = CliRunner().invoke(cli, ["tune", str(tmp_path / "noscore.parquet")] + base[2:])
    assert isinstance(r.exception, UserError) and "lacks column(s) score" in str(r.exception)
    other = pd.read_csv(solution, dtype=str, keep_default_na=False)
    other["id"] = "x" + other["id"]
    other.to_csv(tmp_path / "other.csv", index=False)
    r = CliRunner().invoke(cli, base[:3] + ["--solution", str(tmp_path / "other.csv")] + base[5:])
    assert isinstance(r.exception, UserError) and "none of the 100 query ids" in str(r.exception)
    r = CliRunner().invoke(cli, base + ["--trials", "0"])
    assert isinstance(r.exception, UserError) and "--timeout" in str(r.exception)
    with pytest.raises(UserError, match="unknown scheme"):
        tune(preds, inliers, solution, tmp_path / "p.json", storage="redis://localhost/0")


def losing_tables(tmp_path, n=400):
    """Tables where the inliers help on the tuning part but mislead on the held-out part (correct
    candidates get few inliers, wrong ones many), so a rule trusting them loses there."""
    preds, inliers, solution = write_tables(tmp_path, n=n)
    _, hold = split_parts(preds, inliers, solution, holdout=0.3, seed=0)
    table = pd.read_parquet(inliers)
    held = table["id"].isin(set(hold.data.ids))
    table.loc[held, "inliers"] = np.maximum(0, 27 - table.loc[held, "inliers"])
    table.to_parquet(inliers)
    return preds, inliers, solution


def test_a_losing_policy_is_a_verdict_not_an_error(tmp_path):
    preds, inliers, solution = losing_tables(tmp_path)
    out = tmp_path / "p.json"
    res = tune(preds, inliers, solution, out, policy="seed-rules", bootstrap=50)
    assert res["verdict"] == "loss" and res["accepted"] is False and res["written"] == []
    assert "loses on the held-out part" in res["message"] and "not written" in res["message"]
    assert not out.exists() and not list(tmp_path.glob("p.*.png"))
    res = tune(preds, inliers, solution, out, policy="seed-rules", bootstrap=50, force=True, plots=False)
    assert res["accepted"] is False and res["written"] == [str(out)] and out.exists()
    assert res["message"].startswith("WARNING: the policy loses on the held-out part")


def test_glr_tune_refuses_a_losing_policy_with_one_line_and_exit_1(tmp_path):
    preds, inliers, solution = losing_tables(tmp_path)
    r = subprocess.run([str(GLR), "tune", str(preds), str(inliers), "--solution", str(solution), "--out",
                        str(tmp_path / "p.json"), "--policy", "seed-rules", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: the tuned bands policy loses on the held-out part")
    assert "p.json not written" in r.stderr and not (tmp_path / "p.json").exists()


def test_a_misspelt_storage_url_is_an_error_not_a_verdict(tmp_path):
    preds, inliers, solution = write_tables(tmp_path, n=100)
    with pytest.raises(UserError, match="unknown scheme 'postgresq'") as e:
        tune(preds, inliers, solution, tmp_path / "p.json", storage="postgresq://x", trials=5, bootstrap=10)
    assert not isinstance(e.value, PolicyRejected)
    assert not (tmp_path / "p.json").exists()


def test_trial_of_a_dead_process_is_failed_and_requeued(tmp_path):
    import socket

    storage = open_storage(None, tmp_path / "p.json")
    study = optuna.create_study(study_name="d", storage=storage, direction="maximize")
    dead_pid = subprocess.Popen(["true"])  # a pid that no longer runs
    dead_pid.wait()
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead.set_user_attr("worker", f"{socket.gethostname()}:{dead_pid.pid}")
    assert recover_dead_trials(study, storage) == 1
    states = {t.number: t.state for t in study.get_trials()}
    assert states[alive.number] == optuna.trial.TrialState.RUNNING  # its process (this one) still runs
    assert states[dead.number] == optuna.trial.TrialState.FAIL
    (queued,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert queued.user_attrs["retry_of"] == dead.number
    assert queued.system_attrs["fixed_params"] == {"x": dead.params["x"]}  # re-run with the same parameters
    assert recover_dead_trials(study, storage) == 0  # idempotent
    rdb = open_storage(f"sqlite:///{tmp_path / 'o.db'}", "unused.json")  # heartbeats retry there: left alone
    assert recover_dead_trials(optuna.create_study(study_name="d", storage=rdb), rdb) == 0


@pytest.mark.parametrize("kind", ["bands", "blend"])
def test_each_searched_kind_writes_its_policy(tmp_path, kind):
    preds, inliers, solution = write_tables(tmp_path, n=400)
    res = tune(preds, inliers, solution, tmp_path / "p.json", policy=kind, trials=25, bootstrap=50, plots=False)
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["kind"] == kind == res["chosen"] and written["version"] == 1
    assert res["holdout"]["after"]["gap"] > res["holdout"]["before"]["gap"]  # planted signal
