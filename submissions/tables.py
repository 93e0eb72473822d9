"""The Parquet tables passed between stages (DESIGN.md "Data contracts"), and their one validator each.

predictions: id str, landmark_id int64, score float32, rank int16; top-k rows per image.
    Contract: ids non-empty; landmark_id an integer in [0, 2^63); score finite and >= 0 (it becomes a
    confidence); each id's ranks are exactly 0..n-1 (rank 0 = its prediction, no gap, no repeat,
    so every reader — evaluate, write-submission, tune, rescore — means the same row by "the
    prediction"); an (id, landmark_id) pair appears once (a repeated class would be summed twice by
    `glr ensemble`).
inliers: id str, landmark_id int64, ref_id str, inliers int32; one row per verified
    (query, candidate class, reference image).
    Contract: ids and ref_ids non-empty; landmark_id in [0, 2^63); inliers an integer in
    [0, 2^31); an (id, landmark_id, ref_id) triple appears once.

Every reader (`read_predictions`, `read_inliers`) and writer applies the same validator, so a value
that would wrap (rank 65536 in int16, landmark_id 2^63 in int64, 2^31 inliers in int32) or a table
that means different things to different commands is refused with one line naming the file, the
row (a CSV's file line, header = line 1; else the 0-based row of the table, as
`pd.read_parquet(path).iloc[row]`) and the column.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.errors import UserError
from submissions.files import atomic_path

PREDICTIONS = {"id": "str", "landmark_id": "int64", "score": "float32", "rank": "int16"}
INLIERS = {"id": "str", "landmark_id": "int64", "ref_id": "str", "inliers": "int32"}

# the values each integer column may hold: [low, high) — high a power of two, exact as a float too
_INT_RANGE = {"landmark_id": (0, 2**63), "rank": (0, 2**15), "inliers": (0, 2**31)}
_CSV_LINES_ATTR = "glr_csv_lines"  # set by `_read` on a frame read from a CSV: the file line of each row


def _row_name(df: pd.DataFrame, row: int) -> str:
    """`line N` (file line, header = 1) for a table read from a CSV, `row N` (0-based) otherwise."""
    lines = df.attrs.get(_CSV_LINES_ATTR)
    return f"line {int(lines[row])}" if lines is not None else f"row {row}"


def _at(df: pd.DataFrame, source: str, row: int) -> str:
    return f"{source}: {_row_name(df, row)}"


def integer_values(values: pd.Series, lo: int, hi: int) -> tuple[np.ndarray, int | None]:
    """(the column as int64, the first row that is not an integer in [lo, hi), or None) — exact for
    every dtype (no float rounding near 2^63, no wrap-around of uint64 or Python ints)."""
    arr = values.to_numpy()
    if arr.dtype.kind not in "iuf":  # text (a CSV) or Python ints: numbers where they all are, exact
        try:
            arr = pd.to_numeric(values).to_numpy()
        except (ValueError, TypeError, OverflowError):
            pass
    kind = arr.dtype.kind
    if kind == "i":
        wide = arr.astype(np.int64)
        bad = (wide < lo) | (wide > hi - 1)
    elif kind == "u":  # lo is 0 for every column
        bad = arr.astype(np.uint64) > np.uint64(hi - 1)
    elif kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr % 1 != 0) | (arr < lo) | (arr >= float(hi))
    else:  # object (a hand-made CSV, Python ints of any size), bool, strings: one by one
        bad = np.fromiter((not _is_int_in(v, lo, hi) for v in arr), dtype=bool, count=len(arr))
    if bad.any():
        return np.zeros(0, np.int64), int(np.flatnonzero(bad)[0])
    if kind in "iuf":
        return arr.astype(np.int64), None
    return np.array([int(float(v)) if isinstance(v, float) else int(v) for v in arr], dtype=np.int64), None


def _is_int_in(v, lo: int, hi: int) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, np.integer)):
        return lo <= int(v) < hi
    if isinstance(v, (float, np.floating)):
        return bool(np.isfinite(v)) and float(v) % 1 == 0 and lo <= v < hi
    if isinstance(v, str) and v.strip().lstrip("+-").isascii() and v.strip().lstrip("+-").isdigit():
        return lo <= int(v) < hi
    return False


def show_value(value) -> str:
    """A cell as a person wrote it: numpy scalars as plain numbers, a CSV's text quoted."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _coerce(df: pd.DataFrame, schema: dict[str, str], what: str, source: str) -> pd.DataFrame:
    """The schema's columns with its dtypes; UserError at the first value that breaks a column's type."""
    if df.columns.duplicated().any():
        twice = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        raise UserError(f"{source}: column {', '.join(map(repr, twice))} appears more than once; keep one of each")
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise UserError(
            f"{source}: {what} table lacks column(s) {', '.join(missing)} "
            f"(expected {', '.join(schema)}; found {', '.join(map(str, df.columns)) or 'none'})"
        )
    out = pd.DataFrame(index=range(len(df)))
    for col, dtype in schema.items():
        values = df[col].reset_index(drop=True)
        if dtype == "str":
            empty = values.isna().to_numpy() | (values == "").to_numpy(dtype=bool)
            if empty.any():
                raise UserError(f"{_at(df, source, int(np.flatnonzero(empty)[0]))}: column {col!r} is empty")
            out[col] = values.astype(str)
        elif dtype.startswith("int"):
            lo, hi = _INT_RANGE[col]
            ints, row = integer_values(values, lo, hi)
            if row is not None:
                raise UserError(f"{_at(df, source, row)}: column {col!r} is {show_value(values.iloc[row])}, expected an "
                                f"integer from {lo} to {hi - 1}")
            out[col] = ints.astype(dtype)
        else:
            numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            with np.errstate(over="ignore", invalid="ignore"):
                cast = numeric.astype(dtype) + 0  # + 0: -0.0 becomes 0.0
                bad = ~np.isfinite(cast) | (cast < 0)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                why = "negative" if cast[row] < 0 else "not a finite number"
                raise UserError(f"{_at(df, source, row)}: column {col!r} is {show_value(values.iloc[row])}: {why} "
                                f"(expected a finite number >= 0 as a {dtype}; a score becomes a confidence)")
            out[col] = cast
    return out


def _first_repeat(df: pd.DataFrame, keys: list[str]) -> int | None:
    dup = df.duplicated(keys).to_numpy()
    return int(np.flatnonzero(dup)[0]) if dup.any() else None


def _check_ranks(out: pd.DataFrame, df: pd.DataFrame, source: str) -> None:
    """Each id's ranks are exactly 0..n-1: n = its row count, every rank below n, none repeated."""
    codes, uniques = pd.factorize(out["id"], sort=False)
    counts = np.bincount(codes, minlength=len(uniques))
    rank = out["rank"].to_numpy(dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    over = rank >= counts[codes]
    slot = np.where(over, 0, starts[codes] + rank)
    seen = np.bincount(slot[~over], minlength=len(out))
    repeated = np.zeros(len(out), dtype=bool)
    if (seen > 1).any():  # name the second row of a repeated rank, not the first
        kept = np.flatnonzero(~over)
        repeated[kept] = pd.Series(slot[kept]).duplicated().to_numpy()
    bad = over | repeated
    if not bad.any():
        return
    row = int(np.flatnonzero(bad)[0])
    qid = out["id"][row]
    ranks = np.sort(rank[codes == codes[row]])
    shown = ", ".join(map(str, ranks[:8])) + (", …" if len(ranks) > 8 else "")
    raise UserError(
        f"{_at(df, source, row)}: column 'rank': id {qid!r} has ranks {shown}, expected 0..{len(ranks) - 1} "
        "(each id's ranks count 0, 1, … with no gap or repeat; rank 0 is its prediction)"
    )


def validate_predictions(df: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """Return `df` with the predictions schema's columns and dtypes, or raise UserError (contract:
    module docstring)."""
    out = _coerce(df, PREDICTIONS, "predictions", source)
    _check_ranks(out, df, source)
    row = _first_repeat(out, ["id", "landmark_id"])
    if row is not None:
        first = int(np.flatnonzero(((out["id"] == out["id"][row]) & (out["landmark_id"] == out["landmark_id"][row]))
                                   .to_numpy())[0])
        raise UserError(f"{_at(df, source, row)}: column 'landmark_id': id {out['id'][row]!r} lists landmark "
                        f"{out['landmark_id'][row]} twice (also on {_row_name(df, first)}); "
                        "keep one row per candidate class")
    return out


def validate_inliers(df: pd.DataFrame, source: str = "inliers") -> pd.DataFrame:
    """Return `df` with the inliers schema's columns and dtypes, or raise UserError (contract:
    module docstring)."""
    out = _coerce(df, INLIERS, "inliers", source)
    row = _first_repeat(out, ["id", "landmark_id", "ref_id"])
    if row is not None:
        raise UserError(f"{_at(df, source, row)}: column 'ref_id': the pair (id {out['id'][row]!r}, landmark "
                        f"{out['landmark_id'][row]}) has reference {out['ref_id'][row]!r} twice; one row per "
                        "verified reference")
    return out


def _read(path: str | os.PathLike) -> pd.DataFrame:
    """A table file as it is (Parquet, or CSV for hand-made ones; ids as text); the validators judge it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a table file (Parquet or CSV)")
    if path.suffix == ".csv":
        return _read_csv_table(path)
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"{path}: column {', '.join(map(repr, twice))} appears more than once; keep one of each")
        return pq.read_table(path).to_pandas()
    except UserError:
        raise
    except Exception as e:  # pyarrow raises many types for a non-Parquet file; its text may span lines
        detail = " ".join(str(e).split())
        raise UserError(f"{path}: cannot read as a Parquet table ({e.__class__.__name__}: {detail})") from None


def _read_csv_table(path: Path) -> pd.DataFrame:
    """A hand-made CSV table as text (the validators read each column by its type), with the file
    line of each row for their messages; a short or long row, a repeated column: one line."""
    from submissions.format import read_csv_text

    df, lines = read_csv_text(path)
    df.attrs[_CSV_LINES_ATTR] = lines
    return df


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a predictions table (Parquet, or CSV for hand-made ones)."""
    return validate_predictions(_read(path), str(path))


def read_inliers(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate an inliers table (Parquet, or CSV for hand-made ones)."""
    return validate_inliers(_read(path), str(path))


def empty_inliers() -> pd.DataFrame:
    """An inliers table without rows (the schema's columns and dtypes): no pair verified."""
    return validate_inliers(pd.DataFrame({c: pd.Series(dtype=object if t == "str" else t) for c, t in INLIERS.items()}))


def write_table(df: pd.DataFrame, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a table as Parquet atomically; `metadata` (key → text) joins the file's key-value metadata,
    where a reader finds it without loading the rows (`pyarrow.parquet.read_schema(path).metadata`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        extra = {str(k).encode(): str(v).encode() for k, v in metadata.items()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_predictions(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate and atomically write a predictions table, sorted by id then rank."""
    out = validate_predictions(df).sort_values(["id", "rank"], kind="stable")
    return write_table(out.reset_index(drop=True), path)


def write_inliers(df: pd.DataFrame, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Validate and atomically write an inliers table, with optional key-value `metadata` (e.g. the
    settings `glr verify` computed it with, so a re-run knows which counts it may reuse)."""
    return write_table(validate_inliers(df), path, metadata)
