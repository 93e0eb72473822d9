"""The tuning and held-out parts of the validation queries, and which candidates are correct.

`split_parts` draws (seeded, stratified by landmark / non-landmark query) the queries the study may
see and those that judge it; a `Part` holds one of them as `Prepared` arrays with the correctness
of every candidate, so a trial's GAP is a few numpy operations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from submissions.errors import UserError
from tuning.policy import Prepared, apply_policy, prepare


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


def as_solution(solution) -> pd.DataFrame:
    """A `read_solution` frame from a path, or the frame itself."""
    from submissions.format import read_solution

    if isinstance(solution, pd.DataFrame):
        return solution
    return read_solution(solution)


def correct_candidates(data: Prepared, sol: pd.DataFrame) -> np.ndarray:
    """[n, C] bool: the candidate is one of the query's ground-truth landmarks (the metric's
    `is_correct`; padding, -1, never is). Every id of `data` must be in `sol`."""
    from submissions.metric import is_correct

    truth = sol.set_index("id")["landmarks"].reindex(pd.Index(data.ids, dtype="str"))
    return is_correct(data.landmark, truth.to_numpy())


def split_parts(preds, inliers, solution, holdout: float = 0.3, seed: int = 0) -> tuple[Part, Part | None]:
    """The tuning and held-out parts of the validation queries (seeded, stratified by whether
    the query has a landmark). `Ignored` rows of the solution are left out of both. The draw is
    over the scored ids in id order, so the split depends on the solution's content and `seed`,
    not on the order of its rows."""
    if not 0.0 <= holdout < 1.0:
        raise UserError(f"--holdout {holdout}: must be at least 0 and below 1")
    data = prepare(preds, inliers)
    src = "the solution" if isinstance(solution, pd.DataFrame) else str(solution)
    sol_all = as_solution(solution)
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
    correct = correct_candidates(data, sol)

    def part(mask: np.ndarray) -> Part:
        rows = np.flatnonzero(mask[where])
        return Part(data.subset(rows), correct[rows], int((has_landmark & mask).sum()),
                    sol[mask].reset_index(drop=True))

    tune_part = part(~is_holdout)
    if tune_part.data.n == 0:
        raise UserError("the tuning part has no predicted query: more validation queries or a smaller --holdout")
    return tune_part, (part(is_holdout) if is_holdout.any() else None)
