"""Local validation split: a new competition directory carved out of a competition's train set.

Kaggle's test labels are secret, so tuning needs its own ground truth. Per class, a holdout
share of the images becomes validation queries; the images of a share of classes left out of
training entirely become non-landmark queries (the test set's non-landmarks are, likewise,
images of no training class). The result is written in Kaggle's layout — `train.csv` (the
training subset), `train/` and `test/` (hard links to the original images; symlinks or copies
where links are impossible), `sample_submission.csv` and `solution.csv` — so every stage
function runs on it unchanged. Deterministic for a given seed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.acquire.competition import Competition, hashed_relpath
from pipeline.options import LOCALVAL
from submissions.errors import UserError
from submissions.files import atomic_dir, atomic_write_text, sha256_file

MANIFEST = "localval.json"


def _link(src: Path, dst: Path) -> str:
    """Hard link `src` at `dst` (symlink, then copy, as fallbacks); return the way used."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        pass
    try:
        os.symlink(os.path.abspath(src), dst)
        return "symlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _relpath(image_id: str) -> str:
    return hashed_relpath(image_id) if len(image_id) >= 3 else f"{image_id}.jpg"


def split_ids(train: pd.DataFrame, *, holdout_frac: float, unseen_class_frac: float, min_train_per_class: int,
              max_queries: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a train table into (training subset, queries with `landmarks` = class or "").

    Pure function of its arguments: the same table and seed give the same split.
    """
    rng = np.random.default_rng(seed)
    classes = np.sort(train["landmark_id"].unique())
    n_unseen = int(round(unseen_class_frac * len(classes)))
    if unseen_class_frac > 0 and len(classes) >= 3:
        n_unseen = max(1, n_unseen)
    n_unseen = min(n_unseen, max(0, len(classes) - 2))
    unseen = set(rng.choice(classes, size=n_unseen, replace=False).tolist()) if n_unseen else set()

    order = rng.permutation(len(train))
    shuffled = train.iloc[order].reset_index(drop=True)
    is_unseen = shuffled["landmark_id"].isin(unseen).to_numpy()
    pos = shuffled.groupby("landmark_id").cumcount().to_numpy()
    size = shuffled.groupby("landmark_id")["id"].transform("size").to_numpy()
    n_hold = np.minimum(np.rint(holdout_frac * size), size - min_train_per_class).clip(min=0)
    held = (pos < n_hold) & ~is_unseen

    queries = pd.concat([
        pd.DataFrame({"id": shuffled["id"][held], "landmarks": shuffled["landmark_id"][held].astype(str)}),
        pd.DataFrame({"id": shuffled["id"][is_unseen], "landmarks": ""}),
    ], ignore_index=True)
    if max_queries and len(queries) > max_queries:
        queries = queries.iloc[np.sort(rng.choice(len(queries), size=max_queries, replace=False))]
    queries = queries.sort_values("id", kind="stable").reset_index(drop=True)
    subset = shuffled[~held & ~is_unseen].sort_values("id", kind="stable").reset_index(drop=True)
    if subset["landmark_id"].nunique() < 2:
        raise UserError(f"local validation: only {subset['landmark_id'].nunique()} class(es) left for training; "
                        "lower [localval] unseen_class_frac or use a competition with more classes")
    if not (queries["landmarks"] != "").any():
        raise UserError("local validation: no class has enough images for a validation query; lower "
                        "[localval] min_train_per_class or raise holdout_frac")
    return subset, queries


def make_local_validation(data_dir: str | os.PathLike, out: str | os.PathLike, *,
                          holdout_frac: float = LOCALVAL.default("holdout_frac"),
                          unseen_class_frac: float = LOCALVAL.default("unseen_class_frac"),
                          min_train_per_class: int = LOCALVAL.default("min_train_per_class"),
                          max_queries: int = LOCALVAL.default("max_queries"),
                          seed: int = LOCALVAL.default("seed"), overwrite: bool = False) -> dict:
    """Build a local validation competition in `out` from `data_dir`'s train set; return its summary.

    The folder is assembled beside `out` and renamed into place, so an interrupted build
    never leaves a half-made competition behind.
    """
    comp = Competition(data_dir)
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise UserError(f"{out}: already exists (pass overwrite=True or remove it)")
    train = comp.train
    present = np.array([comp.image_path(i, "train").exists() for i in train["id"]], dtype=bool)
    missing = int((~present).sum())
    train = train[present].reset_index(drop=True)
    if train.empty:
        raise UserError(f"{comp.root / 'train'}: no training images found (fetch them first)")
    subset, queries = split_ids(train, holdout_frac=holdout_frac, unseen_class_frac=unseen_class_frac,
                                min_train_per_class=min_train_per_class, max_queries=max_queries, seed=seed)

    with atomic_dir(out) as tmp:  # an existing OUT is only replaced once the new one is complete
        ways: dict[str, int] = {}
        for split, ids in (("train", subset["id"]), ("test", queries["id"])):
            for image_id in ids:
                way = _link(comp.image_path(image_id, "train"), tmp / split / _relpath(image_id))
                ways[way] = ways.get(way, 0) + 1
        subset.to_csv(tmp / "train.csv", index=False)
        usage = np.where(np.random.default_rng(seed + 1).random(len(queries)) < 0.3, "Public", "Private")
        queries.assign(Usage=usage).to_csv(tmp / "solution.csv", index=False)
        queries[["id"]].assign(landmarks="").to_csv(tmp / "sample_submission.csv", index=False)
        summary = {
            "source": str(comp.root),
            "source_train_sha256": sha256_file(comp.root / "train.csv"),
            "params": {"holdout_frac": holdout_frac, "unseen_class_frac": unseen_class_frac,
                       "min_train_per_class": min_train_per_class, "max_queries": max_queries, "seed": seed},
            "train_images": int(len(subset)),
            "train_classes": int(subset["landmark_id"].nunique()),
            "queries": int(len(queries)),
            "landmark_queries": int((queries["landmarks"] != "").sum()),
            "non_landmark_queries": int((queries["landmarks"] == "").sum()),
            "unseen_classes": sorted(int(c) for c in set(train["landmark_id"]) - set(subset["landmark_id"])),
            "missing_source_images": missing,
            "links": ways,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(summary, indent=2) + "\n")
    return {**summary, "out": str(out)}
