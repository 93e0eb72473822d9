"""Matching (vectorised nearest neighbours vs brute force), seeded RANSAC (vs the skimage reference)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.verify.features import make_extractor
from pipeline.verify.matching import (MatchConfig, match_descriptors, match_features, ransac_inliers,
                                      skimage_inliers)
from tests.verify.test_features import textured

ROOT = Path(__file__).resolve().parents[2]



def _brute(da, db, ratio, mutual, max_distance):
    from scipy.spatial.distance import cdist

    d = cdist(da.astype(float), db.astype(float))
    out = []
    for i, row in enumerate(d):
        o = np.argsort(row)
        j, d1, d2 = o[0], row[o[0]], row[o[1]]
        if ratio is not None and not d1 < ratio * d2:
            continue
        if max_distance is not None and not d1 < max_distance:
            continue
        if mutual and np.argmin(d[:, j]) != i:
            continue
        out.append((i, j))
    return np.array(out, np.int64).reshape(-1, 2)


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("ratio,mutual,max_distance", [(0.8, False, None), (0.9, True, None), (None, False, 0.8)])
def test_vectorised_matching_equals_brute_force(ratio, mutual, max_distance, unit):
    """Same matches as brute force (across several row blocks), best first: by distance ratio, else distance."""
    rng = np.random.default_rng(1)
    da = rng.random((600, 40), dtype=np.float32)  # > 2 blocks of 256 rows
    db = np.concatenate([da[:240] + rng.normal(0, 0.03, (240, 40)).astype(np.float32),
                         rng.random((300, 40), dtype=np.float32)])
    db = db[rng.permutation(len(db))]
    da /= np.linalg.norm(da, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    if not unit:  # e.g. plain SIFT-like magnitudes: the general path
        da *= rng.uniform(0.9, 1.1, (len(da), 1)).astype(np.float32)
        db *= rng.uniform(0.9, 1.1, (len(db), 1)).astype(np.float32)
    got = match_descriptors(da, db, ratio=ratio, mutual=mutual, max_distance=max_distance)
    want = _brute(da, db, ratio, mutual, max_distance)
    assert len(want) >= 120
    np.testing.assert_array_equal(got[np.argsort(got[:, 0])], want)
    d = np.linalg.norm(da[:, None, :].astype(float) - db[None, :, :], axis=2)
    d1 = d[got[:, 0], got[:, 1]]
    quality = d1 / np.sort(d[got[:, 0]], axis=1)[:, 1] if ratio is not None else d1
    assert (np.diff(quality) >= -1e-5).all()  # best first: the order PROSAC samples in


def test_hamming_matching_for_orb():
    rng = np.random.default_rng(2)
    da = rng.integers(0, 256, (80, 32), dtype=np.uint8)
    db = da.copy()
    db[:, 0] ^= 1  # one bit off: still each other's nearest neighbour
    db[40:, 1] ^= 0b111  # four bits off for the second half: these come after the first half (ratio order)
    got = match_descriptors(da, db, ratio=0.8, mutual=True)
    np.testing.assert_array_equal(np.sort(got[:, 0]), np.arange(80))
    np.testing.assert_array_equal(got[:, 0], got[:, 1])
    assert set(got[:40, 0]) == set(range(40))


# -- RANSAC -------------------------------------------------------------------------------------


def _affine_pairs(seed, n_in=120, n_out=200, noise=0.7):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 500, (n_in + n_out, 2))
    a = np.array([[1.1, 0.2], [-0.15, 0.9]]) * rng.uniform(0.7, 1.3)
    dst = src @ a.T + rng.uniform(-50, 50, 2)
    dst[:n_in] += rng.normal(0, noise, (n_in, 2))
    dst[n_in:] = rng.uniform(0, 500, (n_out, 2))
    return src.astype(np.float32), dst.astype(np.float32), n_in


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_opencv_counts_agree_with_skimage_reference_on_known_inliers(seed):
    src, dst, n_in = _affine_pairs(seed)
    cfg = MatchConfig(threshold=4.0)
    cv = ransac_inliers(src, dst, cfg)
    sk = skimage_inliers(src, dst, threshold=4.0, max_trials=2000, seed=seed)
    assert cv[:n_in].mean() >= 0.97  # finds (nearly) all true inliers: counts are not cut short
    assert abs(int(cv.sum()) - int(sk.sum())) <= max(3, 0.05 * n_in)
    assert abs(int(cv.sum()) - n_in) <= 0.05 * n_in + 6  # few outliers fall inside 4 px by chance


@pytest.mark.parametrize("method", ["magsac", "prosac"])
def test_ransac_is_seeded_and_repeatable_across_processes(method):
    src, dst, _ = _affine_pairs(5, n_in=15, n_out=200, noise=2.0)  # hard: few inliers
    cfg = MatchConfig(threshold=5.0, method=method)
    counts = {int(ransac_inliers(src, dst, cfg).sum()) for _ in range(5)}
    assert len(counts) == 1
    code = ("import numpy as np, sys; sys.path.insert(0, %r); from tests.verify.test_matching import _affine_pairs;"
            "from pipeline.verify.matching import ransac_inliers, MatchConfig;"
            "s, d, _ = _affine_pairs(5, n_in=15, n_out=200, noise=2.0);"
            "print(int(ransac_inliers(s, d, MatchConfig(threshold=5.0, method=%r)).sum()))") % (str(ROOT), method)
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert int(other) == counts.pop()


@pytest.mark.parametrize("model,method", [("affine", "ransac"), ("affine", "magsac"), ("affine", "prosac"),
                                          ("homography", "ransac"), ("homography", "magsac"),
                                          ("homography", "prosac"), ("fundamental", "ransac"),
                                          ("fundamental", "prosac")])
def test_models_find_a_homography_pair(model, method):
    rng = np.random.default_rng(7)
    src = rng.uniform(0, 400, (150, 2))
    h = np.array([[1.0, 0.05, 10], [0.02, 0.95, -5], [2e-5, 1e-5, 1]])  # mild: affine fits within 6 px
    p = np.c_[src, np.ones(150)] @ h.T
    dst = p[:, :2] / p[:, 2:]
    dst[100:] = rng.uniform(0, 400, (50, 2))
    mask = ransac_inliers(src, dst, MatchConfig(model=model, method=method, threshold=6.0))
    assert mask[:100].mean() > 0.9 and mask[100:].mean() < 0.3
    assert not ransac_inliers(src[:2], dst[:2], MatchConfig(model=model)).any()  # too few points: 0


def test_warped_image_matches_unrelated_does_not():
    import cv2

    img = textured(256, seed=3)
    h = np.array([[0.9, 0.1, 12], [-0.08, 0.95, 8], [2e-4, 1e-4, 1]])
    warped = cv2.warpPerspective(img, h, (256, 256), borderMode=cv2.BORDER_REFLECT)
    ext = make_extractor("sift", n_features=500)
    fa, fb, fc = ext.extract_array(img), ext.extract_array(warped), ext.extract_array(textured(256, seed=9))
    same = match_features(fa, fb)
    assert same["inliers"] >= 40
    assert match_features(fa, fc)["inliers"] <= 10
    # inliers agree with the true warp
    m = same["matches"][same["inlier_mask"]]
    p = np.c_[fa.locations[m[:, 0]], np.ones(len(m))] @ h.T
    err = np.linalg.norm(p[:, :2] / p[:, 2:] - fb.locations[m[:, 1]], axis=1)
    assert np.median(err) < 2.0


def test_threshold_defaults_per_extractor_and_is_recorded_in_the_fingerprint(tmp_path):
    """None = the extractor's default (DELF's reference matcher uses 20 px); the resolved value is what the
    settings record holds, so inliers counted for one extractor are never reused for another."""
    from pipeline.verify.features import make_config
    from pipeline.verify.inliers import settings_fingerprint
    from pipeline.verify.matching import DEFAULT_THRESHOLD, match_config

    assert MatchConfig().threshold is None
    assert match_config("delf").threshold == 20.0 == DEFAULT_THRESHOLD["delf"]
    assert match_config("sift").threshold == 20.0  # chosen with PROSAC on real photos (benchmarks/real_pairs.py)
    assert match_config("orb").threshold == 12.0
    assert match_config("delf", threshold=7.5).threshold == 7.5  # an explicit threshold wins
    orb, delf = make_config("orb"), make_config("delf")
    s_set, s_fp = settings_fingerprint(tmp_path, orb, MatchConfig())
    d_set, d_fp = settings_fingerprint(tmp_path, delf, MatchConfig())
    assert s_set["match"]["threshold"] == 12.0 and d_set["match"]["threshold"] == 20.0 and s_fp != d_fp
    assert settings_fingerprint(tmp_path, orb, match_config("orb"))[1] == s_fp  # resolved or not: same record
    # the unresolved config's RANSAC uses the extractor's threshold: 15-px-off matches are inliers for DELF, not ORB
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 400, (60, 2)).astype(np.float32)
    dst = src + np.float32([30, -10])
    dst[:20] += rng.choice([-1, 1], (20, 2)).astype(np.float32) * 11  # 15.6 px off the model
    assert ransac_inliers(src, dst, match_config("delf")).sum() == 60
    assert 40 <= ransac_inliers(src, dst, match_config("orb")).sum() <= 45  # the offset ones (bar a few) are out
    assert match_features(_feats(src), _feats(dst), MatchConfig(), delf=True)["inliers"] == 60  # None → 20 px


def _feats(loc):
    from pipeline.verify.features import Features

    n = len(loc)
    desc = np.random.default_rng(7).normal(size=(n, 40)).astype(np.float32)  # the same for both sets: i ↔ i
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    return Features(loc, desc, np.ones(n, np.float32), np.ones(n, np.float32), 1.0)


def test_second_model_counts_a_second_plane():
    """Two planes moved differently: one model counts one plane's matches, two models count both; unrelated
    points add (nearly) nothing either way."""
    from pipeline.verify.features import Features

    rng = np.random.default_rng(3)
    a1, a2 = rng.uniform(0, 250, (60, 2)), rng.uniform(260, 500, (40, 2))
    noise = rng.uniform(0, 500, (40, 2))
    src = np.concatenate([a1, a2, noise]).astype(np.float32)
    dst = np.concatenate([a1 @ np.array([[1.0, 0.1], [0.0, 0.95]]).T + [15, 5],
                          a2 @ np.array([[0.8, -0.2], [0.1, 1.1]]).T + [-60, 40],
                          rng.uniform(0, 500, (40, 2))]).astype(np.float32)
    fa, fb = _feats(src), _feats(dst)
    one = match_features(fa, fb, MatchConfig(threshold=4.0, models=1), delf=True)
    two = match_features(fa, fb, MatchConfig(threshold=4.0, models=2), delf=True)
    inl1, inl2 = (set(r["matches"][r["inlier_mask"], 0].tolist()) for r in (one, two))  # point indices
    assert 60 <= one["inliers"] <= 63 and set(range(60)) <= inl1
    assert 100 <= two["inliers"] <= 104 and set(range(100)) <= inl2
    assert two["inliers"] == int(two["inlier_mask"].sum()) and len(two["inlier_mask"]) == len(two["matches"])
    empty = Features(np.zeros((0, 2), np.float32), np.zeros((0, 40), np.float32), np.zeros(0), np.zeros(0), 1.0)
    assert match_features(empty, fb, MatchConfig())["inliers"] == 0
    with pytest.raises(ValueError):
        MatchConfig(models=0)
