"""Match the local features of two images and count the geometrically consistent matches (RANSAC inliers).

Matching is vectorised (one BLAS matrix product per pair for float descriptors, taken in row
blocks that stay in cache; OpenCV's brute-force Hamming matcher for ORB), with Lowe's ratio test
(+ optional mutual check) for SIFT/ORB and DELF's own rule (nearest neighbour within L2 distance
0.8) for DELF. Matches come out best first (by distance ratio, DELF by distance), the order
PROSAC samples in. Geometry is checked by OpenCV (`estimateAffine2D` with USAC_PROSAC by default;
RANSAC, MAGSAC, homography, fundamental matrix as options), seeded before every call so a pair
always gives the same count; the count is the inliers of the best model plus those of a second
model fitted to the matches left (`MatchConfig.models`). `skimage_inliers`
is the study's reference path, kept only for tests and benchmarks.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.options import VERIFY
from pipeline.verify.features import Features, make_config, make_extractor
from submissions.errors import UserError

_V = VERIFY.default  # the user-facing settings' defaults are the schema's
MODELS = VERIFY["model"].choices
METHODS = VERIFY["method"].choices
_MIN_POINTS = {"affine": 3, "homography": 4, "fundamental": 8}
# reprojection threshold when none is set, in working-image pixels: 20 chosen on real photos for SIFT with
# PROSAC (benchmarks/real_pairs.py; 12 with plain RANSAC before); 20 for DELF, as its reference matcher
# (DELF's match_images.py) uses; ORB keeps 12 (not re-measured)
DEFAULT_THRESHOLD = {"sift": 20.0, "orb": 12.0, "delf": 20.0}
_BLOCK = 256  # score-matrix rows per block: the passes over a block read it from cache, not memory
_METHOD_FLAGS = {"ransac": "RANSAC", "magsac": "USAC_MAGSAC", "prosac": "USAC_PROSAC"}


@dataclass(frozen=True)
class MatchConfig:
    """How two feature sets are matched and verified (defaults chosen in benchmarks/real_pairs.py)."""

    ratio: float = _V("ratio")  # sift/orb: Lowe's ratio test on descriptor distances
    mutual: bool = _V("mutual")  # sift/orb: keep only mutual nearest neighbours
    delf_distance: float = 0.8  # delf: nearest neighbour accepted within this L2 distance
    model: str = _V("model")  # affine | homography | fundamental
    method: str = _V("method")  # prosac (OpenCV USAC_PROSAC: needs matches best first) | ransac | magsac
    threshold: float | None = _V("threshold")  # reprojection threshold, working-image pixels; None: per extractor
    max_iters: int = 2000  # real photos: same AUC as 10000 (total inliers -0.4%), 5x cheaper on negatives
    confidence: float = 0.9999  # high, so adaptive termination does not stop at a weaker model
    # geometric models counted: the best model's inliers plus, for each further one, the best model's among the
    # matches still left (a landmark's second plane: another façade, a tower). Real photos: +0.002..+0.010 ROC AUC
    # over one model in every setting measured (benchmarks/real_pairs.py), ~0.5 ms per pair
    models: int = 2
    seed: int = _V("seed")

    def __post_init__(self):
        if self.model not in MODELS:
            raise UserError(f"unknown --model {self.model!r}; choose one of: {', '.join(MODELS)}")
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not 0 < self.ratio <= 1:
            raise UserError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.threshold is not None and self.threshold <= 0:
            raise UserError(f"--threshold must be positive, got {self.threshold}")
        if int(self.models) < 1:
            raise ValueError(f"models must be at least 1, got {self.models}")

    def for_extractor(self, extractor: str) -> MatchConfig:
        """This config with the threshold resolved: the one set, else `extractor`'s default (DEFAULT_THRESHOLD)."""
        if self.threshold is not None:
            return self
        return dataclasses.replace(self, threshold=DEFAULT_THRESHOLD[extractor])


def match_descriptors(da: np.ndarray, db: np.ndarray, *, ratio: float | None = 0.85, mutual: bool = False,
                      max_distance: float | None = None) -> np.ndarray:
    """Tentative matches (M×2 int index pairs a→b), best first: nearest neighbour + ratio test / distance bound.

    Float descriptors: squared L2 distances from one matrix product (‖a‖² + ‖b‖² − 2a·b), in blocks of
    rows. uint8 descriptors (ORB): Hamming distances via OpenCV's brute-force matcher. Order: by
    distance ratio (nearest / second nearest) with a ratio, else by distance; ties by index.
    """
    if len(da) == 0 or len(db) == 0:
        return np.zeros((0, 2), np.int64)
    if da.dtype == np.uint8:
        return _match_hamming(da, db, ratio=ratio, mutual=mutual, max_distance=max_distance)
    best, d1, d2, col_ok = _nearest_two(np.asarray(da, np.float32), np.asarray(db, np.float32), mutual)
    return _select(best, d1, d2, col_ok, ratio, max_distance)


def _nearest_two(da: np.ndarray, db: np.ndarray, mutual: bool):
    """Per row of `da`: nearest row of `db`, squared distances to the nearest and second nearest, and
    (with `mutual`) whether the nearest has this row as its own nearest."""
    na = np.einsum("ij,ij->i", da, da)
    nb = np.einsum("ij,ij->i", db, db)
    unit = np.abs(nb - 1).max() < 1e-5  # unit descriptors (RootSIFT, projected RootSIFT, DELF): d² = ‖a‖² + 1 − 2a·b
    dbt = np.ascontiguousarray(db.T)
    n = len(da)
    best = np.empty(n, np.int64)
    v1 = np.empty(n, np.float32)
    v2 = np.full(n, -np.inf, np.float32)
    col_best = np.full(len(db), -np.inf, np.float32)
    for s in range(0, n, _BLOCK):
        scores = da[s:s + _BLOCK] @ dbt  # the one O(n·m·d) step: BLAS sgemm
        if not unit:  # score = a·b − ‖a‖²/2 − ‖b‖²/2 = −d²/2 (comparable along rows and columns)
            scores -= 0.5 * nb[None, :]
            scores -= 0.5 * na[s:s + _BLOCK, None]
        rows = np.arange(scores.shape[0])
        b = scores.argmax(axis=1)
        best[s:s + _BLOCK] = b
        v1[s:s + _BLOCK] = scores[rows, b]
        if mutual:
            np.maximum(col_best, scores.max(axis=0), out=col_best)
        if scores.shape[1] > 1:
            scores[rows, b] = -np.inf
            v2[s:s + _BLOCK] = scores.max(axis=1)
    if unit:
        d1, d2 = na + 1 - 2 * v1, na + 1 - 2 * v2
    else:
        d1, d2 = -2 * v1, -2 * v2
    col_ok = v1 >= col_best[best] if mutual else None  # a's best b has a as its best too
    return best, np.maximum(d1, 0), np.maximum(d2, 0), col_ok


def _select(best, d1, d2, col_ok, ratio, max_distance) -> np.ndarray:
    """The kept matches of nearest-two results (squared distances), best first."""
    keep = np.ones(len(best), bool)
    if max_distance is not None:
        keep &= d1 < max_distance**2
    if ratio is not None and ratio < 1:
        keep &= d1 < (ratio**2) * d2
    if col_ok is not None:
        keep &= col_ok
    return _best_first(np.arange(len(best)), best, d1, d2, keep, ratio)


def _best_first(q: np.ndarray, t: np.ndarray, d1: np.ndarray, d2: np.ndarray, keep: np.ndarray,
                ratio: float | None) -> np.ndarray:
    """The kept matches (q→t) best first, the order PROSAC samples in: by distance ratio (nearest / second
    nearest) when there is a ratio test, else by distance; ties by index."""
    quality = d1 / np.maximum(d2, 1e-12) if ratio is not None else d1
    order = np.flatnonzero(keep)[np.argsort(quality[keep], kind="stable")]
    return np.stack([q[order], t[order]], axis=1)


def _match_hamming(da, db, *, ratio, mutual, max_distance) -> np.ndarray:
    import cv2

    bf = cv2.BFMatcher(cv2.NORM_HAMMING)
    knn = bf.knnMatch(da, db, k=2)
    q = np.array([m[0].queryIdx for m in knn if m], np.int64)
    t = np.array([m[0].trainIdx for m in knn if m], np.int64)
    d1 = np.array([m[0].distance for m in knn if m], np.float32)
    d2 = np.array([m[1].distance if len(m) > 1 else np.inf for m in knn if m], np.float32)
    keep = np.ones(len(q), bool)
    if ratio is not None and ratio < 1:
        keep &= d1 < ratio * d2
    if max_distance is not None:
        keep &= d1 <= max_distance
    if mutual and len(q):
        back = bf.match(db, da)
        rev = np.full(len(db), -1, np.int64)
        rev[[m.queryIdx for m in back]] = [m.trainIdx for m in back]
        keep &= rev[t] == q
    return _best_first(q, t, d1, d2, keep, ratio)


def ransac_inliers(src: np.ndarray, dst: np.ndarray, config: MatchConfig = MatchConfig()) -> np.ndarray:
    """Boolean inlier mask of the matched points under the configured model (seeded OpenCV; prosac samples
    the matches in the order given: best first, as match_descriptors returns them)."""
    import cv2

    n = len(src)
    if config.threshold is None:  # unresolved: SIFT's default (match_features resolves it per extractor)
        config = config.for_extractor("sift")
    if n < _MIN_POINTS[config.model]:
        return np.zeros(n, bool)
    src = np.ascontiguousarray(src, np.float32).reshape(-1, 1, 2)
    dst = np.ascontiguousarray(dst, np.float32).reshape(-1, 1, 2)
    cv2.setRNGSeed(int(config.seed))  # same pair → same count, on every run and machine
    method = getattr(cv2, _METHOD_FLAGS[config.method])
    try:
        if config.model == "affine":
            model, mask = cv2.estimateAffine2D(src, dst, method=method, ransacReprojThreshold=config.threshold,
                                               maxIters=config.max_iters, confidence=config.confidence,
                                               refineIters=10)
        elif config.model == "homography":
            model, mask = cv2.findHomography(src, dst, method, config.threshold, maxIters=config.max_iters,
                                             confidence=config.confidence)
        else:
            model, mask = cv2.findFundamentalMat(src, dst, cv2.FM_RANSAC if config.method == "ransac" else method,
                                                 config.threshold, config.confidence, config.max_iters)
    except cv2.error:  # degenerate configurations (all points collinear, ...)
        return np.zeros(n, bool)
    if model is None or mask is None:
        return np.zeros(n, bool)
    return mask.reshape(-1).astype(bool)


def skimage_inliers(src: np.ndarray, dst: np.ndarray, *, threshold: float = 12.0, max_trials: int = 1000,
                    seed: int = 0) -> np.ndarray:
    """The study's reference: `skimage.measure.ransac` with `AffineTransform` (slow; tests/benchmarks only)."""
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    if len(src) < 3:
        return np.zeros(len(src), bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, mask = ransac((np.asarray(src, float), np.asarray(dst, float)), AffineTransform, min_samples=3,
                         residual_threshold=threshold, max_trials=max_trials, rng=seed)
    return np.zeros(len(src), bool) if mask is None else np.asarray(mask, bool)


def match_features(fa: Features, fb: Features, config: MatchConfig = MatchConfig(), *,
                   delf: bool | None = None) -> dict:
    """Match two feature sets and verify geometrically → {inliers, tentative, matches, inlier_mask}.

    `inliers` counts the matches of up to `config.models` geometric models, each fitted to the matches
    the previous ones left (one model with models = 1).

    `delf` (default: guessed from the 40-D descriptors) selects DELF's distance rule.
    """
    if delf is None:
        delf = fa.descriptors.ndim == 2 and fa.descriptors.shape[1] == 40 and fa.descriptors.dtype != np.uint8
    if delf:
        matches = match_descriptors(fa.descriptors, fb.descriptors, ratio=None, max_distance=config.delf_distance)
    else:
        matches = match_descriptors(fa.descriptors, fb.descriptors, ratio=config.ratio, mutual=config.mutual)
    if config.threshold is None:
        config = config.for_extractor("delf" if delf else "sift")
    src, dst = fa.work_locations[matches[:, 0]], fb.work_locations[matches[:, 1]]
    mask = np.zeros(len(matches), bool)
    for _ in range(int(config.models)):  # each model on the matches the previous ones left (still best first)
        left = np.flatnonzero(~mask)
        found = ransac_inliers(src[left], dst[left], config)
        if not found.any():
            break
        mask[left[found]] = True
    return {"inliers": int(mask.sum()), "tentative": int(len(matches)), "matches": matches, "inlier_mask": mask}


def match_config(extractor: str | None = None, **options) -> MatchConfig:
    """MatchConfig from keyword options where None means "the default"; with `extractor`, its threshold
    resolved (so that a settings record names the threshold really used)."""
    cfg = MatchConfig(**{k: v for k, v in options.items() if v is not None})
    return cfg.for_extractor(extractor) if extractor else cfg


def match_pair(img_a: str | os.PathLike, img_b: str | os.PathLike, *, extractor: str = _V("extractor"),
               max_side: int = _V("max_side"), n_features: int = _V("n_features"),
               delf_handle: str = _V("delf_handle"), ratio: float = _V("ratio"), mutual: bool = _V("mutual"),
               model: str = _V("model"), method: str = _V("method"), threshold: float = _V("threshold"),
               seed: int = _V("seed"), plot: str | os.PathLike | None = None) -> dict:
    """Inlier count of two image files (debugging `glr match`); with `plot`, a PNG of inlier matches."""
    from pipeline.images import ImageReadError

    ext = make_extractor(make_config(extractor, max_side=max_side, n_features=n_features, handle=delf_handle))
    cfg = match_config(extractor, ratio=ratio, mutual=mutual, model=model, method=method, threshold=threshold,
                       seed=seed)
    t0 = time.perf_counter()
    try:
        fa, fb = ext.extract_path(img_a), ext.extract_path(img_b)
    except ImageReadError as e:
        raise UserError(str(e)) from None
    t1 = time.perf_counter()
    res = match_features(fa, fb, cfg, delf=extractor == "delf")
    t2 = time.perf_counter()
    out = {"inliers": res["inliers"], "tentative_matches": res["tentative"], "keypoints_a": fa.n,
           "keypoints_b": fb.n, "extract_ms": round((t1 - t0) * 1000, 2), "match_ms": round((t2 - t1) * 1000, 2),
           "extractor": extractor, "model": cfg.model, "method": cfg.method}
    if plot:
        from pipeline.verify.plot import plot_matches

        good = res["matches"][res["inlier_mask"]]
        out["plot"] = str(plot_matches(img_a, img_b, fa.locations[good[:, 0]], fb.locations[good[:, 1]], plot,
                                       title=f"{res['inliers']} inliers / {res['tentative']} matches"))
    return out
