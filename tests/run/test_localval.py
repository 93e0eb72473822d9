"""Local validation split: a Kaggle-layout competition carved out of a train set."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.acquire.competition import Competition, hashed_relpath
from pipeline.run.localval import make_local_validation, split_ids
from submissions.errors import UserError


def tiny_competition(root, classes=10, per_class=6, seed=0):
    """A hand-made competition in the 2021 layout: 32 px images of flat colours."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(classes):
        for j in range(per_class):
            image_id = f"{rng.integers(16**15):015x}{c:02d}{j:02d}"
            path = root / "train" / hashed_relpath(image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 32, 3), (c * 20, j * 30, 90), np.uint8)).save(path)
            rows.append((image_id, 100 + c))
    pd.DataFrame(rows, columns=["id", "landmark_id"]).to_csv(root / "train.csv", index=False)
    (root / "test").mkdir()
    pd.DataFrame({"id": [], "landmarks": []}).to_csv(root / "sample_submission.csv", index=False)
    return root


def test_split_is_kaggle_layout_and_disjoint(tmp_path):
    src = tiny_competition(tmp_path / "comp")
    summary = make_local_validation(src, tmp_path / "lv", holdout_frac=0.34, unseen_class_frac=0.2, seed=3)
    lv = Competition(tmp_path / "lv")
    train_ids = set(lv.train["id"])
    sol = pd.read_csv(tmp_path / "lv" / "solution.csv", dtype=str, keep_default_na=False)
    assert set(sol.columns) == {"id", "landmarks", "Usage"}
    assert set(sol["Usage"]) <= {"Public", "Private"}
    query_ids = set(sol["id"])
    assert not train_ids & query_ids  # a query is never a training image
    assert query_ids == set(lv.test_ids)
    assert not lv.missing_images("train") and not lv.missing_images("test")
    # two unseen classes: every image of them is a non-landmark query, none is in training
    unseen = set(summary["unseen_classes"])
    assert len(unseen) == 2 and not unseen & set(lv.train["landmark_id"])
    orig = Competition(src).train.set_index("id")["landmark_id"]
    nonland = sol[sol["landmarks"] == ""]["id"]
    assert set(orig[nonland]) == unseen and len(nonland) == 2 * 6
    # landmark queries: 2 of 6 images per seen class, the label is the true class
    land = sol[sol["landmarks"] != ""]
    assert len(land) == 8 * 2
    assert (land["landmarks"].astype(int).to_numpy() == orig[land["id"]].to_numpy()).all()
    assert summary["train_images"] == 8 * 4 and summary["train_classes"] == 8
    # images are links to the originals, not re-encoded copies
    some = land["id"].iloc[0]
    assert os.path.samefile(lv.image_path(some, "test"), Competition(src).image_path(some, "train"))


def test_deterministic_and_seed_dependent(tmp_path):
    src = tiny_competition(tmp_path / "comp")
    train = Competition(src).train
    a = split_ids(train, holdout_frac=0.3, unseen_class_frac=0.1, min_train_per_class=2, max_queries=0, seed=1)
    b = split_ids(train, holdout_frac=0.3, unseen_class_frac=0.1, min_train_per_class=2, max_queries=0, seed=1)
    c = split_ids(train, holdout_frac=0.3, unseen_class_frac=0.1, min_train_per_class=2, max_queries=0, seed=2)
    pd.testing.assert_frame_equal(a[1], b[1])
    assert not a[1].equals(c[1])


def test_min_train_per_class_and_max_queries(tmp_path):
    src = tiny_competition(tmp_path / "comp", classes=4, per_class=3)
    train = Competition(src).train
    subset, queries = split_ids(train, holdout_frac=0.9, unseen_class_frac=0.0, min_train_per_class=2,
                                max_queries=0, seed=0)
    assert (subset.groupby("landmark_id").size() == 2).all() and len(queries) == 4
    subset, queries = split_ids(train, holdout_frac=0.9, unseen_class_frac=0.0, min_train_per_class=2,
                                max_queries=3, seed=0)
    assert len(queries) == 3


def test_overwrite_and_errors(tmp_path):
    src = tiny_competition(tmp_path / "comp", classes=3, per_class=2)
    with pytest.raises(UserError, match="min_train_per_class"):
        make_local_validation(src, tmp_path / "lv", holdout_frac=0.2, unseen_class_frac=0.0, seed=0)
    src = tiny_competition(tmp_path / "comp2", classes=5, per_class=4)
    make_local_validation(src, tmp_path / "lv", seed=0)
    with pytest.raises(UserError, match="already exists"):
        make_local_validation(src, tmp_path / "lv", seed=0)
    s = make_local_validation(src, tmp_path / "lv", seed=1, overwrite=True)
    assert s["params"]["seed"] == 1 and not list(tmp_path.glob(".lv*"))  # no temporary or old folder left
