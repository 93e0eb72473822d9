"""`glr ensemble`: average several models' predictions tables (`glr evaluate` scores one: submissions.metric).

Ensemble rule, per image: over the union of the candidate classes in the models' top-k rows,

    score(c) = Σ_m w_m · p_m(c) / Σ_m w_m        (m over the models that predicted the image)

where p_m(c) is model m's probability for class c when c is in m's top-k, and **0 when it is not**
(a class outside a model's top-k had at most that model's k-th probability; counting it as 0
rather than guessing keeps the rule exact for what the table holds, and penalises classes only
some models believe in). Weights are renormalised over the models that predicted the image, so
an image missing from one table (e.g. an unreadable file there) is averaged over the others and
scores stay on the probability scale. Scores are not renormalised per image to sum to 1: that
would inflate diffuse, unsure predictions and hurt GAP. Models may have different class sets.
Pure pandas/numpy: no TensorFlow here.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from pipeline.options import ENSEMBLE
from submissions.errors import UserError


def ensemble_tables(tables: list[pd.DataFrame], weights: list[float] | None = None, top_k: int = 5) -> pd.DataFrame:
    """The weighted average of predictions tables (see the module docstring), top-k per image.

    Each table is held to the predictions contract first (submissions.tables): a class listed twice
    for one image would otherwise be summed twice, giving a score above any model's."""
    from submissions.tables import validate_predictions

    if not tables:
        raise UserError("ensemble: no predictions tables given")
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: must be at least 1")
    w = np.ones(len(tables)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(tables):
        raise UserError(f"ensemble: {len(w)} weight(s) for {len(tables)} table(s)")
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise UserError(f"--weights {','.join(map(str, w))}: weights must be finite, non-negative, not all 0")
    tables = [validate_predictions(t, f"predictions table {m + 1}") for m, t in enumerate(tables)]
    parts, present = [], []
    for m, t in enumerate(tables):
        parts.append(pd.DataFrame({"id": t["id"].to_numpy(dtype=object), "landmark_id": t["landmark_id"].to_numpy(),
                                   "s": t["score"].to_numpy(dtype=np.float64) * w[m]}))
        present.append(pd.DataFrame({"id": pd.unique(t["id"].to_numpy(dtype=object)), "w": w[m]}))
    allrows = pd.concat(parts, ignore_index=True)
    summed = allrows.groupby(["id", "landmark_id"], sort=False, as_index=False)["s"].sum()
    wsum = pd.concat(present, ignore_index=True).groupby("id", sort=False)["w"].sum()
    summed["score"] = summed["s"].to_numpy() / np.maximum(wsum.reindex(summed["id"]).to_numpy(), 1e-300)
    summed = summed.sort_values(["id", "score", "landmark_id"], ascending=[True, False, True], kind="stable")
    summed["rank"] = summed.groupby("id", sort=False).cumcount()
    out = summed[summed["rank"] < top_k]
    return pd.DataFrame({
        "id": out["id"].astype(str).to_numpy(),
        "landmark_id": out["landmark_id"].to_numpy(dtype=np.int64),
        "score": out["score"].to_numpy(dtype=np.float32),
        "rank": out["rank"].to_numpy(dtype=np.int16),
    })


def ensemble(paths: list[str | os.PathLike], *, weights: list[float] | None = None,
             out: str | os.PathLike, top_k: int = ENSEMBLE.default("top_k")) -> pd.DataFrame:
    """Read predictions tables, average them (module docstring), write and return the result."""
    from submissions.tables import read_predictions, write_predictions

    if weights is not None and len(weights) == 0:
        weights = None
    if weights is not None and len(weights) != len(paths):
        raise UserError(f"--weights: {len(weights)} weight(s) for {len(paths)} predictions table(s); "
                        "give one per table")
    table = ensemble_tables([read_predictions(p) for p in paths], weights, top_k)  # each file checked as read
    write_predictions(table, out)
    return table

