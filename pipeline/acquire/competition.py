"""Open a competition directory in any of Kaggle's landmark-recognition layouts.

2020/2021: `train.csv` (id,landmark_id), hashed `train/a/b/c/<id>.jpg`, `test/a/b/c/<id>.jpg`.
2018/2019: `train.csv` (id,url,landmark_id), `test.csv` (id,url), images fetched by
`glr fetch-urls` into the hashed layout. Flat folders (`train/<id>.jpg`) work too.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.errors import UserError

SPLITS = ("train", "test")


def hashed_relpath(image_id: str, ext: str = ".jpg") -> str:
    """Kaggle's 2020/2021 layout: `a/b/c/<id>.jpg` from the id's first three characters."""
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}{ext}"


def _bad_image_id(ids: pd.Series) -> np.ndarray:
    """Ids that are not a plain file name: a path separator, a NUL, or '.'/'..' would make an image
    path (`train/<id>.jpg`, `train/a/b/c/<id>.jpg`) point outside the competition folder."""
    text = ids.astype(str)
    return (text.str.contains(r"[/\\\x00]", regex=True) | text.isin([".", ".."])).to_numpy(dtype=bool)


def read_csv_checked(path: Path, required: tuple[str, ...], dtype: dict | None = None) -> pd.DataFrame:
    """Read a CSV of a competition (train.csv, test.csv, sample_submission.csv), held to their
    contract: each column name once, the `required` columns present, ids non-empty, unique and plain
    file names (they name image files). One UserError naming the file and line otherwise."""
    from submissions.format import read_csv_header

    if not path.exists():
        raise UserError(f"{path}: no such file")
    read_csv_header(path)  # missing, empty, binary, a column name twice: one line
    try:
        df = pd.read_csv(path, dtype=dtype or {"id": str}, keep_default_na=False, na_values=[""], index_col=False)
    except (ValueError, OSError) as e:  # ParserError, EmptyDataError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns)) or 'none'}"
        )
    if "id" in df.columns:
        empty = df["id"].isna().to_numpy()
        if empty.any():
            raise UserError(f"{path}: row {int(np.flatnonzero(empty)[0]) + 2}: empty id")
        unsafe = _bad_image_id(df["id"])
        if unsafe.any():
            row = int(np.flatnonzero(unsafe)[0])
            raise UserError(f"{path}: row {row + 2}: id {df['id'].iloc[row]!r} is not a plain file name "
                            "(no '/', '\\', NUL, '.' or '..': ids name the image files)")
        dup = df["id"].duplicated().to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            dup_id = df["id"].iloc[row]
            first = int(np.flatnonzero((df["id"] == dup_id).to_numpy())[0])
            raise UserError(
                f"{path}: row {row + 2}: duplicate id {dup_id!r} (first on row {first + 2}; "
                f"{int(dup.sum())} duplicate row(s) in all)"
            )
    return df


class Competition:
    """A competition directory: train table, test ids, image paths, sample submission.

    Row numbers in error messages are file line numbers (header = line 1).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory (run `glr fetch` or `glr synth` first)")
        if not (self.root / "train.csv").exists():
            raise UserError(
                f"{self.root}: no train.csv here — not a landmark-recognition competition directory "
                "(expected Kaggle's layout: train.csv, train/, test/, sample_submission.csv)"
            )
        self._layout: dict[str, str] = {}

    # -- tables -----------------------------------------------------------------------------
    @cached_property
    def train(self) -> pd.DataFrame:
        """`train.csv` as id (str), landmark_id (int64) and url when present."""
        path = self.root / "train.csv"
        from submissions.tables import integer_values, show_value

        df = read_csv_checked(path, ("id", "landmark_id"), dtype={"id": str, "url": str})
        lid, row = integer_values(df["landmark_id"], 0, 2**63)
        if row is not None:
            value = df["landmark_id"].iloc[row]
            what = ("empty landmark_id" if pd.isna(value) else
                    f"landmark_id {show_value(value)} is not an integer from 0 to 2^63-1 (Kaggle's class ids)")
            raise UserError(f"{path}: row {row + 2}: {what}")
        df["landmark_id"] = lid
        return df

    @cached_property
    def sample_submission(self) -> pd.DataFrame | None:
        """`sample_submission.csv` (id,landmarks) or None when the directory has none."""
        path = self.root / "sample_submission.csv"
        if not path.exists():
            return None
        return read_csv_checked(path, ("id", "landmarks"), dtype={"id": str, "landmarks": str})

    @property
    def sample_submission_path(self) -> Path | None:
        path = self.root / "sample_submission.csv"
        return path if path.exists() else None

    @property
    def solution_path(self) -> Path | None:
        """`solution.csv` (ground truth for local validation) when the directory has one."""
        path = self.root / "solution.csv"
        return path if path.exists() else None

    @cached_property
    def test_ids(self) -> list[str]:
        """Test ids from sample_submission.csv, else test.csv, else the files under test/."""
        if self.sample_submission is not None:
            return self.sample_submission["id"].tolist()
        test_csv = self.root / "test.csv"
        if test_csv.exists():
            return read_csv_checked(test_csv, ("id",), dtype={"id": str, "url": str})["id"].tolist()
        test_dir = self.root / "test"
        if test_dir.is_dir():
            return sorted(p.stem for p in test_dir.rglob("*.jpg"))
        raise UserError(f"{self.root}: no sample_submission.csv, test.csv or test/ folder: cannot tell the test ids")

    def ids(self, split: str) -> list[str]:
        """All ids of a split ('train' or 'test')."""
        if split == "train":
            return self.train["id"].tolist()
        if split == "test":
            return self.test_ids
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")

    # -- images -----------------------------------------------------------------------------
    def _detect_layout(self, split: str, probe_id: str) -> str:
        if split not in self._layout:
            base = self.root / split
            if (base / hashed_relpath(probe_id)).exists():
                self._layout[split] = "hashed"
            elif (base / f"{probe_id}.jpg").exists():
                self._layout[split] = "flat"
            else:
                # nothing to go by: pick by what the folder looks like
                flat = base.is_dir() and any(p.suffix == ".jpg" for p in base.iterdir())
                self._layout[split] = "flat" if flat else "hashed"
        return self._layout[split]

    def image_path(self, image_id: str, split: str = "train") -> Path:
        """Path of an image in the split's layout (hashed or flat); it may not exist."""
        return self.image_paths([image_id], split)[0]

    def image_paths(self, ids: list[str], split: str = "train") -> list[Path]:
        """Paths of images in the split's layout. Ids come from any table (predictions, inliers), so
        each is checked to be a plain file name — all at once (1.58M ids: ~7 s, mostly building the paths)."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        ids = [str(i) for i in ids]
        if not ids:
            return []
        bad = np.flatnonzero(_bad_image_id(pd.Series(ids, dtype=object)))
        if len(bad):
            raise UserError(f"image id {ids[bad[0]]!r} is not a plain file name (no '/', '\\', NUL, '.' or '..'): "
                            f"it would name a file outside {self.root / split}")
        base = self.root / split
        if self._detect_layout(split, ids[0]) == "hashed":
            return [base / hashed_relpath(i) if len(i) >= 3 else base / f"{i}.jpg" for i in ids]
        return [base / f"{i}.jpg" for i in ids]

    def missing_images(self, split: str = "train", ids: list[str] | None = None) -> list[str]:
        """Ids of the split whose image file does not exist."""
        ids = self.ids(split) if ids is None else ids
        return [i for i in ids if not self.image_path(i, split).exists()]

    def check_images(self, split: str = "train") -> None:
        """Raise UserError naming the first missing image files of a split."""
        missing = self.missing_images(split)
        if missing:
            shown = ", ".join(missing[:5]) + (f" … (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise UserError(
                f"{self.root / split}: {len(missing)} id(s) have no image file: {shown} "
                "(download them with `glr fetch`/`glr fetch-urls`, or remove them from the CSV)"
            )

    def summary(self) -> dict:
        """Counts a person wants after fetching: images, classes, test size."""
        train = self.train
        return {
            "root": str(self.root),
            "train_images": int(len(train)),
            "classes": int(train["landmark_id"].nunique()),
            "test_images": int(len(self.test_ids)),
            "has_solution": self.solution_path is not None,
        }
