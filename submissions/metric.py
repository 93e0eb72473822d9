"""GAP (Global Average Precision, micro AP) as the Google Landmark Recognition competitions define it,
plus top-1 accuracy, a bootstrap confidence interval and a paired bootstrap test.

One prediction per query, sorted by confidence descending; GAP = (1/M) Σᵢ P(i)·rel(i), where P(i) is
the precision of the first i predictions, rel(i) = 1 when prediction i is correct and M is the
number of queries whose ground truth has a landmark. A prediction on a non-landmark query costs
precision; a query without prediction contributes nothing. Equal confidences are ordered by query
id ascending, as the reference implementation (tensorflow/models, DELF `metrics.py`: sort by id,
then stably by score descending) does.

Everything is vectorised (argsort + cumsum); the bootstrap resamples queries with replacement and
scores each resample exactly from per-query counts, without materialising it.
"""
from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from submissions.errors import UserError

_USAGE_CHOICES = {"public": "Public", "private": "Private", "all": "all"}


# ------------------------------------------------------------------------------ the core


def _gap_sums(rel_sorted: np.ndarray, n_landmark_queries: int) -> np.ndarray:
    """Running GAP after each correct prediction of a ranked list: Σ_{j ≤ k} j / (position of the
    j-th correct) / M. The one sum behind `sorted_gap` and `cumulative_gap`, so they agree exactly."""
    pos = np.flatnonzero(rel_sorted)
    return np.cumsum(np.arange(1, len(pos) + 1, dtype=np.float64) / (pos + 1.0)) / n_landmark_queries


def sorted_gap(rel_sorted: np.ndarray, n_landmark_queries: int) -> float:
    """GAP of predictions already in rank order (`rel_sorted`: correct or not, best first):
    Σ_k k / (position of the k-th correct) / M. For callers that rank the predictions themselves."""
    if n_landmark_queries <= 0:
        return 0.0
    sums = _gap_sums(rel_sorted, n_landmark_queries)
    return float(sums[-1]) if len(sums) else 0.0


def cumulative_gap(rel_sorted: np.ndarray, n_landmark_queries: int) -> np.ndarray:
    """GAP of the first i+1 ranked predictions, for every i (GAP when only the predictions at or above
    the (i+1)-th confidence are kept); its last value is exactly `sorted_gap`."""
    rel = np.asarray(rel_sorted, dtype=bool)
    if n_landmark_queries <= 0:
        return np.zeros(len(rel))
    sums = np.concatenate([[0.0], _gap_sums(rel, n_landmark_queries)])
    return sums[np.cumsum(rel)]


def gap_score(
    confidence: np.ndarray,
    correct: np.ndarray,
    n_landmark_queries: int,
    tie_key: np.ndarray | None = None,
) -> float:
    """GAP of one prediction per query: `confidence` and `correct` (bool) have one entry per query
    that has a prediction; `n_landmark_queries` is M. Equal confidences are ranked by `tie_key`
    ascending (the query id or its rank in id order); without it, by the arrays' current order.
    Vectorised: 100k predictions take a few milliseconds, for tuning loops. Returns 0.0 when M == 0."""
    confidence, correct, order = _ranked(confidence, correct, tie_key)
    return sorted_gap(correct[order], n_landmark_queries)


def gap_curve(
    confidence: np.ndarray,
    correct: np.ndarray,
    n_landmark_queries: int,
    tie_key: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence thresholds, GAP when only the predictions at or above each are kept), one point per
    prediction in `gap_score`'s rank order; the last GAP is exactly `gap_score` of the same arguments."""
    confidence, correct, order = _ranked(confidence, correct, tie_key)
    return confidence[order], cumulative_gap(correct[order], n_landmark_queries)


def _ranked(confidence, correct, tie_key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence as float64, correct as bool, their rank order) for `gap_score` and `gap_curve`."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence has shape {confidence.shape} but correct has {correct.shape}")
    if tie_key is None:
        return confidence, correct, _rank_order(confidence, lambda rows: rows)
    key = np.asarray(tie_key)
    return confidence, correct, _rank_order(confidence, lambda rows: key[rows])


def _rank_order(confidence: np.ndarray, tie_key_of) -> np.ndarray:
    """Order of predictions: confidence descending, equal confidences by `tie_key_of(rows)` ascending.

    numpy's unstable argsort is SIMD-fast (several times a stable one); only the predictions that
    share a confidence with another are then re-sorted by their tie key."""
    order = np.argsort(-confidence)
    c = confidence[order]
    same = c[1:] == c[:-1]
    if same.any():
        tied = np.zeros(len(c), dtype=bool)
        tied[1:] |= same
        tied[:-1] |= same
        members = order[tied]
        order[tied] = members[np.lexsort((tie_key_of(members), -confidence[members]))]
    return order


def _id_ranks(ids, rows: np.ndarray) -> np.ndarray:
    """Rank of ids[rows] among themselves in string (code point) order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(ids, dtype=object), type=pa.string())
    sub = arr.take(pa.array(rows))
    return pc.rank(sub, sort_keys="ascending", tiebreaker="dense").to_numpy()


# ------------------------------------------------------------------------------ submission × solution


@dataclass
class Scored:
    """A submission matched to the scored queries of a solution; what GAP and the bootstraps need.

    Queries are the solution rows selected by `usage`, numbered 0..n_queries-1 in file order.
    Predictions are the submission rows with a landmark whose id is one of those queries."""

    n_queries: int
    is_landmark: np.ndarray  # bool per query
    query: np.ndarray  # query number of each prediction
    confidence: np.ndarray  # float64 per prediction
    correct: np.ndarray  # bool per prediction
    order: np.ndarray  # predictions in rank order (confidence desc, id asc)
    n_ignored: int  # predictions on ids that are not scored queries

    @property
    def n_landmark_queries(self) -> int:
        return int(self.is_landmark.sum())

    def gap(self) -> float:
        return sorted_gap(self.correct[self.order], self.n_landmark_queries)

    @functools.cached_property
    def ranked(self) -> tuple[np.ndarray, np.ndarray]:
        """(query, correct) of the predictions in rank order; computed once for all resamples."""
        return self.query[self.order], self.correct[self.order]


def _usage_key(usage: str) -> str:
    """"Public", "Private" or "all" for a --usage value in any case, else UserError."""
    key = _USAGE_CHOICES.get(str(usage).lower())
    if key is None:
        raise UserError(f"--usage {usage!r}: expected Public, Private or all")
    return key


def _usage_mask(usage_col: pd.Series, usage: str) -> np.ndarray:
    import pyarrow.compute as pc

    key = _usage_key(usage)
    values = _strings(usage_col)
    if key == "all":
        mask = pc.not_equal(values, "Ignored")
    else:
        mask = pc.or_(pc.equal(values, key), pc.equal(values, "All"))
    return mask.to_numpy(zero_copy_only=False)


def _flatten(landmarks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, offset, flat values) of a column (Series or sequence) of landmark tuples."""
    col = landmarks.to_numpy(dtype=object) if isinstance(landmarks, pd.Series) else list(landmarks)
    lens = np.fromiter(map(len, col), dtype=np.int64, count=len(col))
    flat = np.fromiter(itertools.chain.from_iterable(col), dtype=np.int64, count=int(lens.sum()))
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else lens
    return lens, offsets, flat


def _in_truth(candidates: np.ndarray, lens: np.ndarray, offsets: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Bool, shaped like `candidates` (int64, first axis = query): is the candidate one of the query's
    landmarks, those being flat[offsets[q] : offsets[q] + lens[q]]. One pass per landmark slot."""
    correct = np.zeros(candidates.shape, dtype=bool)
    for j in range(int(lens.max()) if len(lens) else 0):
        rows = np.flatnonzero(lens > j)
        truth = flat[offsets[rows] + j].reshape((-1,) + (1,) * (candidates.ndim - 1))
        correct[rows] |= candidates[rows] == truth
    return correct


def is_correct(candidates, landmarks) -> np.ndarray:
    """Whether each predicted landmark id is one of its query's true landmarks: THE definition of a
    correct prediction, shared by the metric, tuning and the report.

    `candidates`: one id per query (shape [n]) or several ([n, C]); NaN (no prediction) is never
    correct. `landmarks`: n tuples of true landmark ids (as in `read_solution`; () = non-landmark).
    """
    cand = np.asarray(candidates)
    if len(cand) != len(landmarks):
        raise ValueError(f"{len(cand)} rows of candidates but {len(landmarks)} of landmarks")
    predicted = np.ones(cand.shape, dtype=bool)
    if cand.dtype.kind == "f":  # NaN: a query without prediction
        predicted = ~np.isnan(cand)
        cand = np.where(predicted, cand, 0)
    return _in_truth(cand.astype(np.int64), *_flatten(landmarks)) & predicted


def _strings(series: pd.Series):
    """The column as one pyarrow large_string array (zero-copy for pandas' pyarrow-backed str)."""
    import pyarrow as pa

    try:
        arr = pa.array(series)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        arr = pa.array(series.astype(str).to_numpy(dtype=object), type=pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.large_string()) if pa.types.is_string(arr.type) else pa.array(
            series.astype(str).to_numpy(dtype=object), type=pa.large_string()
        )
    return arr


def _match_ids(sol_ids, sub_ids) -> np.ndarray:
    """Row of each submission id in the solution (-1 if absent); UserError on duplicate ids.

    Equal-width ids (the usual case) are matched by a numpy hash, sort and searchsorted, then
    confirmed byte by byte; anything else goes through one Arrow hash table over both columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from submissions.format import fixed_width_bytes, hash_rows

    n_sol = len(sol_ids)
    if n_sol == 0:
        return np.full(len(sub_ids), -1, dtype=np.int64)
    sol_rows, sub_rows = fixed_width_bytes(sol_ids), fixed_width_bytes(sub_ids)
    if sol_rows is not None and sub_rows is not None and sol_rows.shape[1] == sub_rows.shape[1]:
        hs, hq = hash_rows(sol_rows), hash_rows(sub_rows)
        order = np.argsort(hs)
        hs_sorted = hs[order]
        if not (hs_sorted[1:] == hs_sorted[:-1]).any() and not (np.diff(np.sort(hq)) == 0).any():
            # searching in key order keeps the binary searches cache-friendly (4x faster at 1M)
            q_order = np.argsort(hq)
            pos = np.empty(len(hq), dtype=np.int64)
            pos[q_order] = np.searchsorted(hs_sorted, hq[q_order])
            np.minimum(pos, n_sol - 1, out=pos)
            cand = order[pos]
            hit = np.flatnonzero(hs_sorted[pos] == hq)
            if sol_rows.shape[1] % 8 == 0:  # compare 8 bytes at a time
                sol_rows, sub_rows = sol_rows.view(np.uint64), sub_rows.view(np.uint64)
            same = (sol_rows[cand[hit]] == sub_rows[hit]).all(axis=1)
            where = np.full(len(hq), -1, dtype=np.int64)
            where[hit[same]] = cand[hit[same]]
            return where
        # a repeated hash: a duplicate id (or, rarely, a collision); the exact path below decides
    codes = pc.dictionary_encode(pa.concat_arrays([sol_ids, sub_ids])).indices.to_numpy().astype(np.int64)
    # codes number distinct ids in order of first appearance: the solution's are 0..n_sol-1 iff unique
    if n_sol and codes[:n_sol].max() != n_sol - 1:
        raise UserError("solution has duplicate ids")
    if len(sub_ids) and np.bincount(codes[n_sol:]).max() > 1:
        raise UserError("submission has duplicate ids; keep one row per id")
    where = codes[n_sol:]
    return np.where(where < n_sol, where, -1)


def score(submission: pd.DataFrame, solution: pd.DataFrame, usage: str = "all") -> Scored:
    """Match a canonical submission to `solution` (as from `read_solution`) on the `usage` rows."""
    import pyarrow.compute as pc

    from submissions.format import UNIQUE_IDS_ATTR, canonical_submission, has_duplicates, ids_token

    for col in ("id", "landmarks", "usage"):
        if col not in solution.columns:
            raise UserError(f"solution lacks column {col!r} (read it with submissions.format.read_solution)")
    sub = canonical_submission(submission)
    sol_ids = _strings(solution["id"])
    sub_ids = _strings(sub["id"])
    n_sol = len(sol_ids)

    # query number in the solution of each submission row (-1: not there)
    if len(sub_ids) == n_sol and n_sol and pc.all(pc.equal(sub_ids, sol_ids)).as_py():
        where = np.arange(n_sol, dtype=np.int64)  # the usual case: same ids, same order
        checked = solution.attrs.get(UNIQUE_IDS_ATTR)  # read_solution checked these very ids
        if (checked is None or checked != ids_token(solution["id"])) and has_duplicates(sol_ids):
            raise UserError("solution has duplicate ids")
    else:
        where = _match_ids(sol_ids, sub_ids)

    selected = _usage_mask(solution["usage"], usage)
    qnum = np.cumsum(selected) - 1  # solution row -> query number among the selected rows
    lens, offsets, flat = _flatten(solution["landmarks"])

    has = sub["landmark_id"].notna().to_numpy()
    in_sol = where >= 0
    keep = has & in_sol
    keep[in_sol] &= selected[where[in_sol]]
    rows = np.flatnonzero(keep)
    srow = where[rows]
    lid = sub["landmark_id"].to_numpy(dtype=np.int64, na_value=0)[rows]
    conf = sub["confidence"].to_numpy(dtype=np.float64)[rows]
    correct = _in_truth(lid, lens[srow], offsets[srow], flat)
    order = _rank_order(conf, lambda members: _id_ranks(sub_ids, rows[members]))  # ids only for ties
    return Scored(
        n_queries=int(selected.sum()),
        is_landmark=(lens > 0)[selected],
        query=qnum[srow],
        confidence=conf,
        correct=correct,
        order=order,
        n_ignored=int((has & ~keep).sum()),
    )


def gap(submission: pd.DataFrame, solution: pd.DataFrame, usage: str = "all") -> float:
    """GAP of a canonical submission against `read_solution`'s frame, on Public, Private or all
    rows (Ignored rows never count). A prediction is correct when its landmark is one of the
    query's true landmarks; submission ids not in the scored rows are ignored."""
    return score(submission, solution, usage).gap()


# ------------------------------------------------------------------------------ bootstrap


def _harmonic(n: int) -> np.ndarray:
    """H[k] = Σ_{i=1..k} 1/i, H[0] = 0."""
    h = np.zeros(n + 1)
    np.cumsum(1.0 / np.arange(1, n + 1), out=h[1:])
    return h


def _gap_from_counts(s: Scored, counts: np.ndarray, harmonic: np.ndarray) -> float:
    """GAP of a resample in which query q appears counts[q] times, without materialising it.

    In rank order the c copies of a prediction are adjacent (same confidence, same id). With k
    predictions and C correct ones ranked before them, correct copies contribute
    Σ_{j=1..c} (C+j)/(k+j) = c − (k−C)·(H[k+c] − H[k])."""
    m = int(counts[s.is_landmark].sum())
    if m == 0:
        return 0.0
    query, rel = s.ranked
    c = counts[query].astype(np.float64)
    k = np.cumsum(c) - c
    cr = c * rel
    C = np.cumsum(cr) - cr
    ci = c.astype(np.int64)
    ki = k.astype(np.int64)
    one = (C + 1.0) / (k + 1.0)
    many = c - (k - C) * (harmonic[ki + ci] - harmonic[ki])
    contrib = np.where(ci == 1, one, many)
    return float(contrib[rel & (ci > 0)].sum() / m)


def _resample_counts(n_queries: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.bincount(rng.integers(0, n_queries, n_queries), minlength=n_queries)


def _interval(values: np.ndarray, confidence_level: float) -> list[float]:
    alpha = (1.0 - confidence_level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def evaluate(
    submission: pd.DataFrame,
    solution: pd.DataFrame,
    usage: str = "all",
    bootstrap: int = 0,
    seed: int = 0,
    confidence_level: float = 0.95,
) -> dict:
    """GAP, top-1 accuracy (correct predictions / M) and counts; with `bootstrap` > 0 also a
    percentile confidence interval `gap_ci` from that many seeded query resamples."""
    s = score(submission, solution, usage)
    m = s.n_landmark_queries
    out = {
        "usage": _usage_key(usage),
        "gap": s.gap(),
        "accuracy": float(s.correct.sum() / m) if m else 0.0,
        "n_queries": s.n_queries,
        "n_landmark_queries": m,
        "n_predicted": int(len(s.query)),
        "n_correct": int(s.correct.sum()),
        "n_ignored_predictions": s.n_ignored,
    }
    if bootstrap > 0:
        if not 0.0 < confidence_level < 1.0:
            raise UserError(f"confidence level {confidence_level} must be between 0 and 1")
        h = _harmonic(s.n_queries)
        gaps = np.array([_gap_from_counts(s, counts, h) for counts in _resample_counts(s.n_queries, bootstrap, seed)])
        out.update(
            gap_ci=_interval(gaps, confidence_level),
            gap_std=float(gaps.std(ddof=1)) if bootstrap > 1 else 0.0,
            bootstrap=int(bootstrap),
            seed=int(seed),
            confidence_level=float(confidence_level),
        )
    return out


def evaluate_predictions(preds, solution, usage: str = "all") -> dict:
    """`evaluate` (GAP, top-1 accuracy, counts) of a predictions table, whose rank-0 rows are the
    predictions, against a solution: each given as a frame or a path. The one scoring of a stage's
    predictions, for `glr evaluate` and the runner alike."""
    from submissions.format import read_solution, submission_from_predictions
    from submissions.tables import read_predictions, validate_predictions

    table = validate_predictions(preds) if isinstance(preds, pd.DataFrame) else read_predictions(preds)
    sol = solution if isinstance(solution, pd.DataFrame) else read_solution(solution)
    return evaluate(submission_from_predictions(table), sol, usage=usage)


def paired_bootstrap(
    sub_a: pd.DataFrame,
    sub_b: pd.DataFrame,
    solution: pd.DataFrame,
    usage: str = "all",
    n: int = 1000,
    seed: int = 0,
    confidence_level: float = 0.95,
) -> dict:
    """Is B really better than A? Both are scored on the SAME `n` query resamples; returns gap_a,
    gap_b, delta (= gap_b − gap_a), its percentile interval `delta_ci`, and `p_value`, the share
    of resamples in which B does not beat A (small = B's gain is unlikely to be luck)."""
    if n <= 0:
        raise UserError(f"paired bootstrap needs at least one resample, got {n}")
    a = score(sub_a, solution, usage)
    b = score(sub_b, solution, usage)
    h = _harmonic(a.n_queries)
    deltas = np.empty(n)
    for i, counts in enumerate(_resample_counts(a.n_queries, n, seed)):
        deltas[i] = _gap_from_counts(b, counts, h) - _gap_from_counts(a, counts, h)
    gap_a, gap_b = a.gap(), b.gap()
    return {
        "gap_a": gap_a,
        "gap_b": gap_b,
        "delta": gap_b - gap_a,
        "delta_ci": _interval(deltas, confidence_level),
        "p_value": float(np.mean(deltas <= 0.0)),
        "n_resamples": int(n),
        "seed": int(seed),
        "confidence_level": float(confidence_level),
    }


# ------------------------------------------------------------------------------ `glr gap`


def gap_report(
    submission: str | os.PathLike,
    solution: str | os.PathLike,
    usage: str = "all",
    bootstrap: int = 0,
    seed: int = 0,
    compare: str | os.PathLike | None = None,
) -> dict:
    """What `glr gap` prints: `evaluate` of the SUBMISSION file against the SOLUTION file, and with
    `compare` (another submission, the baseline A) a paired bootstrap of SUBMISSION (B) against it
    under "compare" (`bootstrap` resamples, 1000 when 0)."""
    from submissions.format import read_solution, read_submission

    if bootstrap < 0:
        raise UserError(f"--bootstrap {bootstrap}: must be >= 0")
    _usage_key(usage)  # before reading the files
    sol = read_solution(solution)
    sub = read_submission(submission)
    out = {"submission": str(submission), "solution": str(solution)}
    out.update(evaluate(sub, sol, usage=usage, bootstrap=bootstrap, seed=seed))
    if compare is not None:
        other = read_submission(compare)
        paired = paired_bootstrap(other, sub, sol, usage=usage, n=bootstrap or 1000, seed=seed)
        out["compare"] = {"baseline": str(compare), **paired}
    return out
