"""Rescoring policies: (candidate classes with scores, their inlier counts) → (landmark, confidence).

A policy is a small JSON document (DESIGN.md "policy"); `apply_policy` evaluates it for every query
at once with numpy. The expensive part — grouping the inliers table per (query, candidate class) and
aggregating the first K references for every K and aggregator — is done once by `prepare`, so that a
tuning trial is a handful of vectorised array operations plus one GAP.

Kinds (all vectorised, none with a per-query Python loop):

- ``identity``: no change; rank 0 stays the prediction with its score as confidence.
- ``bands``: the top score picks a band (``edges``, ascending; band b is edges[b-1] <= score < edges[b]).
  Per band: ``k`` (references aggregated), ``demote_below`` (aggregated inliers below it lower the
  confidence: ``demote`` = "factor" multiplies it by ``demote_to``, "value" lowers it to
  min(confidence, ``demote_to``)), ``promote_at`` (aggregated inliers at or above it raise the
  confidence to max(confidence, ``promote_to``); null = never). Promotion wins over demotion.
- ``blend``: confidence = score · (floor + (1 − floor) · σ(a · (inliers − b))).
Options of both:
- ``swap`` ``{"margin": m}``: when a lower-ranked candidate's aggregated inliers exceed the top
  candidate's (missing = 0) by at least m, that candidate becomes the prediction (best such one;
  the query keeps its top score as the starting confidence, the rules then use the new candidate's
  inliers).
- ``frequency`` ``{"max_share": s, "factor": f}``: a class predicted for more than a share s of the
  queries being rescored is probably a catch-all for non-landmarks: its confidences are multiplied by f.
- ``nonlandmark`` ``{"above": t, "factor": f}`` (all kinds, identity included): a query whose
  non-landmark signal (`read_nonlandmark`: a per-query score in [0, 1], e.g. its similarity to a pool
  of non-landmark images) is at least t gets its confidence multiplied by f (t, f in [0, 1]). A step,
  not a slope, so one threshold separates "looks like a distractor" from the rest and t = 1.0 with
  f = 1.0 is the identity. Applying it needs the signal table (`prepare(..., nonlandmark=)`); null or
  absent = no term, so a policy without it ranks exactly as before.

Queries whose candidate was not verified (no inliers rows) keep their confidence. References are
taken in the inliers table's row order per (query, class) — the order `glr verify` chose them in —
so K=2 means "the first two references". Aggregators: ``max``, ``mean``, ``second`` (2nd-largest; 0
when only one reference was verified).

GAP's denominator is fixed, so blanking a prediction can never raise it: policies only re-order
(demote, promote, swap), they never delete a prediction.

Example policy (the study's hand rules, `seed_rules()`)::

    {"format": "glr-policy", "version": 1, "kind": "bands", "aggregator": "max",
     "edges": [0.4, 0.6, 0.8],
     "bands": [{"k": 2, "demote_below": 3, "demote": "value", "demote_to": 0.0, "promote_at": 10, "promote_to": 0.6},
               {"k": 2, "demote_below": 5, "demote": "factor", "demote_to": 0.5, "promote_at": null, "promote_to": 0.0},
               ...],
     "swap": null, "frequency": null}
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.errors import UserError

FORMAT = "glr-policy"
VERSION = 1
KINDS = ("identity", "bands", "blend")
AGGREGATORS = ("max", "mean", "second")
DEMOTE_MODES = ("factor", "value")
MAX_REFS = 16  # references per (query, class) kept; more are ignored


# ------------------------------------------------------------------------------ prepared arrays


@dataclass
class Prepared:
    """Per-query arrays in query-id order (ascending), the form every policy is applied to.

    ids [n] str; landmark [n, C] int64 (−1 = no candidate); score [n, C] float64 (NaN = none);
    code [n, C] int64 class codes for counting (padding = the last code); agg[name] [Kmax, n, C]
    float32 aggregated inliers of the first k+1 references (NaN = candidate not verified).
    """

    ids: np.ndarray
    landmark: np.ndarray
    score: np.ndarray
    code: np.ndarray
    n_codes: int
    agg: dict[str, np.ndarray]
    unmatched_inliers: int = 0
    extra: dict = field(default_factory=dict)  # per-query [n] arrays, e.g. "nonlandmark" (float64)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def kmax(self) -> int:
        return next(iter(self.agg.values())).shape[0]

    def subset(self, rows: np.ndarray) -> "Prepared":
        """The same arrays for a subset of queries (rows in id order keep the tie order)."""
        rows = np.sort(np.asarray(rows))
        return Prepared(
            ids=self.ids[rows], landmark=self.landmark[rows], score=self.score[rows], code=self.code[rows],
            n_codes=self.n_codes, agg={k: np.ascontiguousarray(v[:, rows]) for k, v in self.agg.items()},
            unmatched_inliers=self.unmatched_inliers,
            extra={k: v[rows] for k, v in self.extra.items()},
        )

    def max_inliers(self, quantile: float = 1.0) -> float:
        """Largest (or a high quantile of) aggregated inlier count, for search ranges."""
        values = self.agg["max"][-1]
        values = values[~np.isnan(values)]
        return float(np.quantile(values, quantile)) if len(values) else 0.0


def _table(obj, reader, validator, what: str) -> pd.DataFrame:
    if isinstance(obj, pd.DataFrame):
        return validator(obj, what)
    return reader(obj)


def load_predictions(preds) -> pd.DataFrame:
    """A predictions table from a path or a DataFrame, held to its contract (submissions.tables:
    scores >= 0, each id's ranks 0..n-1, …)."""
    from submissions.tables import read_predictions, validate_predictions

    return _table(preds, read_predictions, validate_predictions, "predictions")


def load_inliers(inliers) -> pd.DataFrame:
    """An inliers table from a path or a DataFrame (None = no verification at all), validated."""
    from submissions.tables import INLIERS, read_inliers, validate_inliers

    if inliers is None:
        return pd.DataFrame({c: pd.Series(dtype="object" if t == "str" else t) for c, t in INLIERS.items()})
    return _table(inliers, read_inliers, validate_inliers, "inliers")


def prepare(preds, inliers, *, max_refs: int = MAX_REFS, nonlandmark=None) -> Prepared:
    """Group predictions and inliers into `Prepared` arrays (once per table; trials reuse them).

    `nonlandmark`: optional per-query signal table (path or DataFrame, `read_nonlandmark`), kept as
    `extra["nonlandmark"]`. Raises UserError when the inliers table references query ids the
    predictions do not have (the two files come from different runs).
    """
    preds_name = "predictions" if isinstance(preds, pd.DataFrame) else str(preds)
    inl_name = "inliers" if isinstance(inliers, pd.DataFrame) or inliers is None else str(inliers)
    p = load_predictions(preds)
    inl = load_inliers(inliers)
    if len(p) == 0:
        raise UserError(f"{preds_name}: predictions table is empty")

    p = p.sort_values(["id", "rank"], kind="stable").reset_index(drop=True)
    qi, ids = pd.factorize(p["id"], sort=True)
    ids = np.asarray(ids, dtype=object)
    n = len(ids)
    starts = np.r_[0, np.flatnonzero(np.diff(qi)) + 1]
    col = np.arange(len(p)) - np.repeat(starts, np.diff(np.r_[starts, len(p)]))
    C = int(col.max()) + 1
    landmark = np.full((n, C), -1, dtype=np.int64)
    score = np.full((n, C), np.nan)
    landmark[qi, col] = p["landmark_id"].to_numpy()
    score[qi, col] = p["score"].to_numpy(dtype=np.float64)
    codes, uniq = pd.factorize(landmark.ravel())
    code = codes.reshape(n, C).astype(np.int64)
    code[np.isnan(score)] = len(uniq)  # padding gets its own (never counted as a class) code

    refs = np.full((n, C, max(1, max_refs)), np.nan, dtype=np.float32)
    unmatched = 0
    if len(inl):
        iq = pd.Index(ids).get_indexer(inl["id"].to_numpy(dtype=object))
        unknown = iq < 0
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            n_unknown = int(pd.unique(inl["id"][unknown]).size)
            raise UserError(
                f"{inl_name}: row {row}: query id {inl['id'][row]!r} is not in {preds_name} "
                f"({n_unknown} unknown query id{'s' if n_unknown != 1 else ''}); the inliers must come from "
                f"verifying these predictions"
            )
        cand = pd.DataFrame({"qi": qi, "landmark_id": p["landmark_id"].to_numpy(), "col": col})
        cand = cand.drop_duplicates(["qi", "landmark_id"])
        rows = pd.DataFrame({"qi": iq, "landmark_id": inl["landmark_id"].to_numpy(),
                             "inliers": inl["inliers"].to_numpy(), "order": np.arange(len(inl))})
        m = rows.merge(cand, on=["qi", "landmark_id"], how="left", sort=False).sort_values("order", kind="stable")
        unmatched = int(m["col"].isna().sum())
        m = m[m["col"].notna()]
        pos = m.groupby(["qi", "col"], sort=False).cumcount().to_numpy()
        keep = pos < refs.shape[2]
        refs[m["qi"].to_numpy()[keep], m["col"].to_numpy().astype(np.int64)[keep], pos[keep]] = (
            m["inliers"].to_numpy(dtype=np.float32)[keep]
        )
        used = int(pos.max()) + 1 if len(pos) else 1
        refs = refs[:, :, : max(1, min(used, refs.shape[2]))]
    else:
        refs = refs[:, :, :1]
    d = Prepared(ids=ids, landmark=landmark, score=score, code=code, n_codes=len(uniq) + 1,
                 agg=_aggregate(refs), unmatched_inliers=unmatched)
    if nonlandmark is not None:
        attach_nonlandmark(d, nonlandmark)
    return d


# ------------------------------------------------------------------------------ non-landmark signal

NONLANDMARK = {"id": "str", "nonlandmark": "float64"}  # one row per query id, value in [0, 1]


def validate_nonlandmark(df: pd.DataFrame, source: str = "nonlandmark") -> pd.DataFrame:
    """The table with columns id (str, non-empty, unique) and nonlandmark (float64, finite, in
    [0, 1]), or one UserError naming the row and what is wrong."""
    missing = [c for c in NONLANDMARK if c not in df.columns]
    if missing:
        raise UserError(f"{source}: non-landmark table lacks column(s) {', '.join(missing)} (expected id, "
                        f"nonlandmark; found {', '.join(map(str, df.columns)) or 'none'}); write it with "
                        "`glr nonlandmark`")
    ids = df["id"].reset_index(drop=True)
    empty = ids.isna().to_numpy() | (ids.astype(str) == "").to_numpy(dtype=bool)
    if empty.any():
        raise UserError(f"{source}: row {int(np.flatnonzero(empty)[0])}: column 'id' is empty")
    ids = ids.astype(str)
    dup = ids.duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise UserError(f"{source}: row {row}: id {ids[row]!r} appears twice; one row per query")
    raw = df["nonlandmark"].reset_index(drop=True)
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        from submissions.tables import show_value

        raise UserError(f"{source}: row {row}: column 'nonlandmark' is {show_value(raw[row])}, expected a finite number "
                        "from 0 to 1")
    return pd.DataFrame({"id": ids, "nonlandmark": values})


def read_nonlandmark(table) -> pd.DataFrame:
    """A non-landmark signal table from a path (Parquet, or CSV) or a DataFrame, validated."""
    if isinstance(table, pd.DataFrame):
        return validate_nonlandmark(table)
    from submissions.tables import _read

    return validate_nonlandmark(_read(table), str(table))


def attach_nonlandmark(d: Prepared, table, source: str | None = None) -> Prepared:
    """Store the signal of every query of `d` as `d.extra["nonlandmark"]` (ids the table has and `d`
    has not are ignored: one table may cover validation and test). A query of `d` the table lacks
    is a UserError: a missing signal must not silently read as "landmark"."""
    src = source or ("nonlandmark" if isinstance(table, pd.DataFrame) else str(table))
    t = read_nonlandmark(table)
    pos = pd.Index(t["id"]).get_indexer(pd.Index(d.ids, dtype="str"))
    missing = np.flatnonzero(pos < 0)
    if len(missing):
        raise UserError(f"{src}: {len(missing)} query id(s) of the predictions have no non-landmark score "
                        f"(e.g. {d.ids[missing[0]]!r}); compute it for the same queries (`glr nonlandmark`)")
    d.extra["nonlandmark"] = t["nonlandmark"].to_numpy(dtype=np.float64)[pos]
    return d


def _aggregate(refs: np.ndarray) -> dict[str, np.ndarray]:
    """agg[name][k-1] = aggregate of the first k references, for every k (NaN = none verified)."""
    n, C, K = refs.shape
    out = {name: np.full((K, n, C), np.nan, dtype=np.float32) for name in AGGREGATORS}
    valid = ~np.isnan(refs)
    filled = np.where(valid, refs, 0.0).astype(np.float32)
    neg = np.where(valid, refs, -np.inf).astype(np.float32)
    count = np.cumsum(valid, axis=2)
    total = np.cumsum(filled, axis=2)
    running_max = np.maximum.accumulate(neg, axis=2)
    for k in range(1, K + 1):
        cnt = count[:, :, k - 1]
        none = cnt == 0
        mx = running_max[:, :, k - 1]
        out["max"][k - 1] = np.where(none, np.nan, mx)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["mean"][k - 1] = np.where(none, np.nan, total[:, :, k - 1] / np.maximum(cnt, 1))
        if k >= 2:
            second = np.sort(neg[:, :, :k], axis=2)[:, :, -2]
            second = np.where(np.isfinite(second), second, 0.0)
        else:
            second = np.zeros((n, C), dtype=np.float32)
        out["second"][k - 1] = np.where(none, np.nan, second)
    return out


# ------------------------------------------------------------------------------ policy documents


def identity() -> dict:
    """The policy that changes nothing."""
    return {"format": FORMAT, "version": VERSION, "kind": "identity", "swap": None, "frequency": None}


def seed_rules() -> dict:
    """The study's hand-set rules with their intended nesting (its code nested the medium/high
    branches inside the low one, so they never ran; here every band has its own rule).

    Bands: low < 0.4 ≤ medium < 0.6 ≤ high < 0.8 ≤ top (up to 1.0), max inliers over K=2
    references. Low: fewer than 3 inliers → confidence 0, 10 or more → 0.6. Medium and high: the
    study said only "lowered below a minimum inlier count" without numbers; we read it as fewer
    than 5 inliers → confidence halved. Top: unchanged.
    """
    never = {"promote_at": None, "promote_to": 0.0}
    return {
        "format": FORMAT, "version": VERSION, "kind": "bands", "aggregator": "max",
        "edges": [0.4, 0.6, 0.8],
        "bands": [
            {"k": 2, "demote_below": 3, "demote": "value", "demote_to": 0.0, "promote_at": 10, "promote_to": 0.6},
            {"k": 2, "demote_below": 5, "demote": "factor", "demote_to": 0.5, **never},
            {"k": 2, "demote_below": 5, "demote": "factor", "demote_to": 0.5, **never},
            {"k": 2, "demote_below": 0, "demote": "factor", "demote_to": 1.0, **never},
        ],
        "swap": None, "frequency": None,
    }


PRESETS = {"identity": identity, "seed-rules": seed_rules}


# The keys each object of a policy may hold; any other key is refused (a misspelt `promote_at` must
# not silently mean "never promote"). "study" is glr tune's record of how the policy was found.
_COMMON_KEYS = ("format", "version", "kind", "swap", "frequency", "nonlandmark", "study")
_KIND_KEYS = {
    "identity": ("aggregator", "k"),  # used only with swap
    "bands": ("aggregator", "edges", "bands"),
    "blend": ("aggregator", "k", "a", "b", "floor"),
}
_BAND_KEYS = ("k", "demote_below", "demote", "demote_to", "promote_at", "promote_to")
_SWAP_KEYS = ("margin",)
_FREQUENCY_KEYS = ("max_share", "factor")
_NONLANDMARK_KEYS = ("above", "factor")


def _need(d: dict, key: str, where: str, kind=None):
    if key not in d:
        raise UserError(f"{where}: missing key {key!r}")
    value = d[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise UserError(f"{where}: key {key!r} is {value!r}, expected {getattr(kind, '__name__', kind)}")
    return value


def _known_keys(d: dict, allowed: tuple[str, ...], where: str, what: str) -> None:
    """Refuse a key `allowed` does not name, suggesting the nearest allowed one."""
    import difflib

    for key in d:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UserError(f"{where}: unknown key {key!r}{hint}; {what} has the keys {', '.join(allowed)}")


def _number(d: dict, key: str, where: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite JSON number (not a bool), within [lo, hi] when given."""
    value = _need(d, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: key {key!r} is {value!r}, expected a finite number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"from {lo} to {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise UserError(f"{where}: key {key!r} is {value!r}, expected a number {bounds}")
    return value


def _k(d: dict, where: str) -> int:
    k = _need(d, "k", where)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_REFS:
        raise UserError(f"{where}: k is {k!r}, expected an integer from 1 to {MAX_REFS} (references aggregated "
                        "per candidate; glr keeps at most that many)")
    return k


def check_policy(policy: dict, where: str = "policy") -> dict:
    """Validate a policy document or raise one UserError: format, version, kind, every key known
    (module docstring), every number finite and in its range, k from 1 to MAX_REFS."""
    if not isinstance(policy, dict):
        raise UserError(f"{where}: a policy is a JSON object, got {type(policy).__name__}")
    if policy.get("format", FORMAT) != FORMAT:
        raise UserError(f"{where}: not a glr policy (format {policy.get('format')!r}, expected {FORMAT!r})")
    version = policy.get("version")
    if version != VERSION or isinstance(version, bool):
        raise UserError(
            f"{where}: policy version {version!r}, but this glr reads version {VERSION}: "
            f"re-run `glr tune` with this glr to make a new policy"
        )
    kind = _need(policy, "kind", where, str)
    if kind not in KINDS:
        raise UserError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    _known_keys(policy, _COMMON_KEYS + _KIND_KEYS[kind], where, f"a {kind} policy")
    if kind in ("bands", "blend") or "aggregator" in policy:
        agg = _need(policy, "aggregator", where, str)
        if agg not in AGGREGATORS:
            raise UserError(f"{where}: aggregator {agg!r} is not one of {', '.join(AGGREGATORS)}")
    if kind == "bands":
        _check_bands(policy, where)
    elif kind == "blend":
        _k(policy, where)
        _number(policy, "a", where)
        _number(policy, "b", where)
        _number(policy, "floor", where, 0.0, 1.0)
    elif "k" in policy:
        _k(policy, where)
    _check_options(policy, kind, where)
    return policy


def _check_bands(policy: dict, where: str) -> None:
    edges = _need(policy, "edges", where, list)
    if any(isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) for e in edges) \
            or list(edges) != sorted(edges):
        raise UserError(f"{where}: edges {edges!r} must be ascending finite numbers")
    bands = _need(policy, "bands", where, list)
    if len(bands) != len(edges) + 1:
        raise UserError(f"{where}: {len(edges)} edges need {len(edges) + 1} bands, found {len(bands)}")
    for i, b in enumerate(bands):
        w = f"{where}: bands[{i}]"
        if not isinstance(b, dict):
            raise UserError(f"{w}: expected an object")
        _known_keys(b, _BAND_KEYS, w, "a band")
        _k(b, w)
        _number(b, "demote_below", w)
        if _need(b, "demote", w, str) not in DEMOTE_MODES:
            raise UserError(f"{w}: demote {b['demote']!r} is not one of {', '.join(DEMOTE_MODES)}")
        _number(b, "demote_to", w, 0.0)
        if _need(b, "promote_at", w) is not None:
            _number(b, "promote_at", w)
        _number(b, "promote_to", w, 0.0)


def _option(policy: dict, name: str, keys: tuple[str, ...], where: str) -> dict | None:
    """An optional term of a policy (swap, frequency, nonlandmark): None, or an object of known keys."""
    d = policy.get(name)
    if d is None:
        return None
    if not isinstance(d, dict):
        raise UserError(f"{where}: {name} must be null or an object")
    _known_keys(d, keys, f"{where}: {name}", name)
    return d


def _check_options(policy: dict, kind: str, where: str) -> None:
    """swap, frequency, nonlandmark and study: null or an object of known keys."""
    if (swap := _option(policy, "swap", _SWAP_KEYS, where)) is not None:
        _number(swap, "margin", f"{where}: swap")
        if kind == "identity":
            _need(policy, "aggregator", where, str)
            _k(policy, where)
    if (freq := _option(policy, "frequency", _FREQUENCY_KEYS, where)) is not None:
        _number(freq, "max_share", f"{where}: frequency", 0.0, 1.0)
        _number(freq, "factor", f"{where}: frequency", 0.0)
    if (nl := _option(policy, "nonlandmark", _NONLANDMARK_KEYS, where)) is not None:
        _number(nl, "above", f"{where}: nonlandmark", 0.0, 1.0)
        _number(nl, "factor", f"{where}: nonlandmark", 0.0, 1.0)
    study = policy.get("study")
    if study is not None and not isinstance(study, dict):
        raise UserError(f"{where}: study must be null or an object (glr tune's record of the search)")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows; write a finite number")


def _refuse_repeats(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"key {twice[0]!r} is given twice in one object; keep one")
    return dict(pairs)


def load_policy(policy) -> dict:
    """A policy from a JSON path, a preset name ("identity", "seed-rules") or a dict; validated.

    Strict JSON: NaN/Infinity and a key given twice in one object are refused, as is every key the
    policy format does not name (`check_policy`)."""
    if isinstance(policy, dict):
        return check_policy(copy.deepcopy(policy))
    if isinstance(policy, str) and policy in PRESETS:
        return PRESETS[policy]()
    path = Path(policy)
    if not path.exists():
        raise UserError(f"{path}: no such policy file (or preset; presets: {', '.join(PRESETS)})")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a policy JSON file (from `glr tune --out`)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant,
                         object_pairs_hook=_refuse_repeats)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}: not a JSON policy ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file, expected a policy JSON file") from None
    except ValueError as e:  # _refuse_constant, _refuse_repeats
        raise UserError(f"{path}: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    return check_policy(doc, str(path))


def save_policy(policy: dict, path: str | os.PathLike) -> Path:
    """Write a policy as indented JSON, atomically."""
    from submissions.files import atomic_write_json

    check_policy(policy, str(path))
    return atomic_write_json(path, policy)


# ------------------------------------------------------------------------------ application


def apply_policy(policy: dict, d: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """(chosen candidate column [n] int, confidence [n] float64) for every query of `d`.

    Confidences are rounded to float32, as the predictions table stores them, so a GAP computed
    here equals the GAP of the written table. Pure numpy: ~ms for 100k queries.
    """
    n = d.n
    rows = np.arange(n)
    s0 = d.score[:, 0]
    kind = policy["kind"]
    chosen = np.zeros(n, dtype=np.int64)
    nl = policy.get("nonlandmark")
    if nl is not None and "nonlandmark" not in d.extra:
        raise UserError("the policy has a nonlandmark term but no non-landmark table was given: pass "
                        "--nonlandmark (from `glr nonlandmark`) or use a policy without the term")
    if kind == "identity" and policy.get("swap") is None and policy.get("frequency") is None and nl is None:
        return chosen, s0.astype(np.float32).astype(np.float64)

    kmax = d.kmax
    if kind == "bands":
        band = np.searchsorted(np.asarray(policy["edges"], dtype=np.float64), s0, side="right")
        bands = policy["bands"]
        k_idx = np.minimum(np.array([b["k"] for b in bands]), kmax)[band] - 1
    else:
        band = None
        k_idx = np.full(n, min(int(policy.get("k", 1)), kmax) - 1)
    A = d.agg[policy.get("aggregator", "max")]

    swap = policy.get("swap")
    if swap is not None and d.landmark.shape[1] > 1:
        a_all = A[k_idx, rows]  # [n, C]
        top = np.nan_to_num(a_all[:, 0], nan=0.0)
        alt = np.where(np.isnan(a_all[:, 1:]), -np.inf, a_all[:, 1:])
        j = np.argmax(alt, axis=1)
        best = alt[rows, j]
        do = best >= top + float(swap["margin"])
        chosen = np.where(do, j + 1, 0)
        a = a_all[rows, chosen]
    else:
        a = A[k_idx, rows, 0]

    conf = s0.copy()
    if kind == "bands":
        below = np.array([float(b["demote_below"]) for b in bands])[band]
        to = np.array([float(b["demote_to"]) for b in bands])[band]
        factor = np.array([b["demote"] == "factor" for b in bands])[band]
        demote = a < below  # NaN (not verified) → False
        lowered = np.where(factor, conf * to, np.minimum(conf, to))
        conf = np.where(demote, lowered, conf)
        at = np.array([np.inf if b.get("promote_at") is None else float(b["promote_at"]) for b in bands])[band]
        pto = np.array([float(b["promote_to"]) for b in bands])[band]
        promote = a >= at
        conf = np.where(promote, np.maximum(conf, pto), conf)
    elif kind == "blend":
        floor = float(policy["floor"])
        with np.errstate(over="ignore"):
            sig = 1.0 / (1.0 + np.exp(-float(policy["a"]) * (a.astype(np.float64) - float(policy["b"]))))
        conf = np.where(np.isnan(a), conf, conf * (floor + (1.0 - floor) * sig))

    freq = policy.get("frequency")
    if freq is not None and n:
        pc = d.code[:, 0] if swap is None else d.code[rows, chosen]
        counts = np.bincount(pc, minlength=d.n_codes)
        frequent = counts[pc] > float(freq["max_share"]) * n
        conf = np.where(frequent, conf * float(freq["factor"]), conf)
    if nl is not None:
        conf = np.where(d.extra["nonlandmark"] >= float(nl["above"]), conf * float(nl["factor"]), conf)
    return chosen, np.maximum(conf, 0.0).astype(np.float32).astype(np.float64)


def rescore(preds, inliers, policy, nonlandmark=None) -> pd.DataFrame:
    """Apply `policy` (path, preset name or dict) to a predictions table (path or DataFrame);
    `nonlandmark`: the per-query signal table a policy with the nonlandmark term needs.

    Returns a predictions-shaped table (id, landmark_id, score float32, rank int16), sorted by id
    then rank: rank 0 is the policy's prediction with its new confidence as score; the other
    candidates keep their original scores and order after it. `glr write-submission`
    (`submissions.format.write_submission_file`) takes it as is.
    """
    pol = load_policy(policy)
    d = prepare(preds, inliers, nonlandmark=nonlandmark)
    chosen, conf = apply_policy(pol, d)
    n, C = d.landmark.shape
    rows = np.arange(n)
    score = d.score.copy()
    score[rows, chosen] = conf
    # new column order: the chosen candidate first, then the others in their original order
    cols = np.arange(C)[None, :].repeat(n, 0)
    key = np.where(cols == chosen[:, None], -1, cols)
    order = np.argsort(key, axis=1, kind="stable")
    lm = np.take_along_axis(d.landmark, order, 1)
    sc = np.take_along_axis(score, order, 1)
    present = ~np.isnan(np.take_along_axis(d.score, order, 1))
    return pd.DataFrame({
        "id": pd.Series(np.repeat(d.ids, C)[present.ravel()], dtype="str"),
        "landmark_id": lm[present].astype(np.int64),
        "score": sc[present].astype(np.float32),
        "rank": np.tile(np.arange(C, dtype=np.int16), n)[present.ravel()],
    })
