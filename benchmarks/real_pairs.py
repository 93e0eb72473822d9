"""ROC AUC of inlier counts on real photos: same-landmark pairs vs different-landmark/distractor pairs.

    .venv/bin/python benchmarks/real_pairs.py --photos /work/shared/realphotos-dev [--write]
    .venv/bin/python benchmarks/real_pairs.py --photos DIR --sweep      # compare settings

`DIR/labels.csv` has `file` (relative to DIR) and `landmark` (empty for a distractor). Every
unordered pair of photos is matched once with the default settings of `pipeline.verify.matching`
(features extracted once per photo, as `glr verify` does). The photos are only read here: they
are never copied into the project or used by tests.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core: the figure is per process
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half (no sklearn needed)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def load_labels(photos: Path) -> pd.DataFrame:
    lab = pd.read_csv(photos / "labels.csv", dtype=str, keep_default_na=False)
    return lab[["file", "landmark"]]


def extract_all(photos: Path, files: list[str], extractor: str = "sift", **opts):
    """(features as the cache returns them, extraction CPU ms per photo, mean cache-entry KB per photo)."""
    from pipeline.verify.cache import decode, encode
    from pipeline.verify.features import make_config, make_extractor

    ext = make_extractor(make_config(extractor, **opts))
    t0 = time.process_time()
    raw = [ext.extract_path(photos / f) for f in files]
    ms = (time.process_time() - t0) * 1000 / len(files)
    blobs = [encode(f) for f in raw]
    return [decode(b) for b in blobs], ms, float(np.mean([len(b) for b in blobs])) / 1000


def all_pairs(labels: list[str], negatives: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """Every unordered pair; with `negatives`, all same-landmark pairs plus that many others drawn at random."""
    pairs = list(itertools.combinations(range(len(labels)), 2))
    if negatives is None:
        return pairs
    pos = [p for p in pairs if labels[p[0]] and labels[p[0]] == labels[p[1]]]
    pos_set = set(pos)
    neg = [p for p in pairs if p not in pos_set]
    pick = np.random.default_rng(seed).choice(len(neg), size=min(negatives, len(neg)), replace=False)
    return pos + [neg[i] for i in sorted(pick)]


def score_pairs(feats, labels: list[str], match_cfg, delf: bool = False, pairs=None):
    from pipeline.verify.matching import match_features

    pairs = all_pairs(labels) if pairs is None else pairs
    counts = np.zeros(len(pairs))
    positive = np.array([labels[i] != "" and labels[i] == labels[j] for i, j in pairs])
    times = []
    for n, (i, j) in enumerate(pairs):
        t0 = time.process_time()  # CPU time of this single-threaded process: fair on shared cores
        counts[n] = match_features(feats[i], feats[j], match_cfg, delf=delf)["inliers"]
        times.append(time.process_time() - t0)
    return roc_auc(counts, positive), float(np.median(times) * 1000), counts, positive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", required=True, type=Path)
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--sweep", action="store_true", help="also try other sizes / ratios / models")
    ap.add_argument("--sweep-negatives", type=int, default=400,
                    help="the sweep uses all same-landmark pairs and this many other pairs (keeps it short)")
    args = ap.parse_args()

    import cv2

    from pipeline.verify.features import ExtractorConfig
    from pipeline.verify.matching import MatchConfig

    cv2.setNumThreads(1)
    lab = load_labels(args.photos)
    files, labels = lab["file"].tolist(), lab["landmark"].tolist()
    n_pairs = len(files) * (len(files) - 1) // 2
    n_pos = sum(1 for i, j in itertools.combinations(range(len(files)), 2) if labels[i] and labels[i] == labels[j])
    print(f"{len(files)} photos, {n_pairs} pairs ({n_pos} same-landmark)")

    d_ext, d_match = ExtractorConfig(), MatchConfig().for_extractor("sift")  # threshold: SIFT's default
    # the default until issue 13 item 6: 128-D RootSIFT, OpenCV's contrast threshold, 1000 keypoints, RANSAC 12 px
    prev_ext = {"max_side": 512, "n_features": 1000, "contrast_threshold": 0.04, "pca_dims": 0}
    prev_match = MatchConfig(ratio=0.85, mutual=True, model="affine", method="ransac", threshold=12.0, models=1)
    rows = []

    sample = all_pairs(labels, negatives=args.sweep_negatives)

    cache: dict = {}  # features per extractor setting, shared by every run below

    def run(label, ext_opts: dict, match_cfg: MatchConfig, pairs=None):
        key = tuple(sorted(ext_opts.items()))
        if key not in cache:
            cache[key] = extract_all(args.photos, files, **ext_opts)
        feats, ext_ms, kb = cache[key]
        auc, ms, _, _ = score_pairs(feats, labels, match_cfg, pairs=pairs)
        rows.append((label, auc, ms, ext_ms, kb))
        print(f"{label:58s} AUC {auc:.3f}  match+RANSAC {ms:6.2f} ms/pair  extract {ext_ms:6.1f} ms/img  "
              f"{kb:5.1f} KB/img", flush=True)

    base = {"max_side": d_ext.max_side, "n_features": d_ext.n_features}
    dims = f"{d_ext.pca_dims}-D PCA-" if d_ext.pca_dims else ""
    run(f"**default**: {dims}RootSIFT {d_ext.max_side}px {d_ext.n_features} feats (contrast "
        f"{d_ext.contrast_threshold:g}), ratio {d_match.ratio}, {'mutual, ' if d_match.mutual else ''}"
        f"{d_match.model} {d_match.method.upper()} {d_match.threshold:g}px, inliers of {d_match.models} models, "
        "all pairs", base, d_match)
    run("previous default (RootSIFT 512px 1000, ratio 0.85, mutual, affine 12px), all pairs", prev_ext, prev_match)
    if args.sweep:
        from dataclasses import replace

        n_s = sum(1 for i, j in sample if labels[i] and labels[i] == labels[j])
        print(f"sweep on all {n_s} same-landmark pairs + {len(sample) - n_s} other pairs drawn at random")
        run("default (sweep sample)", base, d_match, pairs=sample)
        run("previous default (sweep sample)", prev_ext, prev_match, pairs=sample)
        run("previous default + PROSAC 20px (1000 feats, 128-D)", prev_ext,
            replace(prev_match, method="prosac", threshold=20.0), pairs=sample)
        run("previous default + contrast 0.02, 2000 feats (128-D, RANSAC 12px)",
            {**prev_ext, "contrast_threshold": 0.02, "n_features": 2000}, prev_match, pairs=sample)
        run("one model (inliers of the best model only)", base, replace(d_match, models=1), pairs=sample)
        run("three models", base, replace(d_match, models=3), pairs=sample)
        run("previous default + a second model", prev_ext, replace(prev_match, models=2), pairs=sample)
        run("128-D RootSIFT (no projection)", {**base, "pca_dims": 0}, d_match, pairs=sample)
        for d in (32, 48):
            run(f"{d}-D projection", {**base, "pca_dims": d}, d_match, pairs=sample)
        run("contrast 0.04 (OpenCV's default)", {**base, "contrast_threshold": 0.04}, d_match, pairs=sample)
        for nf in (1500, 2000, 2500):
            run(f"{nf} feats", {**base, "n_features": nf}, d_match, pairs=sample)
        run("2000 feats, contrast 0.04", {**base, "n_features": 2000, "contrast_threshold": 0.04}, d_match,
            pairs=sample)
        run("2000 feats, 48-D projection", {**base, "n_features": 2000, "pca_dims": 48}, d_match, pairs=sample)
        run("640px", {**base, "max_side": 640}, d_match, pairs=sample)
        run("RANSAC 20px instead of PROSAC", base, replace(d_match, method="ransac"), pairs=sample)
        run("RANSAC 12px instead of PROSAC 20px", base, replace(d_match, method="ransac", threshold=12.0), pairs=sample)
        for t in (12.0, 16.0, 25.0):
            run(f"PROSAC {t:g}px", base, replace(d_match, threshold=t), pairs=sample)
        run("MAGSAC 20px", base, replace(d_match, method="magsac"), pairs=sample)
        for r in (0.8, 0.9):
            run(f"ratio {r}", base, replace(d_match, ratio=r), pairs=sample)
        run("homography PROSAC 20px", base, replace(d_match, model="homography"), pairs=sample)
        for t in (4.0, 6.0):
            run(f"fundamental PROSAC {t:g}px", base, replace(d_match, model="fundamental", threshold=t), pairs=sample)
        run("ORB 512px 1000 feats (RANSAC 12px)", {"extractor": "orb", "max_side": 512, "n_features": 1000},
            prev_match, pairs=sample)
        run("ORB 512px 1000 feats (PROSAC 12px: ORB's default now)", {"extractor": "orb", **base},
            replace(d_match, threshold=12.0), pairs=sample)

    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import write_section

        body = [f"### Real photos: same-landmark vs other pairs ({len(files)} photos, {n_pairs} pairs, "
                f"{n_pos} same-landmark)", "",
                "ROC AUC of the RANSAC inlier count; match+RANSAC = median CPU time per pair on one core (features "
                "cached, as the cache returns them); extraction = mean CPU time per photo including JPEG/PNG decoding; "
                "cache = mean bytes of one photo's feature-cache entry.",
                "", "| settings | ROC AUC | match+RANSAC ms/pair | extraction ms/image | cache KB/image |",
                "|---|---|---|---|---|"]
        body += [f"| {a} | {b:.3f} | {c:.2f} | {d:.0f} | {e:.0f} |" for a, b, c, d, e in rows]
        if args.sweep:
            body += ["", f"Rows after the first two: all same-landmark pairs plus {args.sweep_negatives} other pairs "
                     "drawn at random (seed 0); each row changes one setting from the default (or from the previous "
                     "default where it says so)."]
        body += ["", "Noise: 146 same-landmark pairs, and most of them score in the range negatives reach (6–13 inliers), "
                 "so AUC moves by up to ±0.01 when nothing but RANSAC's sampling changes (feeding the previous default's "
                 "matches best first instead of by index moved it from 0.894 to 0.900; 1000/1500/2000 features read "
                 "0.921/0.908/0.924 on all pairs, with one model). What held across settings: PROSAC over RANSAC (+0.01), "
                 "the 64-D projection (same AUC as 128-D at about half the matching time), contrast 0.02 over 0.04, "
                 "a second model on the matches left (+0.002 to +0.010 in each of 6 settings tried on all pairs: "
                 "previous default, 2000 feats, 48-D, RANSAC 20px, contrast 0.04, the default; ~0.5 ms).",
                 "", "Tried outside this script (exploratory, sample pairs, then dropped): upright SIFT (one descriptor "
                 "per location, angle 0) 0.889 vs 0.896; counting only inliers whose keypoint scale and orientation "
                 "agree with the affine model 0.84–0.88; inliers in distinct 8/16-px cells 0.901/0.876; a tighter 6-px "
                 "refit 0.881; inliers minus 0.1 × tentative matches 0.844; USAC_ACCURATE 0.905–0.915 (below PROSAC); "
                 "a PCA fitted on these photos themselves (no better than the shipped skimage one); int8 storage at "
                 "a larger scale (clipping) no better; opencv-contrib's learned binary descriptors on the same SIFT "
                 "keypoints (512px 1000, ratio 0.85, mutual, PROSAC 20px, all pairs, separate venv): TEBLID-256 0.830, "
                 "TEBLID-512 0.849, BEBLID-512 0.850, at 13 ms/pair (OpenCV's Hamming matcher). Score = the tentative-match count alone reached 0.90–0.92: "
                 "RANSAC adds little on this set, but it is what makes a count mean geometry.",
                 "", "Times are CPU time of the single-threaded process (the machine's 2 cores were shared with "
                 "other jobs while this ran, which still inflates them somewhat)."]
        cmd = "python benchmarks/real_pairs.py --photos /work/shared/realphotos-dev" + (" --sweep" if args.sweep else "") + " --write"
        write_section("real_pairs", "\n".join(body), cmd)


if __name__ == "__main__":
    main()
