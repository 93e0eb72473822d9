"""The search space of `glr tune`: which policies a trial can propose, and the trials enqueued first.

Ranges depend on the data (score quantiles, inlier counts of the tuning part), so the same data
gives the same space and an interrupted study resumes. Every space contains the identity policy
(a threshold range includes "never fires"); `identity_params` and `seed_rule_params` are the
trial parameters of the identity and of the study's hand rules. The nonlandmark term is searched
only when the data carries the signal (`Space.nonlandmark`), so a study without it has exactly the
parameters it had before.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tuning.policy import AGGREGATORS, DEMOTE_MODES, FORMAT, VERSION, Prepared, seed_rules

N_BANDS = 4  # like the study: low, medium, high, top


@dataclass
class Space:
    """Data-dependent ranges of the search space (same data → same space, so studies resume)."""

    kmax: int
    hi: int  # inlier thresholds range over 0..hi; hi + 1 means "never"
    n_queries: int
    grid: np.ndarray  # score quantiles at 0, 0.001, …, 1 of the tuning part's top scores
    nonlandmark: bool = False  # the tuning part has a per-query non-landmark signal: search its term

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
        return cls(kmax=data.kmax, hi=max(2, min(hi, 1000)), n_queries=max(1, data.n), grid=grid,
                   nonlandmark="nonlandmark" in data.extra)


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
    if space.nonlandmark:
        pol["nonlandmark"] = ({"above": trial.suggest_float("nl_above", 0.0, 1.0),
                               "factor": trial.suggest_float("nl_factor", 0.0, 1.0)}
                              if trial.suggest_categorical("nonlandmark", [False, True]) else None)
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
    if space.nonlandmark:
        params["nonlandmark"] = False
    return params


def seed_rule_params(space: Space, kind: str) -> dict:
    """Trial parameters closest to `seed_rules()` (edges and values mapped to score quantiles)."""
    rules = seed_rules()
    params = {"aggregator": rules["aggregator"], "swap": False, "frequency": False}
    if space.nonlandmark:
        params["nonlandmark"] = False
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
