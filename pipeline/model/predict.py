"""`glr predict`: a trained run's top-k classes for every image of a split, as a predictions table.

The model is built once; images stream through `tf.data` (parallel decode, batches, prefetch)
into one compiled inference step that also takes the top-k on the device: only batch×k scores
leave it, so memory grows with images × k, never with images × classes. `--embeddings X.npy` also
saves the penultimate layer ("embedding", see pipeline.model.backbones) as the image's global
descriptor, streamed batch by batch into a memory-mapped file (pipeline.model.embeddings).
An image that cannot be read gives a warning naming its id and gets no rows.

`glr embed` (`embed`) runs the same loop with a step that returns only the embedding, into a
resumable writer: an interrupted run continues from its last commit (pipeline.model.embeddings).
"""
from __future__ import annotations

import contextlib
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


def predictions_table(ids: list[str], scores: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """The predictions table (id, landmark_id, score, rank) of each id's top-k (N×k scores, best
    first, and their class indices)."""
    k = scores.shape[1] if scores.ndim == 2 else 0
    return pd.DataFrame({
        "id": np.repeat(np.asarray(ids, dtype=object), k).astype(str),
        "landmark_id": labels[classes.ravel()].astype(np.int64),
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
    if precision is None and manifest.get("precision") in M._POLICY:
        # load under the global policy it was trained under: Keras gives the nested base model (and the
        # input) the global policy at load time, which moves a GeM embedding by ~1e-3 — a fresh process
        # must compute what the training process (glr run's later stages) computes
        M.set_precision(manifest["precision"])
    model = M.load_model(run_dir / "model.keras")
    if policy is not None and _policy(model) != policy:
        rebuilt = M.build_model(manifest["backbone"], int(model.output.shape[-1]), manifest["image_size"], "none",
                                **M.head_spec(manifest.get("config", {})))
        rebuilt.set_weights(model.get_weights())
        model = rebuilt
    n_out = int(model.output.shape[-1])
    if n_out != len(labels):
        unknown = list(range(len(labels), n_out))[:5]
        raise UserError(f"{run_dir / 'labels.json'}: the model predicts {n_out} classes but the label map has "
                        f"{len(labels)}; class index(es) {', '.join(map(str, unknown))} are unknown to it "
                        "(the run directory is inconsistent: retrain or restore labels.json)")
    return model, labels, manifest


def compiled_step(model, k: int, embeddings: bool):
    """The compiled inference step: x → (top-k scores, their class indices[, embeddings]), or with
    k = 0 (glr embed) x → (embeddings,) alone, the head not computed.

    Top-k is taken on the device, so only batch×k numbers leave it, never the batch×classes
    probabilities (81,313 classes at the real size). Ties go to the lower class index
    (`tf.math.top_k`), so the order is deterministic.
    """
    from pipeline.model.backbones import quiet_tf

    tf = quiet_tf()
    import keras

    outputs = ([model.output] if k else []) + ([model.get_layer("embedding").output] if embeddings or not k else [])
    infer_model = keras.Model(model.input, outputs)
    k = min(k, int(model.output.shape[-1]))

    @tf.function(reduce_retracing=True)
    def step(x):
        out = infer_model(x, training=False)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        flat = [tf.cast(tf.reshape(e, (tf.shape(e)[0], -1)), tf.float32) for e in out[1 if k else 0:]]
        if not k:
            return tuple(flat)
        scores, classes = tf.math.top_k(tf.cast(out[0], tf.float32), k=k, sorted=True)
        return (scores, classes, *flat)

    return step


def _stream(step, ds, ids: list[str], batch_size: int, writer, desc: str,
            top_k: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run `step` over the batches of `ds`: (top-k scores and class indices of the readable images,
    ok mask of all); embeddings of readable images go to `writer` batch by batch (with how many
    images the batch consumed). Memory: N×k. With `top_k` False (a k = 0 step: glr embed) the
    first two are empty."""
    from pipeline.model.backbones import quiet_tf
    from pipeline.progress import progress

    tf = quiet_tf()
    scores, classes, oks = [], [], []
    start = 0
    for x, ok in progress(ds, total=-(-len(ids) // batch_size), desc=desc):
        n, ok = int(x.shape[0]), ok.numpy()
        if n < batch_size:  # pad the last batch: one traced shape, no retracing
            x = tf.concat([x, tf.zeros((batch_size - n, *x.shape[1:]), x.dtype)], axis=0)
        res = step(x)
        if top_k:
            scores.append(res[0].numpy()[:n][ok])
            classes.append(res[1].numpy()[:n][ok])
        if writer is not None:
            writer.append([i for i, good in zip(ids[start:start + n], ok) if good], res[-1].numpy()[:n][ok],
                          images=n)
        oks.append(ok)
        start += n
    if not oks:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32), np.zeros(0, bool)
    if not top_k:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32), np.concatenate(oks)
    return np.concatenate(scores), np.concatenate(classes), np.concatenate(oks)


def predict(run_dir: str | os.PathLike, data_dir: str | os.PathLike, *, split: str = "test",
            out: str | os.PathLike, top_k: int = PREDICT.default("top_k"),
            batch_size: int = PREDICT.default("batch_size"), embeddings: str | None = None,
            precision: str | None = PREDICT.default("precision")) -> PredictResult:
    """Predict the top-`top_k` classes of every image of `split`, write the table to `out`
    (Parquet); return it with counts, skipped ids and images/s. Memory grows with images × top_k,
    never with images × classes; embeddings stream to a memory-mapped file."""
    from pipeline.acquire.competition import Competition
    from pipeline.model.data import path_dataset, warn_skipped
    from pipeline.model.embeddings import embedding_writer
    from submissions.tables import write_predictions

    if top_k < 1:
        raise UserError(f"--top-k {top_k}: must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    run_dir = Path(run_dir)
    comp = Competition(data_dir)
    ids, folder = images_of_split(run_dir, comp, split)
    model, labels, manifest = load_run_model(run_dir, precision)
    step = compiled_step(model, top_k, bool(embeddings))

    t0 = time.perf_counter()
    paths = comp.image_paths(ids, folder)
    ds = path_dataset(paths, int(manifest["image_size"]), batch_size=batch_size)
    dim = int(np.prod(model.get_layer("embedding").output.shape[1:]))
    with embedding_writer(embeddings, len(ids), dim) if embeddings else contextlib.nullcontext() as writer:
        scores, classes, ok = _stream(step, ds, ids, batch_size, writer, f"predict {split}")
    secs = time.perf_counter() - t0
    skipped = [{"id": ids[i], "path": str(paths[i]), "reason": "missing or cannot decode"}
               for i in np.flatnonzero(~ok)]
    warn_skipped(skipped)
    kept = [i for i, good in zip(ids, ok) if good]
    table = predictions_table(kept, scores, classes, labels)
    write_predictions(table, out)
    return PredictResult(table, out=str(out), images=len(ids), predicted=len(kept), seconds=round(secs, 3),
                         images_per_s=round(len(ids) / max(secs, 1e-9), 1), precision=_policy(model),
                         skipped=skipped)


@dataclass(frozen=True)
class EmbedResult:
    """What `embed` wrote: rows at `out` (ids beside it), images of the split, rows embedded, where
    this run started (images done by an earlier interrupted run), storage dtype, time, skipped ids."""

    out: str
    images: int
    embedded: int
    resumed_from: int
    dim: int
    dtype: str
    seconds: float
    images_per_s: float
    skipped: list[dict] = field(default_factory=list)

    def stats(self) -> dict:
        return {"out": self.out, "images": self.images, "embedded": self.embedded, "resumed_from": self.resumed_from,
                "dim": self.dim, "dtype": self.dtype, "seconds": self.seconds, "images_per_s": self.images_per_s,
                "skipped": len(self.skipped)}


def folder_images(folder: str | os.PathLike) -> tuple[list[str], list[Path]]:
    """(ids, paths) of every image under a plain folder (e.g. a pool of non-landmark photos): an image's id
    is its path relative to the folder without the extension (`people/0001`)."""
    from pipeline.images import image_files

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    paths = list(image_files(root))
    ids = [p.relative_to(root).with_suffix("").as_posix() for p in paths]
    dup = pd.Index(ids)[pd.Index(ids).duplicated()]
    if len(dup):
        raise UserError(f"--images {folder}: two images share the id {dup[0]!r} (same name, other extension); "
                        "rename one")
    return ids, paths


def embed(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, split: str = "train",
          out: str | os.PathLike, images: str | os.PathLike | None = None,
          batch_size: int = PREDICT.default("batch_size"), float16: bool = False,
          precision: str | None = PREDICT.default("precision"), commit_s: float = 10.0) -> EmbedResult:
    """Embed every image of `split` of the competition `data_dir` — or every image under the folder
    `images` (`folder_images`) — into `out` (.npy of L2-normalised rows + .ids.txt, the contract of
    `glr predict --embeddings`), streamed through a memory-mapped file: memory independent of the
    number of images. Progress is committed every `commit_s` seconds to `out.partial/`; a rerun with
    the same model, images and storage continues there (anything else starts afresh)."""
    from pipeline.acquire.competition import Competition
    from pipeline.model.data import path_dataset, warn_skipped
    from pipeline.model.embeddings import resumable_writer
    from submissions.files import sha256_file

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if (data_dir is None) == (images is None):
        raise UserError("give either --data-dir (a competition, with --split) or --images (a folder of images)")
    run_dir, out = Path(run_dir), Path(out)
    if images is not None:
        ids, paths = folder_images(images)
        split, what = "folder", f"--images {images}"
    else:
        comp = Competition(data_dir)
        ids, folder = images_of_split(run_dir, comp, split)
        paths, what = comp.image_paths(ids, folder), f"--split {split}: {data_dir}"
    if not ids:
        raise UserError(f"{what}: no images; nothing to embed")
    model, _, manifest = load_run_model(run_dir, precision)
    size = int(manifest["image_size"])
    dim = int(np.prod(model.get_layer("embedding").output.shape[1:]))
    fingerprint = {"model": sha256_file(run_dir / "model.keras"), "policy": _policy(model), "split": split,
                   "image_size": size, "ids": _ids_digest(ids)}
    writer = resumable_writer(out, len(ids), dim, "float16" if float16 else "float32", fingerprint, commit_s)
    start = writer.images
    step = compiled_step(model, 0, True)
    t0 = time.perf_counter()
    ds = path_dataset(paths[start:], size, batch_size=batch_size)
    _, _, ok = _stream(step, ds, ids[start:], batch_size, writer, f"embed {split}", top_k=False)
    writer.finish_into(out)
    secs = time.perf_counter() - t0
    skipped = [{"id": ids[start + i], "path": str(paths[start + i]), "reason": "missing or cannot decode"}
               for i in np.flatnonzero(~ok)]
    warn_skipped(skipped)
    return EmbedResult(str(out), images=len(ids), embedded=writer.rows, resumed_from=start, dim=dim,
                       dtype="float16" if float16 else "float32", seconds=round(secs, 3),
                       images_per_s=round((len(ids) - start) / max(secs, 1e-9), 1), skipped=skipped)


def _ids_digest(ids: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode() + b"\n")
    return h.hexdigest()
