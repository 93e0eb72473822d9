"""Extractors (SIFT/RootSIFT, ORB) and the on-disk feature cache."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
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
    ext = make_extractor("sift", max_side=128, n_features=300, pca_dims=0)
    f = ext.extract_path(p)
    assert 20 <= f.n <= 300
    assert f.descriptors.dtype == np.float32 and f.descriptors.shape == (f.n, 128)
    assert (f.descriptors >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1, atol=1e-4)  # RootSIFT: unit L2
    # the default: the same keypoints, RootSIFT projected to 64 signed unit dims
    g = make_extractor("sift", max_side=128, n_features=300).extract_path(p)
    np.testing.assert_array_equal(g.locations, f.locations)
    assert g.descriptors.shape == (f.n, 64) and (g.descriptors < 0).any()
    np.testing.assert_allclose(np.linalg.norm(g.descriptors, axis=1), 1, atol=1e-4)
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
    assert f.n == 0 and f.descriptors.shape == (0, 64)
    f = make_extractor("sift", pca_dims=0).extract_array(np.full((64, 64, 3), 128, np.uint8))
    assert f.n == 0 and f.descriptors.shape == (0, 128)


def test_config_key_tracks_only_relevant_settings():
    a = make_config("sift")
    assert a.key() == make_config("sift").key()
    assert a.key() != make_config("sift", n_features=500).key()
    assert a.key() != make_config("sift", max_side=300).key()
    assert a.key() != make_config("sift", pca_dims=0).key() != make_config("sift", pca_dims=0, contrast_threshold=0.04).key()
    assert make_config("orb").key() != a.key()
    # DELF-only options do not change a SIFT key
    assert a.key() == make_config("sift", score_threshold=5.0).key()
    with pytest.raises(UserError, match="unknown extractor"):
        ExtractorConfig(name="surf")


def test_cache_roundtrip_quantised_bounded_and_damaged_entry(tmp_path):
    cfg = make_config("sift", n_features=200)
    ext = make_extractor(cfg)
    feats = {f"k{i:02d}": ext.extract_array(textured(96, seed=i)) for i in range(4)}
    one = next(iter(feats.values()))
    entry = one.locations.nbytes + one.descriptors.nbytes
    cache = FeatureCache(tmp_path, cfg, memory_mb=2.5 * entry / 2**20)
    for k, f in feats.items():
        cache.put(k, f)
        cache.get(k)
    assert len(cache._lru) == 2 and cache._held <= cache.memory_bytes  # memory bounded in bytes
    fresh = FeatureCache(tmp_path, cfg)
    for k, f in feats.items():
        g = fresh.get(k)
        assert g.n == f.n and g.work_scale == f.work_scale
        np.testing.assert_allclose(g.locations, f.locations, atol=0.01)  # uint16 fixed point
        np.testing.assert_allclose(g.descriptors, f.descriptors, atol=6e-3)  # int8 at 1/127, renormalised
        np.testing.assert_allclose(np.linalg.norm(g.descriptors, axis=1), 1, atol=1e-5)
        np.testing.assert_array_equal(g.descriptors, FeatureCache.get_stored_form(f).descriptors)
        assert np.isnan(g.scales).all() and g.scales.shape == (f.n,)  # not kept: matching does not use them
        assert fresh.path(k).stat().st_size < f.n * 132 + 64  # ≤ 4 bytes a location + 1 a component
    assert not list(tmp_path.rglob(".*"))  # no temp files left behind
    assert json.loads((tmp_path / cfg.key() / "config.json").read_text())["n_features"] == 200
    # a damaged entry reads as missing and is deleted (the next run recomputes it), never read as garbage
    path = fresh.path("k00")
    path.write_bytes(path.read_bytes()[:100])
    assert FeatureCache(tmp_path, cfg).get("k00") is None and not path.exists()
    # another config never sees these entries
    assert FeatureCache(tmp_path, make_config("sift", n_features=201)).get("k01") is None


@pytest.mark.parametrize("name", ["sift", "sift-pca", "orb", "delf"])
def test_entry_codecs_keep_what_matching_uses(name):
    from pipeline.verify.cache import decode, encode, _CODEC
    from pipeline.verify.features import Features

    rng = np.random.default_rng(0)
    n = 300
    loc = rng.uniform(-3, 3999, (n, 2)).astype(np.float32)
    if name == "orb":
        desc = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    else:
        dim = {"sift": 128, "sift-pca": 64, "delf": 40}[name]
        desc = rng.random((n, dim)).astype(np.float32) if name == "sift" else rng.normal(size=(n, dim)).astype(np.float32)
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    f = Features(loc, desc, np.ones(n, np.float32), np.ones(n, np.float32), 0.25)
    g = decode(encode(f, _CODEC.get(name)))
    assert decode(encode(f)).descriptors.tobytes() == g.descriptors.tobytes()  # the codec the descriptors need
    np.testing.assert_allclose(g.locations, loc, atol=0.04)  # ≤ extent/131070 on a 4,000-px photo
    if name == "orb":
        np.testing.assert_array_equal(g.descriptors, desc)  # binary: as it is
    else:
        assert g.descriptors.dtype == np.float32
        np.testing.assert_allclose(g.descriptors, desc, atol=0.0015 if name == "sift" else 0.006)
        np.testing.assert_allclose(np.linalg.norm(g.descriptors, axis=1), 1, atol=1e-5)
    empty = decode(encode(Features(np.zeros((0, 2), np.float32), desc[:0], np.zeros(0), np.zeros(0), 1.0),
                          _CODEC.get(name)))
    assert empty.n == 0 and empty.descriptors.shape == (0, desc.shape[1])


def test_entries_are_keyed_by_the_image_file(tmp_path):
    """A hard link or symlink to an image (the local-validation folder's) shares its entry; a changed
    image is a new entry, so its features are extracted again."""
    from pipeline.verify.cache import extract_images

    cfg = make_config("sift", n_features=100)
    a = save(tmp_path / "comp" / "a.jpg", textured(64, seed=1))
    (tmp_path / "val").mkdir()
    os.link(a, tmp_path / "val" / "a.jpg")
    (tmp_path / "sym").mkdir()
    os.symlink(a, tmp_path / "sym" / "a.jpg")  # links keep the image's name (pipeline.run.localval)
    folder = tmp_path / "cache"
    keys, errors, counts = extract_images(folder, cfg, {"a": a})
    assert counts == {"extracted": 1, "already_cached": 0} and not errors
    keys2, _, counts2 = extract_images(folder, cfg, {"a": tmp_path / "val" / "a.jpg"})
    assert counts2 == {"extracted": 0, "already_cached": 1} and keys2 == keys
    keys3, _, counts3 = extract_images(folder, cfg, {"a": tmp_path / "sym" / "a.jpg"})
    assert counts3["extracted"] == 0 and keys3 == keys
    before = FeatureCache(folder, cfg).get(keys["a"])
    save(a, textured(64, seed=2))  # the image changes on disk (in place: every link sees it)
    keys4, _, counts4 = extract_images(folder, cfg, {"a": a})
    assert counts4["extracted"] == 1 and keys4["a"] != keys["a"]
    after = FeatureCache(folder, cfg).get(keys4["a"])
    assert after.n != before.n or not np.array_equal(after.locations, before.locations)


def _hammer(args):
    root, seed = args
    cfg = make_config("sift", n_features=200)
    cache = FeatureCache(root, cfg, memory_mb=0)
    f = make_extractor(cfg).extract_array(textured(96, seed=seed))
    for _ in range(30):
        cache.put("same", f)
    return f.n


def test_concurrent_writers_never_expose_partial_entries(tmp_path):
    cfg = make_config("sift", n_features=200)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        res = pool.map_async(_hammer, [(str(tmp_path), 1), (str(tmp_path), 2)])
        reader = FeatureCache(tmp_path, cfg, memory_mb=0)
        while not res.ready():
            if reader.has("same"):
                g = reader.get("same")
                # a reader sees a whole entry from one writer or the other, never a torn one
                assert g is not None and g.n in (_n(1), _n(2))
        res.get()
    assert reader.get("same").n in (_n(1), _n(2))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def _n(seed):
    return make_extractor(make_config("sift", n_features=200)).extract_array(textured(96, seed=seed)).n


def test_extract_split_fills_cache_per_shard_and_skips_bad_images(tmp_path, capfd):
    from pipeline.verify.cache import image_keys

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
    assert r0["unreadable"] + r1["unreadable"] == 1 and r0["extracted"] + r1["extracted"] == 5
    assert any(ids[5] in str(w.message) for w in rec)
    # one line before extracting: how many images and how many bytes at most
    err = capfd.readouterr().err
    assert "local features (sift)" in err and f"adding {len(shard0)}" in err and "KB each" in err
    fc = FeatureCache(cache / "features", make_config("sift"))
    keys = image_keys(comp / "test" / x[0] / x[1] / x[2] / f"{x}.jpg" for x in ids)
    assert all(fc.get(k) is not None for k in keys[:5]) and fc.get(keys[5]) is None
    with pytest.warns(UserWarning, match=ids[5]):
        again = extract_split(comp, "test", extractor="sift", cache_dir=cache)  # resumes: nothing new
    assert again["already_cached"] == 5 and again["extracted"] == 0
    # the default cache folder: DATA_DIR/.glr-cache/features
    with pytest.warns(UserWarning, match=ids[5]) if stable_shard(ids[5], 2) == 0 else _nothing():
        extract_split(comp, "test", extractor="orb", shard="0/2")
    assert (comp / ".glr-cache" / "features" / make_config("orb").key() / "config.json").is_file()


def _nothing():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.slow
def test_projection_refits_to_the_shipped_axes():
    """fit_rootsift_pca on skimage's bundled photos gives back the stored mean and leading axes (same signs)."""
    from pipeline.verify.projection import _stored, fit_rootsift_pca

    mean, basis, _ = _stored()
    refit_mean, refit = fit_rootsift_pca(8)
    np.testing.assert_allclose(refit, basis[:, :8], atol=0.02)
    np.testing.assert_allclose(refit_mean, mean, atol=2e-3)


def test_projection_is_orthonormal_and_keeps_neighbours():
    """The stored basis is orthonormal (float16); projected RootSIFT of a warped copy still finds its own
    keypoints as nearest neighbours."""
    import cv2

    from pipeline.verify.projection import _stored, basis_digest, project

    _, basis, digest = _stored()
    assert basis.shape == (128, 64) and digest == basis_digest()
    np.testing.assert_allclose(basis.T @ basis, np.eye(64), atol=2e-3)
    img = textured(192, seed=4)
    warped = cv2.warpAffine(img, np.float32([[0.95, 0.08, 6], [-0.06, 1.0, 4]]), (192, 192),
                            borderMode=cv2.BORDER_REFLECT)
    full = make_extractor("sift", pca_dims=0, n_features=300)
    fa, fb = full.extract_array(img), full.extract_array(warped)
    pa, pb = project(fa.descriptors, 64), project(fb.descriptors, 64)
    np.testing.assert_allclose(np.linalg.norm(pa, axis=1), 1, atol=1e-5)
    nn_full = (fa.descriptors @ fb.descriptors.T).argmax(axis=1)
    nn_proj = (pa @ pb.T).argmax(axis=1)
    assert np.mean(nn_full == nn_proj) > 0.85  # 64 dims keep (nearly) the same nearest neighbours
    with pytest.raises(ValueError):
        project(fa.descriptors, 65)
