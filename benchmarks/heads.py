"""Softmax vs ArcFace (+ GeM + neck) heads on the synthetic competition, same budget.

From scratch (`--weights none`, 32 px, head only on bottleneck features, no fine-tuning), each
backbone is trained with the study's softmax head and with `--head arcface --pooling gem
--embedding-dim 64`, the same epochs and seed. Measured on the run's held-out validation images
(stratified, `val_frac`): the classifier's top-1 (`glr predict --split val`) and the retrieval
top-1 — the landmark of the nearest training-split image by cosine of the "embedding" layer
(what `glr embed` + `glr knn` use). Writes its section of benchmarks/RESULTS.md.

    python benchmarks/heads.py [--landmarks 10 --per-landmark 20 --epochs 30]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import write_section  # noqa: E402

HEADS = {"softmax": {}, "arcface+gem+64": {"head": "arcface", "pooling": "gem", "embedding_dim": 64}}


def one(root: Path, work: Path, backbone: str, name: str, head: dict, epochs: int) -> dict:
    from pipeline.model.embeddings import read_embeddings
    from pipeline.model.predict import predict
    from pipeline.model.train import read_split, train

    out = work / f"{backbone}-{name}"
    t0 = time.perf_counter()
    train(root, out=out, backbone=backbone, weights="none", image_size=32, batch_size=8, precision="fp32",
          epochs=epochs, fine_tune_epochs=0, patience=epochs + 1, val_frac=0.25, head_batch_size=16,
          cache_dir=work / "cache", seed=0, **head)
    secs = time.perf_counter() - t0
    split = read_split(out)
    truth = dict(zip(split["id"], split["landmark_id"]))
    pv = predict(out, root, split="val", out=out / "val.parquet", top_k=1, embeddings=str(out / "val.npy")).table
    predict(out, root, split="train", out=out / "train.parquet", top_k=1, embeddings=str(out / "all.npy"))
    top1 = float((pv["landmark_id"].to_numpy() == pv["id"].map(truth).to_numpy()).mean())
    qids, q = read_embeddings(out / "val.npy")
    ids, x = read_embeddings(out / "all.npy")
    is_train = np.isin(np.asarray(ids), split.loc[split["split"] == "train", "id"].to_numpy())
    idx_ids, idx = np.asarray(ids)[is_train], np.asarray(x)[is_train]
    nn = np.argmax(np.asarray(q) @ idx.T, axis=1)
    knn1 = float(np.mean([truth[i] == truth[j] for i, j in zip(qids, idx_ids[nn])]))
    return {"backbone": backbone, "head": name, "val classifier top-1": round(top1, 3),
            "val 1-NN retrieval top-1": round(knn1, 3), "val images": len(qids), "train s": round(secs, 1)}


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--landmarks", type=int, default=10)
    ap.add_argument("--per-landmark", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--backbones", default="vgg16,resnet50")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    from pipeline.acquire.synth import make_competition

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "comp"
        make_competition(root, seed=3, landmarks=a.landmarks, per_landmark=a.per_landmark, test=4,
                         distractor_frac=0.0, size=32)
        rows = [one(root, work, b, name, head, a.epochs) for b in a.backbones.split(",") for name, head in HEADS.items()]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if a.no_write:
        return
    body = ("## heads: softmax vs ArcFace on the synthetic competition\n\n"
            f"{a.landmarks} landmarks × {a.per_landmark} images at 32 px, from scratch (`--weights none`), "
            f"{a.epochs} head epochs on bottleneck features, no fine-tuning, seed 0; chance = {1 / a.landmarks:.3f}. "
            "Held-out = the run's stratified validation images (25 %). Retrieval: the landmark of the nearest "
            "training-split image by cosine of the `embedding` layer.\n\n" + _markdown(table))
    write_section("heads", body, "python benchmarks/heads.py")


if __name__ == "__main__":
    main()
