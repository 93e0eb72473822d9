"""Reference planning: which training images each query's candidate classes are verified against."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.verify.references import plan_pairs


def test_plan_refs_first_random_nearest():
    train = pd.DataFrame({"id": [f"t{i}" for i in range(12)], "landmark_id": [1] * 6 + [2] * 6})
    preds = pd.DataFrame({"id": ["q1", "q1", "q2"], "landmark_id": [1, 2, 1], "score": [0.9, 0.5, 0.8],
                          "rank": [0, 1, 0]})
    first = plan_pairs(preds, train, candidates=2, k=2, refs="first")
    assert first["ref_id"].tolist() == ["t0", "t1", "t6", "t7", "t0", "t1"]
    rnd = plan_pairs(preds, train, candidates=2, k=2, refs="random", seed=3)
    q1c1 = rnd[(rnd["id"] == "q1") & (rnd["landmark_id"] == 1)]["ref_id"].tolist()
    q2c1 = rnd[(rnd["id"] == "q2") & (rnd["landmark_id"] == 1)]["ref_id"].tolist()
    assert q1c1 == q2c1  # same references for every query of a class: features are reused
    assert rnd.equals(plan_pairs(preds, train, candidates=2, k=2, refs="random", seed=3))
    assert len({tuple(plan_pairs(preds, train, k=2, refs="random", seed=s)["ref_id"]) for s in range(6)}) > 1
    # nearest: q1 points at t4/t5 (class 1) and t11 (class 2); q2 at t2
    r_vec = np.eye(12, dtype=np.float32)
    q_vec = np.zeros((2, 12), np.float32)
    q_vec[0, [4, 5, 11]] = [1.0, 0.9, 1.0]
    q_vec[1, 2] = 1.0
    near = plan_pairs(preds, train, candidates=2, k=2, refs="nearest", embeddings=(["q1", "q2"], q_vec),
                      ref_embeddings=([f"t{i}" for i in range(12)], r_vec))
    got = near.groupby(["id", "landmark_id"])["ref_id"].agg(list).to_dict()
    assert got[("q1", 1)] == ["t4", "t5"] and got[("q1", 2)][0] == "t11" and got[("q2", 1)][0] == "t2"
    # a query that is itself a training image never serves as its own reference
    own = plan_pairs(preds.assign(id=["t0", "t0", "q2"]), train, candidates=1, k=2, refs="first")
    assert own[own["id"] == "t0"]["ref_id"].tolist() == ["t1", "t2"]
    with pytest.raises(Exception, match="--embeddings"):
        plan_pairs(preds, train, refs="nearest")
    # a class without training images: warned, not verified
    with pytest.warns(UserWarning, match="no training images"):
        p = plan_pairs(preds.assign(landmark_id=[1, 99, 1]), train, candidates=2, k=2)
    assert 99 not in set(p["landmark_id"])
