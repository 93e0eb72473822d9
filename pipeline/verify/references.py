"""Which training images a query is verified against: the plan of (query, candidate class, reference) pairs.

For each query, its top candidate classes; for each class, k reference images chosen the same
way for every query (first / seeded random, so their features are shared) or, with global
embeddings, the k nearest to the query.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from submissions.errors import UserError

REFS = ("first", "random", "nearest")



def _class_rng(seed: int, landmark_id: int) -> np.random.Generator:
    lid = int(landmark_id)
    return np.random.default_rng([int(seed), lid & 0xFFFFFFFF, (lid >> 32) & 0xFFFFFFFF])


def plan_pairs(preds: pd.DataFrame, train: pd.DataFrame, *, candidates: int = 3, k: int = 3,
               refs: str = "random", seed: int = 0, embeddings: tuple[list[str], np.ndarray] | None = None,
               ref_embeddings: tuple[list[str], np.ndarray] | None = None) -> pd.DataFrame:
    """(id, landmark_id, ref_id) for each query's top-`candidates` classes and `k` references per class.

    first: the class's first k training images; random: k drawn per class with a seed (the same
    for every query, so reference features are reused); nearest: the k closest to the query by
    global embeddings (cosine), topped up at random when fewer members have embeddings.
    """
    if refs not in REFS:
        raise UserError(f"unknown --refs {refs!r}; choose one of: {', '.join(REFS)}")
    if candidates < 1 or k < 1:
        raise UserError("--candidates and --k must be at least 1")
    top = preds[preds["rank"] < candidates].sort_values(["id", "rank"], kind="stable")
    top = top.drop_duplicates(["id", "landmark_id"])
    members = train.groupby("landmark_id", sort=False)["id"].agg(list).to_dict()
    missing_classes = sorted(set(top["landmark_id"]) - set(members))
    if missing_classes:
        shown = ", ".join(map(str, missing_classes[:5])) + (" …" if len(missing_classes) > 5 else "")
        warnings.warn(f"{len(missing_classes)} candidate class(es) have no training images and are not verified: {shown}",
                      stacklevel=2)

    chosen: dict[int, list[str]] = {}

    def fixed(lid: int) -> list[str]:
        if lid not in chosen:
            ids = members[lid]
            if refs == "first" or len(ids) <= k:
                chosen[lid] = ids[:k]
            else:
                pick = _class_rng(seed, lid).choice(len(ids), size=k, replace=False)
                chosen[lid] = [ids[i] for i in pick]
        return chosen[lid]

    q_index = r_index = None
    if refs == "nearest":
        if embeddings is None or ref_embeddings is None:
            raise UserError("--refs nearest needs --embeddings (queries) and --ref-embeddings (training images), "
                            "written by `glr predict --embeddings`")
        q_ids, q_vec = embeddings
        r_ids, r_vec = ref_embeddings
        q_index = {x: i for i, x in enumerate(q_ids)}
        r_index = {x: i for i, x in enumerate(r_ids)}
        if q_vec.shape[1] != r_vec.shape[1]:
            raise UserError(f"--embeddings has {q_vec.shape[1]}-D vectors but --ref-embeddings {r_vec.shape[1]}-D")
        no_q = [x for x in top["id"].unique() if x not in q_index]
        if no_q:
            warnings.warn(f"{len(no_q)} query id(s) have no embedding (e.g. {no_q[0]}); their references are random",
                          stacklevel=2)

    out_id, out_lid, out_ref = [], [], []
    for qid, lid in zip(top["id"].tolist(), top["landmark_id"].tolist()):
        if lid not in members:
            continue
        if refs == "nearest" and qid in q_index and len(members[lid]) > k:
            ids = members[lid]
            have = [i for i in ids if i in r_index]
            if have:
                sims = r_vec[[r_index[i] for i in have]] @ q_vec[q_index[qid]]
                order = np.argsort(-sims, kind="stable")[:k]
                sel = [have[i] for i in order]
                if len(sel) < k:
                    sel += [i for i in fixed(lid) if i not in sel][: k - len(sel)]
                    if len(sel) < k:
                        sel += [i for i in ids if i not in sel][: k - len(sel)]
            else:
                sel = fixed(lid)
        else:
            sel = fixed(lid)
        if qid in sel:  # a query that is itself a training image (own validation split) is no reference
            sel = [i for i in sel if i != qid] + [i for i in members[lid] if i != qid and i not in sel][:1]
        out_id += [qid] * len(sel)
        out_lid += [lid] * len(sel)
        out_ref += sel
    return pd.DataFrame({"id": pd.Series(out_id, dtype=str), "landmark_id": pd.Series(out_lid, dtype="int64"),
                         "ref_id": pd.Series(out_ref, dtype=str)})
