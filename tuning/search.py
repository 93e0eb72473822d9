"""`glr tune`: an Optuna study (TPE, seeded) that chooses a rescoring policy's parameters on GAP.

The validation queries of `solution.csv` are split (`tuning.split`: seeded, stratified by landmark /
non-landmark) into a tuning part, the only one the study sees, and a held-out part that says whether
the gain is real. Every search space (`tuning.space`) contains the identity policy, and the identity
(and, for bands, the study's seed rules) are enqueued as the first trials, so the best trial is never
worse than not rescoring on the tuning part. The study lives in a journal file beside the policy or
in a database (`tuning.storage`); `--trials N` is the study's total of finished trials, so re-running
continues to N.

The held-out check is a verdict, returned as a value: `tune` reports `accepted` (the policy does not
lose on the held-out part) and writes the policy only when accepted or forced; the caller decides
what a refusal means (`glr tune` exits 1 with `PolicyRejected`, `glr run` falls back to identity).

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
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.errors import UserError
from tuning.options import POLICIES, TUNE
from tuning.policy import AGGREGATORS, VERSION, attach_nonlandmark, identity, load_policy, read_nonlandmark, save_policy
from tuning.space import N_BANDS, Space, identity_params, seed_rule_params, suggest_policy
from tuning.split import Part, split_parts
from tuning.storage import open_storage, recover_dead_trials, storage_label, worker_tag

SEARCHED = ("auto", "bands", "blend")
_D = TUNE.defaults()  # the one definition of tune's options (glr tune and [tune] derive from it too)


class PolicyRejected(UserError):
    """The tuned policy lost on the held-out part and was not written (`glr tune` without --force)."""


def study_name(policy: str, parts: tuple[Part, Part | None], holdout: float, seed: int) -> str:
    """A name derived from the inputs: another table or split never mixes trials into this study."""
    h = hashlib.sha256()
    for part in parts:
        if part is None:
            continue
        d = part.data
        extra = [d.extra[k] for k in sorted(d.extra)]  # the non-landmark signal, when given
        for arr in (d.ids.astype(str), d.landmark, d.score, part.correct, *(d.agg[a] for a in AGGREGATORS), *extra):
            h.update(np.ascontiguousarray(arr).tobytes() if arr.dtype != object else "\0".join(arr).encode())
    h.update(f"{policy}|{holdout}|{seed}|v{VERSION}|{N_BANDS}".encode())
    return f"glr-{policy}-{h.hexdigest()[:12]}"


# ------------------------------------------------------------------------------ the study


_TASK: dict = {}  # what forked worker processes inherit: the tuning part and its space


def _objective(trial) -> float:
    trial.set_user_attr("worker", worker_tag())
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


def _open_study(storage: str | None, out: Path, name: str):
    """(study, storage object, label): the study `name`, created if new; a storage that cannot
    hold it is a UserError."""
    import optuna

    st, label = open_storage(storage, out), storage_label(storage, out)
    try:
        s = optuna.create_study(study_name=name, storage=st, direction="maximize", load_if_exists=True)
    except Exception as e:
        raise UserError(f"--storage {label}: cannot create study {name!r} ({e})") from None
    if s.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UserError(f"study {name!r} in {label} does not maximise: use another --study")
    return s, st, label


def _run_workers(st, storage: str | None, out: Path, name: str, seed: int, trials: int | None,
                 timeout: float | None, jobs: int, bar) -> None:
    """This process and `jobs - 1` forked ones optimise the study until `trials` or `timeout`."""
    children = []
    try:
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


def _search(policy: str, tune_part: Part, hold_part: Part | None, out: Path, *, trials, timeout, storage, study,
            jobs, holdout, seed, progress) -> tuple[dict, object, dict]:
    """Run (or resume) the study of a searched kind: (chosen policy, the study, study facts for the result)."""
    import optuna
    from optuna.trial import TrialState

    space = Space.of(tune_part.data)
    name = study or study_name(policy, (tune_part, hold_part), holdout, seed)
    s, st, label = _open_study(storage, out, name)
    if not s.get_trials(deepcopy=False):
        s.enqueue_trial(identity_params(policy, space), user_attrs={"start": "identity"})
        if policy in ("bands", "auto"):
            s.enqueue_trial(seed_rule_params(space, policy), user_attrs={"start": "seed-rules"})
    requeued = recover_dead_trials(s, st)
    _TASK.update(part=tune_part, kind=policy, space=space)
    _run_workers(st, storage, out, name, seed, trials, timeout, jobs, _progress_bar(s, trials, progress))
    s = optuna.load_study(study_name=name, storage=st)
    complete = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"study {name!r}: no trial finished (raise --timeout or --trials)")
    best = s.best_trial
    chosen = load_policy(best.user_attrs["policy"])
    chosen["study"] = {"name": name, "storage": label, "best_trial": best.number, "trials": len(complete),
                       "gap_tuning": best.value, "seed": seed, "holdout": holdout, "searched": policy}
    facts = {"study": name, "storage": label, "trials": len(complete), "best_trial": best.number,
             "requeued": requeued}
    return chosen, s, facts


# ------------------------------------------------------------------------------ the verdict


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


def _loss_message(kind: str, h: dict, out: Path, force: bool) -> str:
    """What is said when the policy loses on the held-out part: written anyway (force) or refused."""
    lo, hi = h.get("delta_ci", [0, 0])
    noise = " (within noise)" if lo < 0 < hi else ""
    if force:
        return f"WARNING: {_message('loss')}{noise}; written anyway because of --force"
    return (f"the tuned {kind} policy loses on the held-out part{noise}: GAP {_fmt(h['before'])} -> "
            f"{_fmt(h['after'])} (delta {h['delta']:+.4f}); {out} not written. The inliers do not help GAP "
            f"here: keep the identity (--policy identity) or pass --force to write it anyway")


def _check_args(policy: str, trials: int | None, timeout: float | None, jobs: int) -> None:
    if policy not in POLICIES:
        raise UserError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if policy in SEARCHED and not trials and not timeout:
        raise UserError("--trials 0 needs --timeout (otherwise the study never ends)")
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: must be at least 1")


def tune(
    preds,
    inliers,
    solution,
    out: str | os.PathLike,
    *,
    policy: str = _D["policy"],
    trials: int | None = _D["trials"],
    timeout: float | None = _D["timeout"],
    storage: str | None = _D["storage"],
    study: str | None = _D["study"],
    jobs: int = _D["jobs"],
    holdout: float = _D["holdout"],
    seed: int = _D["seed"],
    force: bool = _D["force"],
    plots: bool = _D["plots"],
    bootstrap: int = _D["bootstrap"],
    progress: bool | None = None,
    nonlandmark=None,
) -> dict:
    """Choose a rescoring policy on GAP with Optuna and write it to `out` (JSON) with PNG plots.

    `preds`, `inliers` and `solution` are paths or DataFrames (predictions / inliers tables,
    `read_solution` frame). `policy`: auto | bands | blend (searched) or seed-rules | identity
    (fixed, evaluated the same way so they can be compared). `trials` is the study's total of
    finished trials (0/None = until `timeout`; 0/None = no time limit); `storage`/`study` empty or
    None = the journal beside `out` / a name derived from the inputs. Defaults: `tuning.options.TUNE`.
    `nonlandmark`: the validation queries' non-landmark signal table (path or DataFrame,
    `tuning.policy.read_nonlandmark`); given, the study also searches the policy's nonlandmark term.

    Returns GAP before/after on the tuning and held-out parts ("tune", "holdout") with bootstrap
    CIs, "verdict" (gain | noise | loss | unchecked), "accepted" (False only for a loss), "message"
    (the verdict in words; for a refused policy, why and what to do), "written" (the paths written:
    the policy and its plots, [] when refused), and the study facts. The policy is written only
    when accepted or `force`. Raises UserError for bad inputs or a storage that cannot be opened.
    """
    import optuna

    _check_args(policy, trials, timeout, jobs)
    out, timeout = Path(out), timeout or None  # a timeout of 0 (the config's "not set") is no limit
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune_part, hold_part = split_parts(preds, inliers, solution, holdout=holdout, seed=seed)
    if nonlandmark is not None:
        src = "nonlandmark" if isinstance(nonlandmark, pd.DataFrame) else str(nonlandmark)
        table = read_nonlandmark(nonlandmark)
        for part in (tune_part, hold_part):
            if part is not None:
                attach_nonlandmark(part.data, table, src)
    result: dict = {"policy": policy, "out": str(out), "study": None, "storage": None, "trials": 0,
                    "inliers_not_candidates": tune_part.data.unmatched_inliers}
    if policy in SEARCHED:
        chosen, s, facts = _search(policy, tune_part, hold_part, out, trials=trials, timeout=timeout,
                                   storage=storage, study=study, jobs=jobs, holdout=holdout, seed=seed,
                                   progress=progress)
        result.update(facts)
    else:
        chosen, s = load_policy(policy), None
        chosen["study"] = {"name": None, "preset": policy, "seed": seed, "holdout": holdout}
    result["chosen"] = chosen["kind"]
    result.update(_judge(chosen, tune_part, hold_part, bootstrap, seed))
    result["message"] = (_loss_message(chosen["kind"], result["holdout"], out, force)
                         if result["verdict"] == "loss" else result["message"])
    result["written"] = []
    if result["accepted"] or force:
        save_policy(chosen, out)
        result["written"] = [str(out)] + [str(p) for p in (_plots(s, chosen, tune_part, hold_part, out) if plots else [])]
    return result


def _judge(chosen: dict, tune_part: Part, hold_part: Part | None, bootstrap: int, seed: int) -> dict:
    """GAP before/after on both parts and the held-out verdict (records the held-out GAP in `chosen`)."""
    res: dict = {"tune": _evaluate(tune_part, chosen, bootstrap, seed)}
    verdict = None
    if hold_part is not None and hold_part.data.n:
        res["holdout"] = _evaluate(hold_part, chosen, bootstrap, seed + 1)
        verdict = _verdict(res["holdout"])
        chosen["study"]["gap_holdout"] = res["holdout"]["after"]["gap"]
    res.update(verdict=verdict or "unchecked", accepted=verdict != "loss", message=_message(verdict))
    return res


def _plots(study, chosen: dict, tune_part: Part, hold_part: Part | None, out: Path) -> list[Path]:
    from tuning.plots import write_plots

    return write_plots(study, chosen, tune_part, hold_part, out)


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
