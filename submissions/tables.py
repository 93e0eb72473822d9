"""The Parquet tables passed between stages (DESIGN.md "Data contracts").

predictions: id str, landmark_id int64, score float32, rank int16 (0 = top); top-k rows per image.
inliers:     id str, landmark_id int64, ref_id str, inliers int32; one row per verified
             (query, candidate class, reference image).
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


def _coerce(df: pd.DataFrame, schema: dict[str, str], what: str, source: str) -> pd.DataFrame:
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
            if values.isna().any():
                row = int(np.flatnonzero(values.isna().to_numpy())[0])
                raise UserError(f"{source}: row {row}: column {col!r} is empty")
            out[col] = values.astype(str)
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        bad = numeric.isna().to_numpy() | ~np.isfinite(numeric.to_numpy(dtype="float64", na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(f"{source}: row {row}: column {col!r} has non-numeric or non-finite value {values.iloc[row]!r}")
        if dtype.startswith("int") and (numeric.to_numpy(dtype="float64") % 1 != 0).any():
            row = int(np.flatnonzero(numeric.to_numpy(dtype="float64") % 1 != 0)[0])
            raise UserError(f"{source}: row {row}: column {col!r} must be an integer, got {values.iloc[row]!r}")
        out[col] = numeric.astype(dtype)
    return out


def validate_predictions(df: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """Return `df` with the predictions schema's columns and dtypes, or raise UserError."""
    out = _coerce(df, PREDICTIONS, "predictions", source)
    dup = out.duplicated(["id", "rank"]).to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise UserError(f"{source}: row {row}: id {out['id'][row]!r} has rank {out['rank'][row]} twice")
    return out


def validate_inliers(df: pd.DataFrame, source: str = "inliers") -> pd.DataFrame:
    """Return `df` with the inliers schema's columns and dtypes, or raise UserError."""
    out = _coerce(df, INLIERS, "inliers", source)
    if (out["inliers"] < 0).any():
        row = int(np.flatnonzero((out["inliers"] < 0).to_numpy())[0])
        raise UserError(f"{source}: row {row}: negative inlier count")
    return out


def _read(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path, dtype={"id": str, "ref_id": str})
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises many types for a non-Parquet file
        raise UserError(f"{path}: cannot read table ({e.__class__.__name__}: {e})") from None


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
