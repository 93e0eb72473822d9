"""Training caches benchmark: bytes per image before/after the shared caches, for a 3-backbone
`glr run` at 96 px (split fit + full fit per backbone), projected to GLDv2; and the time of a fit
that finds its images (and base features) already cached vs one that decodes them.

    .venv/bin/python benchmarks/train_cache.py [--write] [--quick]

Before: every `glr train` wrote its own uint8 decode cache and float32 base-feature cache in its
run folder, so a 3-backbone run with final_fit = all held each image 6 times decoded and twice
per backbone as float32 features. After: one decoded copy per image and size under the cache
root, and one float16 feature row per image and base, shared by the split and full fits.
The feature shapes come from the models themselves (`feature_shape`, weights none).
Timed part: a synthetic competition (`glr synth`, 20 landmarks × 30 photos, 512 px JPEGs), fits
with weights none, 1 head epoch on bottleneck features, no fine-tuning.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

from benchmarks._results import write_section  # noqa: E402

BACKBONES = ("vgg16", "vgg19", "resnet50")
GLDV2_IMAGES = 1_580_470
SIZE = 96


def per_image_bytes() -> tuple[list[str], dict]:
    """Bytes per training image before/after, from the models' real feature shapes at 96 px."""
    import numpy as np

    from pipeline.model import backbones as M

    M.set_precision("fp32")
    rows = []
    img_before, img_after = 6 * SIZE * SIZE * 3, SIZE * SIZE * 3
    feat_before = feat_after = 0
    for b in BACKBONES:
        shape = M.feature_shape(M.build_model(b, 2, SIZE, weights="none"))
        n = int(np.prod(shape))
        feat_before += 2 * 4 * n   # split + full fit, float32
        feat_after += 2 * n        # one shared row, float16
        rows.append(f"| {b} base features {shape} | 2 × {4 * n:,} (float32) | {2 * n:,} (float16) |")
    totals = {"img_before": img_before, "img_after": img_after, "feat_before": feat_before, "feat_after": feat_after}
    return rows, totals


def index_cost(n: int = GLDV2_IMAGES) -> dict:
    """Memory and time of the store's index at GLDv2's size (random keys)."""
    import numpy as np

    from pipeline.caches import _Index

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, (n, 16), dtype=np.uint8).view("S16").ravel()
    t0 = time.perf_counter()
    idx = _Index().merged(list(keys), list(range(n)), [], [])
    merge_s = time.perf_counter() - t0
    q = keys[rng.permutation(n)]
    t0 = time.perf_counter()
    rows, _ = idx.lookup(q)
    lookup_s = time.perf_counter() - t0
    assert (rows >= 0).all()
    return {"mb": (idx.keys.nbytes + idx.rows.nbytes) / 1e6, "merge_s": merge_s, "lookup_s": lookup_s}


def timed_fits(work: Path, quick: bool) -> list[dict]:
    from pipeline.acquire.synth import make_competition
    from pipeline.model.train import train

    comp = work / "comp"
    lm, per = (6, 10) if quick else (20, 30)
    make_competition(comp, seed=0, landmarks=lm, per_landmark=per, test=20, size=512)
    opts = dict(weights="none", image_size=SIZE, epochs=1, fine_tune_epochs=0, precision="fp32", seed=0,
                cache_dir=work / "cache")
    out = []
    for name, backbone in (("vgg16 (cold cache)", "vgg16"), ("resnet50 (images cached)", "resnet50"),
                           ("vgg16 again (images + features cached)", "vgg16")):
        t0 = time.perf_counter()
        m = train(comp, backbone=backbone, out=work / f"run{len(out)}", **opts)
        c = m["caches"]
        out.append({"name": name, "total_s": time.perf_counter() - t0, "decoded": c["images"]["decoded"],
                    "cached": c["images"]["cached"], "decode_s": c["images"]["seconds"],
                    "computed": c["bottleneck"]["computed"], "features_s": c["bottleneck"]["seconds"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="6 landmarks × 10 photos (a smoke run)")
    args = ap.parse_args()

    rows, t = per_image_bytes()
    before, after = t["img_before"] + t["feat_before"], t["img_after"] + t["feat_after"]
    gb = GLDV2_IMAGES / 1e9
    idx = index_cost()
    with tempfile.TemporaryDirectory() as tmp:
        fits = timed_fits(Path(tmp), args.quick)

    lines = [
        f"Cache bytes per training image, 3-backbone `glr run` at {SIZE} px with final_fit = all (split + full",
        "fit per backbone); GLDv2 = 1.58M images. An upper bound: the split fit reads only the local-validation",
        "training subset, and max_per_class caps a few classes.",
        "",
        "| cache | before (per image) | after (per image) |",
        "|---|---:|---:|",
        f"| decoded images ({SIZE}×{SIZE}×3 uint8) | 6 × {SIZE * SIZE * 3:,} | 1 × {SIZE * SIZE * 3:,} |",
        *rows,
        f"| **total** | **{before:,} B** | **{after:,} B** |",
        f"| **GLDv2 (1.58M images)** | **{before * gb:,.0f} GB** | **{after * gb:,.0f} GB** |",
        "",
        f"Decoded images alone: {t['img_before'] * gb:,.0f} GB → {t['img_after'] * gb:,.0f} GB; base features: "
        f"{t['feat_before'] * gb:,.0f} GB → {t['feat_after'] * gb:,.0f} GB (`bottleneck = false`: 0). "
        f"Before: each image decoded 6 times; after: once.",
        "",
        f"Store index at 1.58M images: {idx['mb']:.0f} MB in memory (16-byte keys + row numbers), "
        f"{idx['merge_s']:.1f} s to merge a commit, {idx['lookup_s']:.1f} s to look up every image.",
        "",
        f"Fits on a synthetic competition ({'6 × 10' if args.quick else '20 × 30'} photos, 512 px JPEGs) sharing "
        "one cache root (weights none, 1 head epoch on bottleneck features):",
        "",
        "| fit | images decoded | from cache | decode s | features computed | features s | fit total s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {f['name']} | {f['decoded']} | {f['cached']} | {f['decode_s']:.2f} | {f['computed']} | "
          f"{f['features_s']:.2f} | {f['total_s']:.1f} |" for f in fits],
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section("train-cache", body, "python benchmarks/train_cache.py --write")


if __name__ == "__main__":
    main()
