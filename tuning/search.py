"""`glr tune`: an Optuna study (TPE, seeded) that chooses a rescoring policy's parameters on GAP.

The validation queries of `solution.csv` are split (seeded, stratified by landmark / non-landmark)
into a tuning part, the only one the study sees, and a held-out part that says whether the gain is
real. Every search space contains the identity policy (thresholds whose range includes "never
fires"), and the identity (and, for bands, the study's seed rules) are enqueued as the first trials,
so the best trial is never worse than not rescoring on the tuning part.

Storage: by default an Optuna journal file beside the policy (`policy.optuna.journal`): an
interrupted study resumes where it stopped and several processes (`--jobs`) share it without
"database is locked". A trial whose process died (kill -9) is failed and its parameters re-queued
when the next `glr tune` on this machine opens the study. Any Optuna RDB URL (`postgresql://…`,
`mysql://…`, `sqlite:///x.db`) lets `glr tune` processes on several machines share one study; those
run with heartbeats, and a trial whose worker died is retried (RetryFailedTrialCallback).
`--trials N` is the study's total of finished trials, so re-running continues to N.

Determinism: with `--jobs 1` and no `--timeout`, the same input tables (same content, any row order
of the solution), `--seed` and `--holdout` on a fresh study give the same trials, chosen policy and
printed GAPs / intervals on every run and machine: the split and both bootstraps are seeded, TPE is
seeded and sequential (its parameter order is sorted, not hash order), ties of the best trial go to
the earliest. Not reproducible run-to-run: `--jobs N>1` (workers sample concurrently with
constant_liar, each seeing whatever trials have finished by then, and the total can overshoot
`--trials` by up to N-1), `--timeout` (how many trials fit depends on the machine and its load),
several processes or machines sharing one `--storage`, and a study interrupted and resumed (the
sampler restarts from its seed; the killed trial is re-run under a new number). Each of these still
reports honestly the policy it chose; for a reproducible figure use `--jobs 1 --trials N`. The inliers
table's row order is part of its meaning (K = the first K references per class), not noise.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.errors import UserError
from tuning.policy import (AGGREGATORS, DEMOTE_MODES, FORMAT, VERSION, Prepared, apply_policy, identity,
                           load_policy, prepare, save_policy, seed_rules)

POLICIES = ("auto", "bands", "blend", "seed-rules", "identity")
SEARCHED = ("auto", "bands", "blend")
N_BANDS = 4  # like the study: low, medium, high, top
BOOTSTRAP = 1000
JOURNAL_LOCK_GRACE_S = 10  # a lock left by a killed writer is broken after this long


# ------------------------------------------------------------------------------ data


@dataclass
class Part:
    """One part of the validation queries (tuning or held-out), ready for trials."""

    data: Prepared  # queries of this part that have predictions, in id order
    correct: np.ndarray  # [n, C] candidate is one of the query's landmarks
    n_landmark_queries: int  # M of this part (queries with a landmark, predicted or not)
    solution: pd.DataFrame  # rows of solution.csv of this part (for evaluate / bootstrap)

    def gap(self, policy: dict) -> float:
        """GAP of this part under `policy` (a trial's objective)."""
        from submissions.metric import sorted_gap

        chosen, conf = apply_policy(policy, self.data)
        order = rank_order(conf)  # gap_score's ranking, sorted once (gap_score would sort again)
        correct = self.correct[:, 0] if policy.get("swap") is None else self.correct[np.arange(self.data.n), chosen]
        return sorted_gap(correct[order], self.n_landmark_queries)

    def submission(self, policy: dict) -> pd.DataFrame:
        """Canonical one-per-query submission of this part under `policy`."""
        chosen, conf = apply_policy(policy, self.data)
        lm = self.data.landmark[np.arange(self.data.n), chosen]
        return pd.DataFrame({"id": pd.Series(self.data.ids, dtype="str"),
                             "landmark_id": pd.array(lm, dtype="Int64"), "confidence": conf})


def rank_order(conf: np.ndarray) -> np.ndarray:
    """Order of queries by confidence descending, ties by position (= query id order) ascending.

    Same order as gap_score's (ties by array order), ~10x faster than a stable argsort for 100k
    queries: the float32 confidence's bits (monotone for values >= 0) and the position are packed
    into one uint64 key and sorted with numpy's (SIMD) unstable sort; keys are unique, so stability
    is not needed.
    """
    c32 = conf.astype(np.float32) + np.float32(0.0)  # -0.0 -> 0.0
    if c32.size and (c32.min() < 0 or not np.isfinite(c32).all()):
        return np.argsort(-conf, kind="stable")
    bits = c32.view(np.uint32).astype(np.uint64)
    key = ((np.uint64(0xFFFFFFFF) - bits) << np.uint64(32)) | np.arange(len(c32), dtype=np.uint64)
    return (np.sort(key) & np.uint64(0xFFFFFFFF)).astype(np.int64)


@dataclass
class Space:
    """Data-dependent ranges of the search space (same data → same space, so studies resume)."""

    kmax: int
    hi: int  # inlier thresholds range over 0..hi; hi + 1 means "never"
    n_queries: int
    grid: np.ndarray  # score quantiles at 0, 0.001, …, 1 of the tuning part's top scores

    def value(self, u: float) -> float:
        """The score at quantile u of the tuning part's top scores."""
        return float(np.interp(u, np.linspace(0.0, 1.0, len(self.grid)), self.grid))

    def quantile(self, value: float) -> float:
        """Inverse of `value` (for enqueuing policies given in score units)."""
        return float(np.clip(np.interp(value, self.grid, np.linspace(0.0, 1.0, len(self.grid))), 0.0, 1.0))

    @classmethod
    def of(cls, data: Prepared) -> "Space":
        top = data.score[:, 0]
        grid = np.quantile(top, np.linspace(0.0, 1.0, 1001)) if len(top) else np.zeros(1001)
        hi = int(np.ceil(data.max_inliers(0.99))) + 1
        return cls(kmax=data.kmax, hi=max(2, min(hi, 1000)), n_queries=max(1, data.n), grid=grid)


def _solution(solution) -> pd.DataFrame:
    from submissions.format import read_solution

    if isinstance(solution, pd.DataFrame):
        return solution
    return read_solution(solution)


def _correct(data: Prepared, sol: pd.DataFrame) -> np.ndarray:
    """[n, C] bool: the candidate is one of the query's ground-truth landmarks."""
    n, C = data.landmark.shape
    s = sol.set_index("id")["landmarks"].reindex(pd.Index(data.ids, dtype="str"))
    lengths = np.array([len(t) for t in s.to_numpy()], dtype=np.int64)
    flat = np.fromiter((x for t in s.to_numpy() for x in t), dtype=np.int64, count=int(lengths.sum()))
    truth = pd.MultiIndex.from_arrays([np.repeat(np.arange(n), lengths), flat])
    cand = pd.MultiIndex.from_arrays([np.repeat(np.arange(n), C), data.landmark.ravel()])
    return cand.isin(truth).reshape(n, C)


def split_parts(preds, inliers, solution, holdout: float = 0.3, seed: int = 0) -> tuple[Part, Part | None]:
    """The tuning and held-out parts of the validation queries (seeded, stratified by whether
    the query has a landmark). `Ignored` rows of the solution are left out of both. The draw is
    over the scored ids in id order, so the split depends on the solution's content and `seed`,
    not on the order of its rows."""
    if not 0.0 <= holdout < 1.0:
        raise UserError(f"--holdout {holdout}: must be at least 0 and below 1")
    data = prepare(preds, inliers)
    src = "the solution" if isinstance(solution, pd.DataFrame) else str(solution)
    sol_all = _solution(solution)
    sol = sol_all[sol_all["usage"] != "Ignored"]
    sol = sol.iloc[np.argsort(sol["id"].astype(str).to_numpy(), kind="stable")].reset_index(drop=True)
    scored = pd.Index(sol["id"].astype(str))
    where = scored.get_indexer(pd.Index(data.ids, dtype="str"))
    unknown = where < 0
    if unknown.any():
        if unknown.all():
            raise UserError(f"predictions: none of the {data.n} query ids is a scored id of {src}: "
                            f"is this the validation predictions table of that solution?")
        # predictions for Ignored rows are left out; any other unknown id means mismatched files
        stray = ~pd.Index(data.ids, dtype="str").isin(sol_all["id"].astype(str))
        if stray.any():
            raise UserError(f"predictions: {int(stray.sum())} query id(s) are not in {src} "
                            f"(e.g. {data.ids[stray][0]!r}): tune on the validation predictions of that solution")
        known = np.flatnonzero(~unknown)
        data, where = data.subset(known), where[known]
    has_landmark = np.array([len(t) > 0 for t in sol["landmarks"]], dtype=bool)
    rng = np.random.default_rng(seed)
    is_holdout = np.zeros(len(sol), dtype=bool)
    for group in (np.flatnonzero(has_landmark), np.flatnonzero(~has_landmark)):
        k = int(round(holdout * len(group)))
        if k:
            is_holdout[rng.choice(group, size=k, replace=False)] = True
    correct = _correct(data, sol)

    def part(mask: np.ndarray) -> Part:
        rows = np.flatnonzero(mask[where])
        return Part(data.subset(rows), correct[rows], int((has_landmark & mask).sum()),
                    sol[mask].reset_index(drop=True))

    tune_part = part(~is_holdout)
    if tune_part.data.n == 0:
        raise UserError("the tuning part has no predicted query: more validation queries or a smaller --holdout")
    return tune_part, (part(is_holdout) if is_holdout.any() else None)


# ------------------------------------------------------------------------------ search space


def suggest_policy(trial, kind: str, space: Space) -> dict:
    """Sample a policy of `kind` ("bands", "blend" or "auto") from `trial`; identity is reachable."""
    if kind == "auto":
        kind = trial.suggest_categorical("kind", ["bands", "blend"])
    hi = space.hi
    pol: dict = {"format": FORMAT, "version": VERSION, "kind": kind,
                 "aggregator": trial.suggest_categorical("aggregator", list(AGGREGATORS))}
    if kind == "bands":
        edges_u = sorted(trial.suggest_float(f"edge{i}", 0.0, 1.0) for i in range(N_BANDS - 1))
        pol["edges"] = [space.value(u) for u in edges_u]
        mode = trial.suggest_categorical("demote", list(DEMOTE_MODES))
        bands = []
        for b in range(N_BANDS):
            demote_to = trial.suggest_float(f"b{b}_demote_to", 0.0, 1.0)
            promote_at = trial.suggest_int(f"b{b}_promote_at", 1, hi + 1)
            bands.append({
                "k": trial.suggest_int(f"b{b}_k", 1, space.kmax),
                "demote_below": trial.suggest_int(f"b{b}_demote_below", 0, hi),
                "demote": mode,
                "demote_to": demote_to if mode == "factor" else space.value(demote_to),
                "promote_at": None if promote_at > hi else promote_at,
                "promote_to": space.value(trial.suggest_float(f"b{b}_promote_to", 0.0, 1.0)),
            })
        pol["bands"] = bands
    else:
        pol["k"] = trial.suggest_int("k", 1, space.kmax)
        pol["a"] = trial.suggest_float("a", 0.0, 2.0)
        pol["b"] = trial.suggest_float("b", 0.0, float(hi))
        pol["floor"] = trial.suggest_float("floor", 0.0, 1.0)
    pol["swap"] = ({"margin": trial.suggest_int("swap_margin", 1, hi)}
                   if trial.suggest_categorical("swap", [False, True]) else None)
    if trial.suggest_categorical("frequency", [False, True]):
        pol["frequency"] = {
            "max_share": trial.suggest_float("freq_share", min(0.5, 1.0 / space.n_queries), 0.5, log=True),
            "factor": trial.suggest_float("freq_factor", 0.0, 1.0),
        }
    else:
        pol["frequency"] = None
    return pol


def identity_params(kind: str, space: Space) -> dict:
    """Trial parameters that make `suggest_policy` return a policy ranking like the identity."""
    params = {"aggregator": "max", "swap": False, "frequency": False}
    if kind == "auto":
        params["kind"] = "bands"
    if kind in ("bands", "auto"):
        params.update({f"edge{i}": (i + 1) / N_BANDS for i in range(N_BANDS - 1)}, demote="factor")
        for b in range(N_BANDS):
            params.update({f"b{b}_k": 1, f"b{b}_demote_below": 0, f"b{b}_demote_to": 1.0,
                           f"b{b}_promote_at": space.hi + 1, f"b{b}_promote_to": 0.0})
    else:
        params.update(k=1, a=0.0, b=0.0, floor=1.0)
    return params


def seed_rule_params(space: Space, kind: str) -> dict:
    """Trial parameters closest to `seed_rules()` (edges and values mapped to score quantiles)."""
    rules = seed_rules()
    params = {"aggregator": rules["aggregator"], "swap": False, "frequency": False}
    if kind == "auto":
        params["kind"] = "bands"
    params.update({f"edge{i}": space.quantile(e) for i, e in enumerate(rules["edges"])})
    params["demote"] = "factor"
    for b, band in enumerate(rules["bands"]):
        to = band["demote_to"] if band["demote"] == "factor" else (0.0 if band["demote_to"] <= 0 else 0.5)
        at = band["promote_at"]
        params.update({
            f"b{b}_k": min(band["k"], space.kmax),
            f"b{b}_demote_below": min(int(band["demote_below"]), space.hi),
            f"b{b}_demote_to": float(to),
            f"b{b}_promote_at": space.hi + 1 if at is None else min(int(at), space.hi),
            f"b{b}_promote_to": space.quantile(band["promote_to"]),
        })
    return params


# ------------------------------------------------------------------------------ storage


def default_storage(out: str | os.PathLike) -> str:
    """The journal file beside the policy: `policy.json` → `policy.optuna.journal`."""
    out = Path(out)
    return str(out.with_name(out.stem + ".optuna.journal"))


def open_storage(storage: str | None, out: str | os.PathLike):
    """An Optuna storage from `--storage`: None → journal file beside `out`; a path or
    `journal:PATH` → journal file; an RDB URL (sqlite:///, postgresql://, mysql://) → RDBStorage
    with heartbeat and retry of trials whose worker died."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileSymlinkLock

    spec = storage or default_storage(out)
    if "://" in spec:
        scheme = spec.split("://", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql"):
            raise UserError(f"--storage {spec!r}: unknown scheme {scheme!r}; use a journal file path, "
                            f"sqlite:///FILE.db or postgresql://USER@HOST/DB")
        kwargs = {"connect_args": {"timeout": 60}} if scheme == "sqlite" else {}
        try:  # Optuna >= 4.9 renamed the retry callback
            from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

            retry = {"heartbeat_stale_trial_callback": Retry(max_retry=3)}
        except ImportError:
            from optuna.storages import RetryFailedTrialCallback as Retry

            retry = {"failed_trial_callback": Retry(max_retry=3)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(spec, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=90, **retry)
        except (ImportError, ModuleNotFoundError) as e:
            raise UserError(f"--storage {spec!r}: the database driver is not installed ({e})") from None
        except Exception as e:  # sqlalchemy raises many kinds
            raise UserError(f"--storage {spec!r}: cannot open ({e.__class__.__name__}: {e})") from None
    path = Path(spec[len("journal:"):] if spec.startswith("journal:") else spec)
    if path.is_dir():
        raise UserError(f"--storage {path}: is a directory, expected a journal file path or a database URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)
    return JournalStorage(_journal_backend_class()(str(path), lock_obj=lock))


def _journal_backend_class():
    """Optuna's journal file backend without the fsync after every record.

    A trial writes ~30 records (one per parameter); an fsync each made a trial cost ~150 ms here,
    10x the trial itself. Records still reach the file (the OS page cache) before the call returns,
    under the same lock, so a killed process (kill -9) loses nothing it wrote; only an operating
    system crash could lose the last records — at worst the last trials, which a re-run redoes.
    """
    from optuna.storages.journal import JournalFileBackend

    try:
        from optuna.storages.journal._file import get_lock_file
    except ImportError:  # a future Optuna moved it: keep its own (fsyncing) backend
        return JournalFileBackend

    class UnsyncedJournalFileBackend(JournalFileBackend):
        def append_logs(self, logs):
            with get_lock_file(self._lock):
                data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
                with open(self._file_path, "ab") as f:
                    f.write(data)

    return UnsyncedJournalFileBackend


def storage_label(storage: str | None, out) -> str:
    spec = storage or default_storage(out)
    if "://" in spec and "@" in spec:  # never echo a password
        head, tail = spec.split("://", 1)
        spec = f"{head}://…@{tail.rsplit('@', 1)[1]}"
    return spec


def _worker_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study) -> int:
    """Journal storages have no heartbeat: fail RUNNING trials whose process on this machine is gone
    (killed) and re-queue their parameters, so no trial is lost. Returns how many were re-queued."""
    from optuna.storages import JournalStorage
    from optuna.trial import TrialState

    if not isinstance(study._storage, JournalStorage):
        return 0
    host = socket.gethostname()
    requeued = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag = str(t.user_attrs.get("worker", ""))
        h, _, pid = tag.rpartition(":")
        if tag:
            if h != host or _alive(int(pid)):
                continue
        else:  # died before tagging itself: only trust age
            start = t.datetime_start
            if start is None or (time.time() - start.timestamp()) < 120:
                continue
        try:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except Exception:  # another process got there first
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        requeued += 1
    return requeued


def study_name(policy: str, parts: tuple[Part, Part | None], holdout: float, seed: int) -> str:
    """A name derived from the inputs: another table or split never mixes trials into this study."""
    h = hashlib.sha256()
    for part in parts:
        if part is None:
            continue
        d = part.data
        for arr in (d.ids.astype(str), d.landmark, d.score, part.correct, *(d.agg[a] for a in AGGREGATORS)):
            h.update(np.ascontiguousarray(arr).tobytes() if arr.dtype != object else "\0".join(arr).encode())
    h.update(f"{policy}|{holdout}|{seed}|v{VERSION}|{N_BANDS}".encode())
    return f"glr-{policy}-{h.hexdigest()[:12]}"


# ------------------------------------------------------------------------------ the study


_TASK: dict = {}  # what forked worker processes inherit: the tuning part and its space


def _objective(trial) -> float:
    trial.set_user_attr("worker", _worker_tag())
    part: Part = _TASK["part"]
    policy = suggest_policy(trial, _TASK["kind"], _TASK["space"])
    trial.set_user_attr("policy", policy)
    return part.gap(policy)


def _optimize(storage, name: str, seed: int, trials: int, timeout: float | None, callbacks=()) -> None:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(seed))
    cbs = list(callbacks)
    if trials:
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if done >= trials:
            return
        cbs.append(MaxTrialsCallback(trials, states=(TrialState.COMPLETE,)))
    study.optimize(_objective, n_trials=None, timeout=timeout, callbacks=cbs, gc_after_trial=False)


def make_sampler(seed: int):
    """Seeded multivariate TPE, grouped for the conditional spaces of `auto`/swap/frequency.

    Independent TPE splits the history once per parameter: ~30 parameters made trial 500 cost
    ~100 ms in the sampler alone; the multivariate sampler splits it once per trial (and models
    the parameters jointly, which suits band edges and thresholds that act together). With
    several workers, constant_liar keeps them from sampling the same point.
    """
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=20, multivariate=True, group=True,
                                          constant_liar=True)


def _child(storage_spec, out, name, seed, trials, timeout) -> None:
    try:
        _optimize(open_storage(storage_spec, out), name, seed, trials, timeout)
    except KeyboardInterrupt:
        pass


def _evaluate(part: Part, policy: dict, bootstrap: int, seed: int) -> dict:
    from submissions.metric import evaluate, paired_bootstrap

    before = part.submission(identity())
    after = part.submission(policy)
    b = evaluate(before, part.solution, bootstrap=bootstrap, seed=seed)
    a = evaluate(after, part.solution, bootstrap=bootstrap, seed=seed)
    keep = ("gap", "gap_ci", "accuracy")
    out = {"n_queries": int(len(part.solution)), "n_landmark_queries": part.n_landmark_queries,
           "before": {k: b[k] for k in keep if k in b}, "after": {k: a[k] for k in keep if k in a}}
    if bootstrap > 0:
        p = paired_bootstrap(before, after, part.solution, n=bootstrap, seed=seed)
        out.update(delta=p["delta"], delta_ci=p["delta_ci"], p_value=p["p_value"])
    else:
        out.update(delta=a["gap"] - b["gap"])
    return out


def _verdict(h: dict) -> str:
    if h["delta"] < 0:
        return "loss"
    ci = h.get("delta_ci")
    if ci is not None and ci[0] > 0:
        return "gain"
    return "noise"


def _fmt(d: dict) -> str:
    ci = d.get("gap_ci")
    return f"{d['gap']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def summary_lines(result: dict) -> list[str]:
    """What `glr tune` prints: GAP before → after on both parts with their CIs, and the verdict."""
    lines = [f"policy: {result['policy']}" + (f" (study {result['study']}, {result['trials']} trials)"
                                              if result.get("study") else "")]
    for key, label in (("tune", "tuning part"), ("holdout", "held-out part")):
        p = result.get(key)
        if not p:
            continue
        lines.append(f"{label:<14} GAP {_fmt(p['before'])} -> {_fmt(p['after'])}  "
                     f"({p['n_queries']} queries; delta {p['delta']:+.4f}"
                     + (f" [{p['delta_ci'][0]:+.4f}, {p['delta_ci'][1]:+.4f}], p={p['p_value']:.3f}" if "delta_ci" in p else "")
                     + ")")
    lines.append(result["message"])
    if result.get("inliers_not_candidates"):
        lines.append(f"note: {result['inliers_not_candidates']} inlier rows are for classes that are not candidates "
                     f"of their query in the predictions and were ignored")
    return lines


def _message(verdict: str | None) -> str:
    return {
        None: "no held-out part (--holdout 0): the gain is not checked on unseen queries",
        "gain": "held-out gain is beyond noise (the 95% interval of the delta is above 0)",
        "noise": "held-out gain is within noise (the 95% interval of the delta includes 0): "
                 "the policy is not clearly better than not rescoring",
        "loss": "the policy loses on the held-out part",
    }[verdict]


def tune(
    preds,
    inliers,
    solution,
    out: str | os.PathLike,
    *,
    policy: str = "auto",
    trials: int | None = 200,
    timeout: float | None = None,
    storage: str | None = None,
    study: str | None = None,
    jobs: int = 1,
    holdout: float = 0.3,
    seed: int = 0,
    force: bool = False,
    plots: bool = True,
    bootstrap: int = BOOTSTRAP,
    progress: bool | None = None,
) -> dict:
    """Choose a rescoring policy on GAP with Optuna and write it to `out` (JSON) with PNG plots.

    `preds`, `inliers` and `solution` are paths or DataFrames (predictions / inliers tables,
    `read_solution` frame). `policy`: auto | bands | blend (searched) or seed-rules | identity
    (fixed, evaluated the same way so they can be compared). `trials` is the study's total of
    finished trials (0/None = until `timeout`). Returns GAP before/after on the tuning and held-out
    parts with bootstrap CIs, the held-out delta and verdict, the study and the written paths.
    Raises UserError (nothing written) when the policy loses on the held-out part, unless `force`.
    """
    import optuna
    from optuna.trial import TrialState

    if policy not in POLICIES:
        raise UserError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if policy in SEARCHED and not trials and not timeout:
        raise UserError("--trials 0 needs --timeout (otherwise the study never ends)")
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: must be at least 1")
    out = Path(out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune_part, hold_part = split_parts(preds, inliers, solution, holdout=holdout, seed=seed)
    result: dict = {"policy": policy, "out": str(out), "study": None, "storage": None, "trials": 0,
                    "inliers_not_candidates": tune_part.data.unmatched_inliers}

    if policy in SEARCHED:
        space = Space.of(tune_part.data)
        name = study or study_name(policy, (tune_part, hold_part), holdout, seed)
        st, label = open_storage(storage, out), storage_label(storage, out)
        try:
            s = optuna.create_study(study_name=name, storage=st, direction="maximize", load_if_exists=True)
        except Exception as e:
            raise UserError(f"--storage {label}: cannot create study {name!r} ({e})") from None
        if s.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise UserError(f"study {name!r} in {label} does not maximise: use another --study")
        if not s.get_trials(deepcopy=False):
            s.enqueue_trial(identity_params(policy, space), user_attrs={"start": "identity"})
            if policy in ("bands", "auto"):
                s.enqueue_trial(seed_rule_params(space, policy), user_attrs={"start": "seed-rules"})
        requeued = recover_dead_trials(s)
        _TASK.update(part=tune_part, kind=policy, space=space)
        bar = _progress_bar(s, trials, progress)
        try:
            children = []
            if jobs > 1:
                import multiprocessing as mp

                ctx = mp.get_context("fork")
                for i in range(1, jobs):
                    p = ctx.Process(target=_child, args=(storage, str(out), name, seed + i, trials, timeout), daemon=True)
                    p.start()
                    children.append(p)
            _optimize(st, name, seed, trials or 0, timeout, callbacks=[bar.callback] if bar else [])
            for p in children:
                p.join()
        finally:
            if bar:
                bar.close()
        s = optuna.load_study(study_name=name, storage=st)
        complete = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise UserError(f"study {name!r}: no trial finished (raise --timeout or --trials)")
        best = s.best_trial
        chosen = load_policy(best.user_attrs["policy"])
        chosen["study"] = {"name": name, "storage": label, "best_trial": best.number,
                           "trials": len(complete), "gap_tuning": best.value, "seed": seed, "holdout": holdout,
                           "searched": policy}
        result.update(study=name, storage=label, trials=len(complete), best_trial=best.number,
                      requeued=requeued)
    else:
        chosen = load_policy(policy)
        chosen["study"] = {"name": None, "preset": policy, "seed": seed, "holdout": holdout}
        s = None
    result["chosen"] = chosen["kind"]

    result["tune"] = _evaluate(tune_part, chosen, bootstrap, seed)
    verdict = None
    if hold_part is not None and hold_part.data.n:
        result["holdout"] = _evaluate(hold_part, chosen, bootstrap, seed + 1)
        verdict = _verdict(result["holdout"])
        chosen["study"]["gap_holdout"] = result["holdout"]["after"]["gap"]
    result["verdict"] = verdict or "unchecked"
    result["message"] = _message(verdict)
    if verdict == "loss":
        noise = " (within noise)" if result["holdout"].get("delta_ci", [0, 0])[0] < 0 < result["holdout"].get("delta_ci", [0, 0])[1] else ""
        if not force:
            h = result["holdout"]
            raise UserError(
                f"the tuned {chosen['kind']} policy loses on the held-out part{noise}: GAP {_fmt(h['before'])} -> "
                f"{_fmt(h['after'])} (delta {h['delta']:+.4f}); {out} not written. The inliers do not help GAP "
                f"here: keep the identity (--policy identity) or pass --force to write it anyway"
            )
        result["message"] = f"WARNING: {_message('loss')}{noise}; written anyway because of --force"
    save_policy(chosen, out)
    result["written"] = [str(out)]
    if plots:
        from tuning.plots import write_plots

        result["written"] += [str(p) for p in write_plots(s, chosen, tune_part, hold_part, out)]
    return result


class _Bar:
    def __init__(self, total, done):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total or None, initial=done, desc="tune", unit="trial", dynamic_ncols=True)
        self.best = None

    def callback(self, study, trial):
        self.bar.update(1)
        if trial.value is not None and (self.best is None or trial.value > self.best):
            self.best = trial.value
            self.bar.set_postfix(best=f"{self.best:.4f}")

    def close(self):
        self.bar.close()


def _progress_bar(study, trials, progress: bool | None):
    from optuna.trial import TrialState

    if progress is None:
        progress = sys.stderr.isatty() and os.environ.get("GLR_QUIET", "") in ("", "0")
    if not progress:
        return None
    return _Bar(trials, len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
