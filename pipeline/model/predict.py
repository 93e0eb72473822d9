"""`glr predict`: a trained run's top-k classes for every image of a split, as a predictions table.

The model is built once; images stream through `tf.data` (parallel decode, batches, prefetch)
into one compiled inference function. `--embeddings X.npy` also saves the penultimate layer
("embedding", see pipeline.model.backbones) as the image's global descriptor (pipeline.model.embeddings).
An image that cannot be read gives a warning naming its id and gets no rows.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.options import PREDICT
from submissions.errors import UserError

SPLITS = ("test", "train", "val")


@dataclass(frozen=True)
class PredictResult:
    """What `predict` wrote (`table`, at `out`) and how it went: images asked for and predicted, the
    skipped ones ({id, path, reason}), time, throughput and the mixed-precision policy used."""

    table: pd.DataFrame
    out: str
    images: int
    predicted: int
    seconds: float
    images_per_s: float
    precision: str
    skipped: list[dict] = field(default_factory=list)

    def stats(self) -> dict:
        """The numbers without the table, as `glr predict --json` prints them (`skipped` counted)."""
        return {"images": self.images, "predicted": self.predicted, "seconds": self.seconds,
                "images_per_s": self.images_per_s, "precision": self.precision, "out": self.out,
                "skipped": len(self.skipped)}


def images_of_split(run_dir: Path, comp, split: str) -> tuple[list[str], str]:
    """(ids, image folder split) of `split`; 'val' is the run's own validation split."""
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if split == "val":
        from pipeline.model.train import read_split

        rows = read_split(run_dir)
        return rows.loc[rows["split"] == "val", "id"].tolist(), "train"
    return comp.ids(split), split


def top_k_rows(ids: list[str], probs: np.ndarray, labels: np.ndarray, k: int) -> pd.DataFrame:
    """The predictions table (id, landmark_id, score, rank) of a probability matrix."""
    k = min(k, probs.shape[1])
    part = np.argpartition(-probs, k - 1, axis=1)[:, :k] if k < probs.shape[1] else \
        np.tile(np.arange(probs.shape[1]), (len(probs), 1))
    scores = np.take_along_axis(probs, part, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    cls = np.take_along_axis(part, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    return pd.DataFrame({
        "id": np.repeat(np.asarray(ids, dtype=object), k).astype(str),
        "landmark_id": labels[cls.ravel()].astype(np.int64),
        "score": scores.ravel().astype(np.float32),
        "rank": np.tile(np.arange(k, dtype=np.int16), len(ids)),
    })


def _policy(model) -> str:
    """The mixed-precision policy the model computes in (the model object itself reports the global one)."""
    return model.get_layer("embedding").dtype_policy.name


def load_run_model(run_dir: str | os.PathLike, precision: str | None = None):
    """(model, labels, manifest) of a run; `precision` rebuilds the model under another policy."""
    from pipeline.model import backbones as M
    from pipeline.model.train import read_labels

    run_dir = Path(run_dir)
    mpath = run_dir / "manifest.json"
    if not mpath.exists():
        raise UserError(f"{mpath}: not found — {run_dir} is not a finished `glr train` run "
                        "(finish it with `glr train … --resume`)")
    manifest = json.loads(mpath.read_text())
    labels = read_labels(run_dir)
    policy = M._POLICY[M.set_precision(precision)] if precision is not None else None
    model = M.load_model(run_dir / "model.keras")
    if policy is not None and _policy(model) != policy:
        rebuilt = M.build_model(manifest["backbone"], int(model.output.shape[-1]), manifest["image_size"], "none")
        rebuilt.set_weights(model.get_weights())
        model = rebuilt
    n_out = int(model.output.shape[-1])
    if n_out != len(labels):
        unknown = list(range(len(labels), n_out))[:5]
        raise UserError(f"{run_dir / 'labels.json'}: the model predicts {n_out} classes but the label map has "
                        f"{len(labels)}; class index(es) {', '.join(map(str, unknown))} are unknown to it "
                        "(the run directory is inconsistent: retrain or restore labels.json)")
    return model, labels, manifest


def predict(run_dir: str | os.PathLike, data_dir: str | os.PathLike, *, split: str = "test",
            out: str | os.PathLike, top_k: int = PREDICT.default("top_k"),
            batch_size: int = PREDICT.default("batch_size"), embeddings: str | None = None,
            precision: str | None = PREDICT.default("precision")) -> PredictResult:
    """Predict the top-`top_k` classes of every image of `split`, write the table to `out`
    (Parquet); return it with counts, skipped ids and images/s."""
    from pipeline.acquire.competition import Competition
    from pipeline.model.data import path_dataset, warn_skipped
    from pipeline.model.backbones import quiet_tf
    from pipeline.progress import progress
    from submissions.tables import write_predictions

    if top_k < 1:
        raise UserError(f"--top-k {top_k}: must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    run_dir = Path(run_dir)
    comp = Competition(data_dir)
    ids, folder = images_of_split(run_dir, comp, split)
    model, labels, manifest = load_run_model(run_dir, precision)
    tf = quiet_tf()
    import keras

    size = int(manifest["image_size"])
    outputs = [model.output]
    if embeddings:
        outputs.append(model.get_layer("embedding").output)
    infer_model = keras.Model(model.input, outputs)
    infer = tf.function(lambda x: infer_model(x, training=False), reduce_retracing=True)

    t0 = time.perf_counter()
    paths = comp.image_paths(ids, folder)
    probs, embs, oks = [], [], []
    ds = path_dataset(paths, size, batch_size=batch_size)
    n_batches = -(-len(ids) // batch_size)
    for x, ok in progress(ds, total=n_batches, desc=f"predict {split}"):
        n = int(x.shape[0])
        if n < batch_size:  # pad the last batch: one traced shape, no retracing
            x = tf.concat([x, tf.zeros((batch_size - n, *x.shape[1:]), x.dtype)], axis=0)
        res = infer(x)
        if not isinstance(res, (list, tuple)):
            res = [res]
        probs.append(np.asarray(res[0], dtype=np.float32)[:n])
        if embeddings:
            embs.append(np.asarray(res[1], dtype=np.float32)[:n])
        oks.append(ok.numpy())
    secs = time.perf_counter() - t0
    n_out = int(model.output.shape[-1])
    probs = np.concatenate(probs) if probs else np.zeros((0, n_out), np.float32)
    ok = np.concatenate(oks) if oks else np.zeros(0, bool)
    skipped = [{"id": ids[i], "path": str(paths[i]), "reason": "missing or cannot decode"}
               for i in np.flatnonzero(~ok)]
    warn_skipped(skipped)
    kept = [i for i, good in zip(ids, ok) if good]
    table = top_k_rows(kept, probs[ok], labels, top_k)
    write_predictions(table, out)
    if embeddings:
        from pipeline.model.embeddings import write_embeddings

        dim = int(model.get_layer("embedding").output.shape[-1])
        vecs = np.concatenate(embs)[ok] if embs else np.zeros((0, dim), np.float32)
        write_embeddings(embeddings, kept, vecs.reshape(len(kept), -1))
    return PredictResult(table, out=str(out), images=len(ids), predicted=len(kept), seconds=round(secs, 3),
                         images_per_s=round(len(ids) / max(secs, 1e-9), 1), precision=_policy(model),
                         skipped=skipped)
