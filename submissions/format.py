"""The `id,landmarks` submission file and the `solution.csv` ground truth.

A submission row is `id,landmarks` where `landmarks` is `"<landmark_id> <confidence>"` or empty
(no prediction). In memory a submission is the *canonical* DataFrame:

    id           str      the query image id
    landmark_id  Int64    predicted landmark, <NA> = no prediction
    confidence   float64  its confidence, NaN when there is no prediction

The grammar of a `landmarks` cell, the one parser behind every reader of the format (`glr gap`,
`glr submit`'s pre-upload check, `glr write-submission`'s check of what it wrote):

    cell        = "" | landmark_id " " confidence          (exactly one ASCII space, nothing around)
    landmark_id = [0-9]+                                    (ASCII digits, at most 2^63 - 1)
    confidence  = [0-9]+ ("." [0-9]+)? ([eE] [+-]? [0-9]+)?  (ASCII; its value must be finite)

So no sign (`-1`, `+0.5`, `-0`), no `inf`/`nan`, no `0_5` digit grouping, no non-ASCII digits, no
`.5` or `5.`, no `1e400` (infinite as a double): what Python's float() would read but Kaggle's
scorer might not. `write_submission` writes exactly this grammar (shortest round-trip decimals).

`solution.csv` is `id,landmarks,Usage`: `landmarks` holds zero (non-landmark query), one or several
space-separated landmark ids; `Usage` is Public, Private or Ignored. Without a `Usage` column every
row counts as both Public and Private (its usage reads "All"). `read_solution` returns `id` (str),
`landmarks` (tuple of int; empty = non-landmark query) and `usage` (str).

Reading is vectorised (pyarrow's CSV reader and string kernels), so a 1M-row file is parsed in a
fraction of a second; only rows that fail the fast check are looked at one by one, to name the
problem. Line numbers in messages are file line numbers (header = line 1).
"""
from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.errors import UserError
from submissions.files import atomic_path

SUBMISSION_HEADER = ("id", "landmarks")
CANONICAL_COLUMNS = ("id", "landmark_id", "confidence")
USAGES = ("Public", "Private", "Ignored")
ALL_USAGE = "All"  # a solution without a Usage column: the row counts as Public and Private
SAMPLE_SUBMISSION = "sample_submission.csv"  # the competition's file naming the test ids

# The module docstring's grammar, as regular expressions (RE2 in Arrow, `re` here: [0-9] is ASCII in both)
CONFIDENCE_GRAMMAR = r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
LANDMARK_ID_GRAMMAR = r"[0-9]+"
_CONFIDENCE_RE = re.compile(CONFIDENCE_GRAMMAR)
_LANDMARK_ID_RE = re.compile(LANDMARK_ID_GRAMMAR)
_CANONICAL_PAIR = rf"^[0-9]{{1,18}} {CONFIDENCE_GRAMMAR}$"  # the vectorised path (18 digits always fit int64)
_SHOWN = 10  # problems shown in a check_submission error
_INT64_MAX = 2**63 - 1


def _is_landmark_id(token: str) -> bool:
    """ASCII digits only, fitting int64 (leading zeros allowed) — the same rule as the fast readers'."""
    return _LANDMARK_ID_RE.fullmatch(token) is not None and int(token) <= _INT64_MAX


def parse_confidence(text: str) -> float:
    """The one reading of a confidence (module docstring's grammar): its value, or ValueError saying
    what is wrong with it (every reader of a submission file names problems with these words)."""
    if _CONFIDENCE_RE.fullmatch(text) is None:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and math.isnan(value):
            raise ValueError(f"confidence {_short(text)} is NaN")
        if value is not None and math.copysign(1.0, value) < 0:  # -0.0 too
            raise ValueError(f"confidence {_short(text)} is negative")
        if value is not None and math.isinf(value):
            raise ValueError(f"confidence {_short(text)} is infinite")
        raise ValueError(f"confidence {_short(text)} is not a plain decimal number "
                         "(ASCII digits, optional .digits and e±digits; no sign)")
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"confidence {_short(text)} is infinite (too large for a double)")
    return value


def parse_landmarks_cell(text: str) -> tuple[int, float] | None:
    """The one reading of a `landmarks` cell: None (no prediction) or (landmark_id, confidence);
    ValueError naming the problem otherwise."""
    if text == "":
        return None
    tokens = text.split(" ")
    if len(tokens) != 2 or not all(tokens):
        raise ValueError(f"cannot parse landmarks {_short(text)}: expected '<landmark_id> <confidence>' "
                         "separated by one space, or empty")
    lid, conf = tokens
    if not _is_landmark_id(lid):
        raise ValueError(f"landmark id {_short(lid)} is not a non-negative integer below 2^63")
    return int(lid), parse_confidence(conf)


# ------------------------------------------------------------------------------ CSV reading


@dataclass
class _Csv:
    """A CSV file read as strings: columns, the file line of each row, and row-level problems."""

    path: Path
    header: list[str]
    columns: dict  # name -> pyarrow StringArray
    lines: np.ndarray  # file line number of each row
    problems: list[tuple[int, str]]  # (line, message)


def read_csv_header(path: Path) -> list[str]:
    """The column names on a CSV's first line; one UserError for a missing, empty, binary file or a
    column name given twice (the rules every CSV reader of glr's tables shares)."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a CSV file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = f.readline()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if not first.strip():
        raise UserError(f"{path}: file is empty (expected a header line)")
    header = [c.strip().strip('"') for c in first.rstrip("\r\n").split(",")]
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise UserError(f"{path}: line 1: column {', '.join(map(repr, twice))} appears more than once "
                        f"(header is {first.strip()!r}); keep one column of each name")
    return header


def _header_only(path: Path) -> bool:
    """True when nothing follows the header line (with or without its newline)."""
    with open(path, "rb") as f:
        f.readline()
        return not f.read(1)


def _read_csv(path: str | os.PathLike, header: list[str]) -> _Csv:
    """Read every column of `path` as strings, keeping the file line number of each row."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    path = Path(path)
    if _header_only(path):  # Arrow refuses a header without rows (and without its newline)
        empty = {c: pa.chunked_array([], pa.string()) for c in header}
        return _Csv(path, header, empty, np.zeros(0, dtype=np.int64), [])

    def read(use_threads: bool, bad: list) -> "pa.Table":
        def handler(row) -> str:
            bad.append(row)
            return "skip"

        return pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(use_threads=use_threads, column_names=header, skip_rows=1),
            parse_options=pcsv.ParseOptions(invalid_row_handler=handler, ignore_empty_lines=False),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in header}, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )

    try:
        bad: list = []
        table = read(True, bad)
        if bad:  # only a single-threaded read knows the line numbers of bad rows
            bad = []
            table = read(False, bad)
    except pa.ArrowInvalid as e:
        raise UserError(f"{path}: cannot parse as CSV ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    n = table.num_rows
    # the reader reports physical line numbers (header = line 1) even with skip_rows; 0 = unknown
    at = [int(r.number) if r.number is not None and r.number > 0 else 0 for r in bad]
    skipped = np.array(sorted(line for line in at if line), dtype=np.int64)
    lines = np.arange(2, 2 + n + len(skipped), dtype=np.int64)
    if len(skipped):
        lines = np.setdiff1d(lines, skipped, assume_unique=True)
    problems = [
        (line, f"expected {r.expected_columns} fields ({','.join(header)}), found {r.actual_columns}")
        for line, r in zip(at, bad)
    ]
    columns = {c: table.column(c) for c in header}  # ChunkedArrays: combining them would copy
    return _Csv(path, header, columns, lines[:n], problems)


def read_csv_text(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """A CSV table read as text (every cell a str, nothing guessed or called missing) and the file
    line of each row; one UserError naming the lines whose field count is wrong. For hand-made
    tables, whose validators then read the text by their own contract."""
    path = Path(path)
    header = read_csv_header(path)
    csv = _read_csv(path, header)
    if csv.problems:
        raise UserError(_summary(path, _format_problems(csv.problems)))
    frame = pd.DataFrame({c: pd.Series(csv.columns[c].to_pandas(), dtype=object) for c in header})
    return frame.reset_index(drop=True), csv.lines


def _read_id_csv(path: Path) -> _Csv:
    """A CSV that must have an `id` column (a sample submission), read as strings; its contract:
    every row has every field, ids are non-empty and unique (else one UserError naming the lines)."""
    header = read_csv_header(path)
    if "id" not in header:
        raise UserError(f"{path}: line 1: no 'id' column (header is {','.join(header)!r})")
    csv = _read_csv(path, header)
    ids = csv.columns["id"]
    problems = csv.problems + _empty_ids(ids, csv.lines) + _duplicates(ids, csv.lines)
    if problems:
        raise UserError(_summary(path, _format_problems(problems)))
    return csv


def _array(values):
    """One contiguous pyarrow array (some kernels refuse ChunkedArrays)."""
    return values.combine_chunks() if hasattr(values, "combine_chunks") else values


def _format_problems(problems: list[tuple[int, str]], prefix: str = "line") -> list[str]:
    return [f"{prefix} {line}: {msg}" for line, msg in sorted(problems, key=lambda p: p[0])]


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


# ------------------------------------------------------------------------------ landmarks


def _diagnose_pair(text: str) -> tuple[int | None, float | None, str | None]:
    """Parse one non-canonical `landmarks` cell slowly: (landmark, confidence, problem)."""
    try:
        pair = parse_landmarks_cell(text)
    except ValueError as e:
        return None, None, str(e)
    return (None, None, None) if pair is None else (pair[0], pair[1], None)


def _parse_pairs(cells, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Vectorised parse of `landmarks` cells: (landmark int64, confidence float64, has_pred, problems)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(cells)
    lid = np.zeros(n, dtype=np.int64)
    conf = np.full(n, np.nan)
    has = np.zeros(n, dtype=bool)
    problems: list[tuple[int, str]] = []
    fast = pc.match_substring_regex(cells, _CANONICAL_PAIR).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(fast)
    if len(rows):
        parts = pc.split_pattern(cells.filter(pa.array(fast)), " ")
        lid[rows] = pc.cast(pc.list_element(parts, 0), pa.int64()).to_numpy()
        conf[rows] = pc.cast(pc.list_element(parts, 1), pa.float64()).to_numpy()
        has[rows] = True
        fast[rows[~np.isfinite(conf[rows])]] = False  # 1e400: the scalar parser names it below
    slow = np.flatnonzero(~fast)  # empty cells (no prediction) and anything unusual
    if len(slow):
        texts = cells.take(pa.array(slow)).to_pylist()
        for r, text in zip(slow.tolist(), texts):
            value_lid, value_conf, problem = _diagnose_pair(text)
            has[r], conf[r] = False, np.nan
            if problem:
                problems.append((int(lines[r]), problem))
            elif value_lid is not None:
                lid[r], conf[r], has[r] = value_lid, value_conf, True
    return lid, conf, has, problems


def fixed_width_bytes(ids) -> np.ndarray | None:
    """An (n, L) uint8 view of a pyarrow string array whose values all take L bytes (Kaggle's ids
    are 16 hex digits), or None. Lets ids be hashed and compared with numpy, no Python objects."""
    import pyarrow as pa

    arr = _array(ids)
    if len(arr) == 0 or arr.null_count or not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return None
    bufs = arr.buffers()
    dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(bufs[1], dtype=dtype, count=len(arr) + 1, offset=arr.offset * np.dtype(dtype).itemsize)
    width = int(offsets[1] - offsets[0])
    if width == 0 or width > 256 or offsets[-1] - offsets[0] != width * len(arr) or (np.diff(offsets) != width).any():
        return None
    data = np.frombuffer(bufs[2], dtype=np.uint8, count=width * len(arr), offset=int(offsets[0]))
    return data.reshape(len(arr), width)


def hash_rows(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of an (n, L) uint8 matrix (splitmix-style mixing of 8-byte words)."""
    n, width = rows.shape
    if width % 8:
        rows = np.concatenate([rows, np.zeros((n, 8 - width % 8), dtype=np.uint8)], axis=1)
    words = np.ascontiguousarray(rows).view(np.uint64)
    h = np.full(n, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for w in range(words.shape[1]):
        h ^= words[:, w]
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
    return h


def has_duplicates(ids) -> bool:
    """Exact: does a pyarrow string array repeat a value? Equal-width ids: a numpy hash + sort
    (tens of ms for 1M), confirmed by Arrow's hash table only when two hashes collide."""
    import pyarrow.compute as pc

    arr = _array(ids)
    rows = fixed_width_bytes(arr)
    if rows is not None:
        h = np.sort(hash_rows(rows))
        if not (h[1:] == h[:-1]).any():
            return False
    return len(pc.dictionary_encode(arr).dictionary) != len(arr)


def _duplicates(ids, lines: np.ndarray, what: str = "id") -> list[tuple[int, str]]:
    """One problem per repeated id, naming the line where it first appeared."""
    import pyarrow.compute as pc

    ids = _array(ids)
    if not has_duplicates(ids):
        return []
    codes = pc.dictionary_encode(ids).indices.to_numpy()
    _, first = np.unique(codes, return_index=True)
    first_of = first[codes]
    dup = np.flatnonzero(first_of != np.arange(len(codes)))
    values = ids.take(dup).to_pylist()
    return [
        (int(lines[r]), f"duplicate {what} {_short(v)} (first on line {int(lines[first_of[r]])})")
        for r, v in zip(dup.tolist(), values)
    ]


def _empty_ids(ids, lines: np.ndarray) -> list[tuple[int, str]]:
    import pyarrow.compute as pc

    empty = np.flatnonzero(pc.equal(pc.utf8_length(ids), 0).to_numpy(zero_copy_only=False))
    return [(int(lines[r]), "empty id") for r in empty.tolist()]


# ------------------------------------------------------------------------------ submissions


def _check_header(path: Path, header: list[str]) -> None:
    """The header exactly as Kaggle writes it (a BOM and CRLF allowed; no spaces, no other case)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        raw = f.readline().rstrip("\r\n")
    if raw not in (",".join(SUBMISSION_HEADER), ",".join(f'"{c}"' for c in SUBMISSION_HEADER)):
        raise _HeaderError(f"line 1: header is {raw!r}, expected {','.join(SUBMISSION_HEADER)!r}")


class _HeaderError(Exception):
    pass


def _load_submission(path: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray, list[tuple[int, str]]]:
    """Parse a submission file: (canonical frame of the parsable rows, their lines, problems)."""
    path = Path(path)
    header = read_csv_header(path)
    _check_header(path, header)
    csv = _read_csv(path, list(SUBMISSION_HEADER))
    ids, cells = csv.columns["id"], csv.columns["landmarks"]
    problems = list(csv.problems)
    problems += _empty_ids(ids, csv.lines)
    problems += _duplicates(ids, csv.lines)
    lid, conf, has, pair_problems = _parse_pairs(cells, csv.lines)
    problems += pair_problems
    frame = _canonical_frame(ids, lid, conf, has)
    return frame, csv.lines, problems


def _canonical_frame(ids, lid: np.ndarray, conf: np.ndarray, has: np.ndarray) -> pd.DataFrame:
    conf = np.where(has, conf, np.nan)
    return pd.DataFrame(
        {
            "id": pd.Series(ids.to_pandas(), dtype="str") if hasattr(ids, "to_pandas") else pd.Series(ids, dtype="str"),
            "landmark_id": pd.arrays.IntegerArray(np.where(has, lid, 0).astype(np.int64), ~has),
            "confidence": conf.astype(np.float64),
        }
    )


def _fast_submission(path: Path) -> pd.DataFrame | None:
    """The clean, unquoted file in one typed CSV pass, or None (then the checking path decides).

    `id,<lid> <conf>` becomes `id,<lid>,<conf>` (and `id,` becomes `id,,`) so Arrow's CSV reader
    parses the numbers itself; anything unusual (quotes, extra spaces, a bad value, a duplicate
    or empty id) returns None and the file is read again by the path that names each problem."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    raw = path.read_bytes()
    if b'"' in raw or b"\t" in raw or b"\r" in raw or b"\n\n" in raw:
        return None
    first = raw.find(b"\n")
    if first < 0 or raw[:first].lstrip(b"\xef\xbb\xbf") != b"id,landmarks":
        return None
    body = raw[first + 1 :].replace(b" ", b",").replace(b",\n", b",,\n")
    if body.endswith(b","):
        body += b","
    if b",+" in body or b",-" in body:  # signs: left to the strict path's rules
        return None
    bad = []

    def handler(row) -> str:
        bad.append(row)
        return "skip"

    try:
        table = pcsv.read_csv(
            pa.py_buffer(body),
            read_options=pcsv.ReadOptions(column_names=["id", "landmark_id", "confidence"]),
            parse_options=pcsv.ParseOptions(invalid_row_handler=handler),
            convert_options=pcsv.ConvertOptions(
                column_types={"id": pa.string(), "landmark_id": pa.int64(), "confidence": pa.string()},
                strings_can_be_null=False,
                null_values=[""],  # only an empty cell is "no value" ("NA", "null" are errors)
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    if bad:
        return None
    text = _array(table.column("confidence"))  # the confidences as written: held to the one grammar
    if not pc.all(pc.match_substring_regex(text, f"^(?:{CONFIDENCE_GRAMMAR})?$")).as_py():
        return None
    ids = _array(table.column("id"))
    lid = table.column("landmark_id").to_numpy().astype(np.float64)  # NaN where empty
    conf = pc.cast(pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text), pa.float64()).to_numpy(
        zero_copy_only=False)
    has = ~np.isnan(lid)
    if (
        (has != ~np.isnan(conf)).any()
        or (lid[has] < 0).any()
        or not np.isfinite(conf[has]).all()
        or (conf[has] < 0).any()
        or _empty_ids(ids, np.zeros(len(ids), np.int64))
        or has_duplicates(ids)
    ):
        return None
    lid_int = table.column("landmark_id").fill_null(0).to_numpy()
    return _canonical_frame(ids, lid_int, np.nan_to_num(conf), has)


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """Read an `id,landmarks` file into the canonical DataFrame.

    Raises one UserError listing the bad rows by file line (unparsable or negative/NaN/inf
    confidence, non-integer landmark, duplicate or empty id, wrong field count or header), because
    scoring a half-read file would give a silently wrong GAP.
    """
    path = Path(path)
    header = read_csv_header(path)  # a clear error for a missing, empty or binary file
    if tuple(header) == SUBMISSION_HEADER:
        frame = _fast_submission(path)
        if frame is not None:
            return frame
    try:
        frame, _, problems = _load_submission(path)
    except _HeaderError as e:
        raise UserError(f"{path}: {e}") from None
    if problems:
        raise UserError(_summary(path, _format_problems(problems)))
    return frame


def _summary(path: Path, messages: list[str]) -> str:
    shown = "; ".join(messages[:_SHOWN])
    more = f"; … and {len(messages) - _SHOWN} more" if len(messages) > _SHOWN else ""
    return f"{path}: {len(messages)} problem{'s' if len(messages) != 1 else ''}: {shown}{more}"


def validate_submission(path: str | os.PathLike, sample_path: str | os.PathLike | None = None) -> list[str]:
    """Every problem of a submission file, one message each, ordered by line ("line N: …").

    With `sample_path` (the competition's `sample_submission.csv`) also reports ids missing from
    the submission ("<sample> line N: id … has no row in the submission") and extra ids. An empty
    list means the file is valid; Kaggle rejects files with any of these problems.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(path)
    try:
        frame, lines, problems = _load_submission(path)
    except _HeaderError as e:
        return [str(e)]
    messages = _format_problems(problems)
    if sample_path is None:
        return messages
    sample_path = Path(sample_path)
    sample = _read_id_csv(sample_path)
    sample_ids = _array(sample.columns["id"])
    sub_ids = pa.array(frame["id"].to_numpy(dtype=object), type=pa.string())
    extra = np.flatnonzero(~pc.is_in(sub_ids, value_set=sample_ids).to_numpy(zero_copy_only=False))
    extra_problems = [
        (int(lines[r]), f"id {_short(v)} is not in {sample_path.name}")
        for r, v in zip(extra.tolist(), sub_ids.take(pa.array(extra)).to_pylist())
    ]
    missing = np.flatnonzero(~pc.is_in(sample_ids, value_set=sub_ids).to_numpy(zero_copy_only=False))
    missing_messages = [
        f"{sample_path.name} line {int(sample.lines[r])}: id {_short(v)} has no row in the submission"
        for r, v in zip(missing.tolist(), sample_ids.take(pa.array(missing)).to_pylist())
    ]
    return _format_problems(problems + extra_problems) + missing_messages


def check_submission(path: str | os.PathLike, sample_path: str | os.PathLike | None = None) -> None:
    """Raise one UserError summarising every problem (first 10 shown, plus the count); else return."""
    messages = validate_submission(path, sample_path)
    if messages:
        raise UserError(_summary(Path(path), messages))


def canonical_submission(df: pd.DataFrame, source: str = "submission") -> pd.DataFrame:
    """Return `df` coerced to the canonical dtypes, or raise UserError (missing columns, duplicate
    ids, a prediction with a NaN/inf/negative confidence)."""
    missing = [c for c in CANONICAL_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{source}: lacks column(s) {', '.join(missing)} (expected {', '.join(CANONICAL_COLUMNS)})")
    ids = df["id"]
    if ids.isna().any():
        raise UserError(f"{source}: row {int(np.flatnonzero(ids.isna().to_numpy())[0])}: empty id")
    out = pd.DataFrame(
        {
            "id": ids.astype("str").reset_index(drop=True),
            "landmark_id": pd.to_numeric(df["landmark_id"].reset_index(drop=True), errors="raise").astype("Int64"),
            "confidence": df["confidence"].reset_index(drop=True).astype("float64"),
        }
    )
    has = out["landmark_id"].notna().to_numpy()
    negative = has & (out["landmark_id"].to_numpy(dtype=np.float64, na_value=0) < 0)
    if negative.any():
        r = int(np.flatnonzero(negative)[0])
        raise UserError(f"{source}: row {r}: id {out['id'][r]!r} has landmark_id {out['landmark_id'][r]} (must be >= 0)")
    conf = out["confidence"].to_numpy()
    bad = has & ~(np.isfinite(conf) & (conf >= 0))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise UserError(f"{source}: row {r}: id {out['id'][r]!r} has confidence {conf[r]!r} (must be finite and >= 0)")
    out["confidence"] = np.where(has, conf + 0.0, np.nan)  # + 0.0: -0.0 is written "0", not "-0"
    return out


def write_submission(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a canonical submission as `id,landmarks` atomically, rows in the frame's order.

    Confidences are written as the shortest decimal that reads back to the same float64, so the
    ranking (and the GAP) of the file is exactly that of the frame; no prediction → empty landmarks.
    """
    with atomic_path(path, suffix=".csv") as tmp:
        _write_rows(df, tmp)
    return Path(path)


def _write_rows(df: pd.DataFrame, path: Path) -> None:
    """`write_submission`'s body, writing `path` in place (the caller makes it atomic)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    df = canonical_submission(df)
    has = df["landmark_id"].notna().to_numpy()
    lid = pa.array(df["landmark_id"].to_numpy(dtype=np.int64, na_value=0)).cast(pa.string())
    conf = pa.array(df["confidence"].to_numpy()).cast(pa.string())  # shortest round-trip repr
    pair = pc.binary_join_element_wise(lid, conf, " ")
    landmarks = pc.if_else(pa.array(has), pair, pa.scalar("", pa.string()))
    table = pa.table({"id": pa.array(df["id"].to_numpy(dtype=object), type=pa.string()), "landmarks": landmarks})
    for quoting in ("none", "needed"):  # Kaggle's own files are unquoted; quote only if an id needs it
        try:
            with open(path, "wb") as f:
                f.write(b"id,landmarks\n")
                options = pcsv.WriteOptions(quoting_style=quoting, include_header=False)
                pcsv.write_csv(table, f, write_options=options)
            return
        except pa.ArrowInvalid:
            continue


def submission_from_predictions(preds: pd.DataFrame) -> pd.DataFrame:
    """Canonical submission from a predictions table (submissions.tables, whose contract gives
    every id a rank-0 row): that row gives its landmark and confidence (= score). Ids keep the
    order of their first appearance. The one place this conversion is done."""
    from submissions.tables import validate_predictions

    preds = validate_predictions(preds)
    ids = pd.unique(preds["id"].to_numpy(dtype=object))
    top = preds[preds["rank"] == 0].set_index("id")
    top = top.reindex(pd.Index(ids, dtype="str"))
    has = top["landmark_id"].notna().to_numpy()
    return pd.DataFrame(
        {
            "id": pd.Series(ids, dtype="str"),
            "landmark_id": pd.array(top["landmark_id"].to_numpy(), dtype="Int64"),
            "confidence": np.where(has, top["score"].to_numpy(dtype=np.float64), np.nan),
        }
    )


def align_submission(submission: pd.DataFrame, ids) -> pd.DataFrame:
    """Reorder a canonical submission to exactly `ids` (e.g. sample_submission's): ids it lacks get
    no prediction, ids not in `ids` are dropped — the file Kaggle accepts."""
    sub = canonical_submission(submission).drop_duplicates("id").set_index("id")
    index = pd.Index(pd.Series(ids, dtype="str"))
    out = sub.reindex(index).reset_index()
    out.columns = list(CANONICAL_COLUMNS)
    out["landmark_id"] = out["landmark_id"].astype("Int64")
    return out


def read_sample_ids(path: str | os.PathLike) -> pd.Series:
    """The ids of a sample submission (or any CSV with an `id` column), in file order."""
    csv = _read_id_csv(Path(path))
    return pd.Series(csv.columns["id"].to_pandas(), dtype="str", name="id")


def sample_submission_path(sample: str | os.PathLike) -> Path:
    """The competition's `sample_submission.csv`: `sample` itself, or the file in the folder `sample`."""
    path = Path(sample)
    if path.is_dir():
        path = path / SAMPLE_SUBMISSION
    if not path.exists():
        raise UserError(f"{path}: no such file (need the competition's {SAMPLE_SUBMISSION} for the test ids)")
    return path


def write_submission_file(preds, sample: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the submission `out` (id,landmarks) from a predictions table, checked before it lands.

    `preds`: a predictions table (submissions.tables) or its path; rank 0 of each id is its
    prediction (e.g. `glr rescore`'s output). `sample`: a competition folder holding
    sample_submission.csv, or that file. The file has exactly the sample's ids, in its order; ids
    without a prediction are written empty, predicted ids not in the sample are dropped. It is
    written to a temporary file, checked against the sample (`check_submission`) and only then
    renamed over `out`, so a failed check never leaves an invalid file where a good one was.

    Returns {"path", "rows", "predicted", "dropped_ids"}. Raises UserError when no predicted id is a
    sample id (not the test predictions) or the written file fails the check (`out` untouched).
    """
    from submissions.tables import read_predictions

    sample = sample_submission_path(sample)
    ids = read_sample_ids(sample)
    name = "predictions" if isinstance(preds, pd.DataFrame) else str(preds)
    sub = submission_from_predictions(preds if isinstance(preds, pd.DataFrame) else read_predictions(preds))
    dropped = int((~sub["id"].isin(set(ids))).sum())
    if len(sub) and dropped == len(sub):
        raise UserError(f"{name}: none of its {len(sub)} ids is in {sample}: are these the test predictions?")
    sub = align_submission(sub, ids)
    with atomic_path(out, suffix=".csv") as tmp:
        _write_rows(sub, tmp)
        try:
            check_submission(tmp, sample)
        except UserError as e:
            raise UserError(f"{str(e).replace(str(tmp), str(out))} ({out} not written)") from None
    return {"path": str(out), "rows": int(len(sub)), "predicted": int(sub["landmark_id"].notna().sum()),
            "dropped_ids": dropped}


# ------------------------------------------------------------------------------ solution

UNIQUE_IDS_ATTR = "glr_unique_ids"


def ids_token(ids: pd.Series) -> tuple | None:
    """Identity of an id column's Arrow buffers: equal tokens mean the very same (immutable) ids,
    so a uniqueness check made when the column was read still holds. None if not Arrow-backed."""
    import pyarrow as pa

    try:
        arr = pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    if isinstance(arr, pa.ChunkedArray):
        return None
    bufs = arr.buffers()
    return (len(arr), arr.offset, str(arr.type), *(b.address if b is not None else 0 for b in bufs))


def read_solution(path: str | os.PathLike) -> pd.DataFrame:
    """Read `solution.csv` (`id,landmarks[,Usage]`; other columns ignored) for scoring.

    Returns `id` (str), `landmarks` (tuple of int, empty = non-landmark query) and `usage`
    ("Public", "Private", "Ignored", or "All" when the file has no Usage column: such rows count
    for both Public and Private). Raises one UserError naming the bad lines.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(path)
    header = read_csv_header(path)
    lower = [h.lower() for h in header]
    missing = [c for c in ("id", "landmarks") if c not in lower]
    if missing:
        raise UserError(
            f"{path}: line 1: solution lacks column(s) {', '.join(missing)} "
            f"(expected id,landmarks,Usage; header is {','.join(header)!r})"
        )
    csv = _read_csv(path, header)
    col = {h.lower(): csv.columns[h] for h in header}
    ids, cells, lines = _array(col["id"]), col["landmarks"], csv.lines
    problems = list(csv.problems) + _empty_ids(ids, lines) + _duplicates(ids, lines)
    n = len(ids)

    # landmarks: a fast path for a single id, a slower one (row by row) for the rest
    single = pc.match_substring_regex(cells, r"^\d{1,18}$").to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(single)
    values = pc.cast(cells.filter(pa.array(single)), pa.int64()).to_numpy() if len(rows) else np.zeros(0, np.int64)
    singles = np.fromiter(zip(values.tolist()), dtype=object, count=len(rows))  # 1-tuples
    if len(rows) == n:
        landmarks = singles
    else:
        landmarks = np.empty(n, dtype=object)
        landmarks[rows] = singles
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(cells)), 0).to_numpy(zero_copy_only=False)
        blank = np.flatnonzero(empty)  # non-landmark queries
        landmarks[blank] = np.fromiter(itertools.repeat((), len(blank)), dtype=object, count=len(blank))
        others = np.flatnonzero(~single & ~empty)  # several ids (rare) or a bad cell: row by row
        parsed = []
        for r, text in zip(others.tolist(), _array(cells).take(pa.array(others)).to_pylist()):
            tokens = text.split()
            if all(_is_landmark_id(t) for t in tokens):
                parsed.append(tuple(int(t) for t in tokens))
            else:
                parsed.append(())
                problems.append(
                    (int(lines[r]), f"landmarks {_short(text)} is not a space-separated list of non-negative integer ids")
                )
        landmarks[others] = np.fromiter(parsed, dtype=object, count=len(parsed))

    if "usage" in col:
        names = pa.array(USAGES)
        codes = pc.index_in(col["usage"], value_set=names)
        if codes.null_count:  # not spelt exactly: forgive case and spaces
            raw = col["usage"]
            codes = pc.index_in(pc.utf8_lower(pc.utf8_trim_whitespace(raw)), value_set=pa.array([u.lower() for u in USAGES]))
            for r in np.flatnonzero(pc.is_null(codes).to_numpy(zero_copy_only=False)).tolist():
                problems.append((int(lines[r]), f"Usage {_short(raw[r].as_py())} is not one of {', '.join(USAGES)}"))
            codes = pc.fill_null(codes, 0)
        usage = pd.Series(pc.take(names, codes).to_pandas(), dtype="str")
    else:
        usage = pd.Series(np.full(n, ALL_USAGE, dtype=object), dtype="str")
    if problems:
        raise UserError(_summary(path, _format_problems(problems)))
    frame = pd.DataFrame({"id": pd.Series(ids.to_pandas(), dtype="str"), "landmarks": landmarks, "usage": usage})
    frame.attrs[UNIQUE_IDS_ATTR] = ids_token(frame["id"])  # lets the metric skip re-checking 1M ids
    return frame
