"""Extractors (SIFT/RootSIFT, ORB) and the on-disk feature cache."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.parallel import stable_shard
from pipeline.verify.cache import FeatureCache, extract_split
from pipeline.verify.features import ExtractorConfig, make_config, make_extractor
from submissions.errors import UserError


def textured(size: int = 128, seed: int = 0) -> np.ndarray:
    """A random blocky texture with blobs: plenty of corners and blobs for SIFT/ORB."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST)
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, tuple(int(v) for v in rng.integers(0, size, 2)), int(rng.integers(3, size // 8)), c, -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def save(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def test_sift_rootsift_descriptors_and_original_pixel_locations(tmp_path):
    import cv2

    small = textured(128)
    big = cv2.resize(small, (256, 256), interpolation=cv2.INTER_CUBIC)
    p = save(tmp_path / "big.png", big)
    ext = make_extractor("sift", max_side=128, n_features=300)
    f = ext.extract_path(p)
    assert 20 <= f.n <= 300
    assert f.descriptors.dtype == np.float32 and f.descriptors.shape == (f.n, 128)
    assert (f.descriptors >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1, atol=1e-4)  # RootSIFT: unit L2
    assert f.work_scale == pytest.approx(0.5)
    # keypoints found on the 128-px working image are reported in the 256-px original's pixels
    assert f.locations.max() > 128 and f.locations.max() <= 256
    direct = make_extractor("sift", max_side=128, n_features=300).extract_array(small)
    d = np.linalg.norm(f.locations[:, None, :] / 2 - direct.locations[None, :, :], axis=2).min(axis=1)
    assert np.mean(d < 1.5) > 0.8  # same keypoints, coordinates ×2
    assert f.scales.shape == f.scores.shape == (f.n,)


def test_orb_is_binary_and_capped(tmp_path):
    f = make_extractor("orb", n_features=50).extract_array(textured(128))
    assert f.descriptors.dtype == np.uint8 and f.descriptors.shape[1] == 32
    assert 5 <= f.n <= 50


def test_blank_image_gives_empty_features():
    f = make_extractor("sift").extract_array(np.full((64, 64, 3), 128, np.uint8))
    assert f.n == 0 and f.descriptors.shape == (0, 128)


def test_config_key_tracks_only_relevant_settings():
    a = make_config("sift")
    assert a.key() == make_config("sift").key()
    assert a.key() != make_config("sift", n_features=500).key()
    assert a.key() != make_config("sift", max_side=300).key()
    assert make_config("orb").key() != a.key()
    # DELF-only options do not change a SIFT key
    assert a.key() == make_config("sift", score_threshold=5.0).key()
    with pytest.raises(UserError, match="unknown extractor"):
        ExtractorConfig(name="surf")


def test_cache_roundtrip_lru_and_damaged_entry(tmp_path):
    cfg = make_config("sift", n_features=200)
    ext = make_extractor(cfg)
    cache = FeatureCache(tmp_path, cfg, "train", memory_items=2)
    feats = {f"id{i}": ext.extract_array(textured(96, seed=i)) for i in range(4)}
    for k, f in feats.items():
        cache.put(k, f)
    assert len(cache._lru) <= 2  # bounded memory
    fresh = FeatureCache(tmp_path, cfg, "train")
    for k, f in feats.items():
        g = fresh.get(k)
        np.testing.assert_array_equal(g.locations, f.locations)
        np.testing.assert_allclose(g.descriptors, f.descriptors, atol=2e-3)  # float16 on disk
        np.testing.assert_array_equal(g.descriptors, FeatureCache.get_stored_form(f).descriptors)
    assert not list(tmp_path.rglob(".*"))  # no temp files left behind
    assert (tmp_path / cfg.key() / "config.json").exists()
    # a damaged entry reads as missing (recomputed), never as garbage
    path = fresh.path("id0")
    path.write_bytes(path.read_bytes()[:100])
    assert FeatureCache(tmp_path, cfg, "train").get("id0") is None
    # another config never sees these entries; nor does the other split
    assert FeatureCache(tmp_path, make_config("sift", n_features=201), "train").get("id1") is None
    assert FeatureCache(tmp_path, cfg, "test").get("id1") is None
    # odd ids map to safe file names
    cache.put("../a b/c", feats["id1"])
    assert cache.path("../a b/c").parent.parent == cache.root
    assert FeatureCache(tmp_path, cfg, "train").get("../a b/c") is not None


def _hammer(args):
    root, seed = args
    cfg = make_config("sift", n_features=200)
    cache = FeatureCache(root, cfg, "train", memory_items=0)
    f = make_extractor(cfg).extract_array(textured(96, seed=seed))
    for _ in range(30):
        cache.put("same", f)
    return f.n


def test_concurrent_writers_never_expose_partial_entries(tmp_path):
    cfg = make_config("sift", n_features=200)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        res = pool.map_async(_hammer, [(str(tmp_path), 1), (str(tmp_path), 2)])
        reader = FeatureCache(tmp_path, cfg, "train", memory_items=0)
        seen = 0
        while not res.ready():
            path = reader.path("same")
            if path.exists():
                g = reader.get("same")
                # a reader sees a whole entry from one writer or the other, never a torn one
                assert g is not None and g.n in (_n(1), _n(2))
                seen += 1
        res.get()
    assert reader.get("same").n in (_n(1), _n(2))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def _n(seed):
    return make_extractor(make_config("sift", n_features=200)).extract_array(textured(96, seed=seed)).n


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_extract_split_fills_cache_per_shard_and_skips_bad_images(tmp_path):
    comp = tmp_path / "comp"
    ids = [f"{i:x}abc{i}" for i in range(6)]
    for i, x in enumerate(ids):
        save(comp / "test" / x[0] / x[1] / x[2] / f"{x}.jpg", textured(64, seed=i))
    (comp / "test" / ids[5][0] / ids[5][1] / ids[5][2] / f"{ids[5]}.jpg").write_bytes(b"not a jpeg")
    (comp / "train.csv").write_text("id,landmark_id\n")
    (comp / "sample_submission.csv").write_text("id,landmarks\n" + "".join(f"{x},\n" for x in ids))
    cache = tmp_path / "cache"
    shard0 = {x for x in ids if stable_shard(x, 2) == 0}
    with pytest.warns(UserWarning) as rec:
        r0 = extract_split(comp, "test", extractor="sift", shard="0/2", cache_dir=cache)
        r1 = extract_split(comp, "test", extractor="sift", shard="1/2", cache_dir=cache)
    assert r0["images"] == len(shard0) and r0["images"] + r1["images"] == 6
    assert r0["unreadable"] + r1["unreadable"] == 1
    assert any(ids[5] in str(w.message) for w in rec)
    fc = FeatureCache(cache, make_config("sift"), "test")
    assert all(fc.get(x) is not None for x in ids[:5]) and fc.get(ids[5]) is None
    with pytest.warns(UserWarning, match=ids[5]):
        again = extract_split(comp, "test", extractor="sift", cache_dir=cache)  # resumes: nothing new
    assert again["already_cached"] == 5 and again["extracted"] == 0
    # default cache folder lives in the data dir
    with pytest.warns(UserWarning, match=ids[5]) if stable_shard(ids[5], 2) == 0 else _nothing():
        extract_split(comp, "test", extractor="orb", shard="0/2")
    assert (comp / ".glr-features").is_dir()
