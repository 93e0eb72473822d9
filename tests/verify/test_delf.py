"""DELF through `tensorflow_hub.load`, against a SavedModel written here with DELF's signature.

No machine here reaches tfhub.dev, so the test writes a stand-in module with the real one's
`default` signature: inputs image (H×W×3 float32 in [0, 1]), score_threshold, image_scales,
max_feature_num; outputs locations ((y, x) in input pixels), descriptors (40-D, unit norm),
scales, attention. Its features are local 5×5 patch intensities at the image's corners
(Harris-like response) so that matching two views of one image really finds a geometry.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.verify.test_features import save, textured

pytestmark = pytest.mark.slow  # TensorFlow import + SavedModel write


def delf_outputs(tf, image, score_threshold, image_scales, max_feature_num) -> dict:
    """The stand-in's computation (TF ops that run eagerly in a tf.function and in a TF1 graph alike)."""
    gray = tf.reduce_mean(image, axis=-1)[None, :, :, None]
    gx = gray[:, :, 1:, :] - gray[:, :, :-1, :]
    gy = gray[:, 1:, :, :] - gray[:, :-1, :, :]
    gx, gy = gx[:, :-1, :, :], gy[:, :, :-1, :]
    k = tf.ones([5, 5, 1, 1]) / 25.0
    sxx = tf.nn.conv2d(gx * gx, k, 1, "SAME")
    syy = tf.nn.conv2d(gy * gy, k, 1, "SAME")
    sxy = tf.nn.conv2d(gx * gy, k, 1, "SAME")
    resp = (sxx * syy - sxy * sxy - 0.05 * (sxx + syy) ** 2)[0, :, :, 0] * 1e8
    peak = tf.nn.max_pool2d(resp[None, :, :, None], 7, 1, "SAME")[0, :, :, 0]
    h, w = tf.shape(resp)[0], tf.shape(resp)[1]
    ys, xs = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
    border = (ys >= 6) & (xs >= 6) & (ys < h - 6) & (xs < w - 6)
    keep = (resp >= peak) & (resp > score_threshold) & border
    idx = tf.where(keep)
    score = tf.gather_nd(resp, idx)
    top = tf.math.top_k(score, k=tf.minimum(max_feature_num, tf.shape(score)[0]))
    idx = tf.gather(idx, top.indices)
    offs = tf.stack(tf.meshgrid(tf.range(-4, 5, 2), tf.range(-4, 5, 2), indexing="ij"), -1)
    offs = tf.cast(tf.reshape(offs, [-1, 2]), tf.int64)  # 25 offsets
    pts = idx[:, None, :] + offs[None, :, :]
    g = tf.gather_nd(gray[0, :, :, 0], pts)  # N×25
    desc = tf.concat([g, g[:, :15] * g[:, 10:]], axis=1)  # 40-D
    desc = desc - tf.reduce_mean(desc, axis=1, keepdims=True)
    desc = tf.math.l2_normalize(desc, axis=1)
    n = tf.shape(idx)[0]
    return {
        "locations": tf.cast(idx, tf.float32),  # (y, x), as DELF
        "descriptors": desc,
        "scales": tf.ones([n]) * image_scales[tf.size(image_scales) // 2],
        "attention": top.values,
    }


@pytest.fixture(scope="module")
def fake_delf(tmp_path_factory):
    """TF2 SavedModel with DELF's `default` signature."""
    tf = pytest.importorskip("tensorflow")

    class FakeDelf(tf.Module):
        @tf.function(input_signature=[
            tf.TensorSpec([None, None, 3], tf.float32, name="image"),
            tf.TensorSpec([], tf.float32, name="score_threshold"),
            tf.TensorSpec([None], tf.float32, name="image_scales"),
            tf.TensorSpec([], tf.int32, name="max_feature_num"),
        ])
        def __call__(self, image, score_threshold, image_scales, max_feature_num):
            return delf_outputs(tf, image, score_threshold, image_scales, max_feature_num)

    module = FakeDelf()
    path = tmp_path_factory.mktemp("delf") / "delf_module"
    tf.saved_model.save(module, str(path), signatures={"default": module.__call__})
    return path


@pytest.fixture(scope="module")
def fake_delf_tf1(tmp_path_factory):
    """A module in the TF1 Hub format, as https://tfhub.dev/google/delf/1 is: a TF1 graph saved by
    `tf.compat.v1.saved_model.Builder` under the empty tag set with signature `default` (what
    `hub.Module.export` wrote; tensorflow_hub 0.16 no longer has `create_module_spec`, so the graph is
    built with tf.compat.v1 directly), one variable, and `tfhub_module.pb` (a ModuleDef with
    format = FORMAT_V3, the bytes 08 03), which makes `hub.load` treat the folder as a TF1 Hub module."""
    tf = pytest.importorskip("tensorflow")
    v1 = tf.compat.v1
    path = tmp_path_factory.mktemp("delf1") / "delf_tf1_module"
    with tf.Graph().as_default():
        inputs = {
            "image": v1.placeholder(tf.float32, [None, None, 3], name="image"),
            "score_threshold": v1.placeholder(tf.float32, [], name="score_threshold"),
            "image_scales": v1.placeholder(tf.float32, [None], name="image_scales"),
            "max_feature_num": v1.placeholder(tf.int32, [], name="max_feature_num"),
        }
        gain = v1.get_variable("gain", initializer=tf.constant(1.0))  # a variable, restored by hub.load
        outputs = delf_outputs(tf, inputs["image"] * gain, inputs["score_threshold"], inputs["image_scales"],
                               inputs["max_feature_num"])
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(path))
            sig = v1.saved_model.signature_def_utils.predict_signature_def(inputs=inputs, outputs=outputs)
            builder.add_meta_graph_and_variables(sess, tags=[], signature_def_map={"default": sig})
            builder.save()
    (path / "tfhub_module.pb").write_bytes(b"\x08\x03")
    return path


@pytest.fixture(scope="module")
def delf_repo_model(tmp_path_factory):
    """A SavedModel shaped like the DELF repository's export (delf/python/training/model/export_local_model.py):
    `serving_default` taking input_image (uint8), input_scales, input_max_feature_num, input_abs_thres and
    returning boxes/features/scales/scores; no `default` signature."""
    tf = pytest.importorskip("tensorflow")

    class Exported(tf.Module):
        @tf.function(input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8, name="input_image"),
            tf.TensorSpec([None], tf.float32, name="input_scales"),
            tf.TensorSpec([], tf.int32, name="input_max_feature_num"),
            tf.TensorSpec([], tf.float32, name="input_abs_thres"),
        ])
        def ExtractFeatures(self, input_image, input_scales, input_max_feature_num, input_abs_thres):  # noqa: N802
            n = tf.minimum(input_max_feature_num, 3)
            return {"boxes": tf.zeros([n, 4]), "features": tf.zeros([n, 40]), "scales": tf.zeros([n]),
                    "scores": tf.zeros([n]) + input_abs_thres}

    module = Exported()
    path = tmp_path_factory.mktemp("delfrepo") / "delf_repo_export"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.ExtractFeatures})
    return path


@pytest.fixture(params=["tf2", "tf1_hub"])
def delf_module(request):
    """Both stand-ins: a TF2 SavedModel and a TF1 Hub format module (the real google/delf/1's format)."""
    return request.getfixturevalue("fake_delf" if request.param == "tf2" else "fake_delf_tf1")


def test_tf1_hub_stand_in_is_loaded_as_a_tf1_hub_module(fake_delf_tf1):
    import tensorflow_hub as hub

    module = hub.load(str(fake_delf_tf1))
    assert module._is_hub_module_v1  # hub.load took the tfhub_module.pb path (empty tag set)
    fn = module.signatures["default"]
    assert sorted(fn.structured_input_signature[1]) == ["image", "image_scales", "max_feature_num",
                                                         "score_threshold"]


def test_delf_extractor_uses_the_hub_signature(delf_module, tmp_path):
    from pipeline.verify.features import make_extractor

    img = textured(128, seed=5)
    ext = make_extractor("delf", handle=str(delf_module), score_threshold=1.0, max_feature_num=60)
    f = ext.extract_array(img)
    assert 10 <= f.n <= 60  # max_feature_num reached the module
    assert f.descriptors.shape == (f.n, 40) and f.descriptors.dtype == np.float32
    assert f.scales.shape == f.scores.shape == (f.n,)
    assert (np.diff(f.scores) <= 0).all()  # attention passed through
    # (y, x) from DELF become (x, y): a feature on a wide image's right half has x > height
    wide = np.concatenate([np.full((128, 128, 3), 128, np.uint8), img], axis=1)
    fw = ext.extract_array(wide)
    assert fw.n > 0 and fw.locations[:, 0].min() >= 128 - 6 and fw.locations[:, 1].max() < 128
    # a higher threshold gives fewer features
    assert make_extractor("delf", handle=str(delf_module), score_threshold=1e15).extract_array(img).n == 0


def test_delf_matching_and_glr_match(delf_module, tmp_path):
    from pipeline.cli import cli

    img = textured(128, seed=6)
    a = save(tmp_path / "a.png", img)
    b = save(tmp_path / "b.png", np.ascontiguousarray(np.roll(img, (9, 14), axis=(0, 1))))  # translated view
    c = save(tmp_path / "c.png", textured(128, seed=11))
    runner = CliRunner()
    args = ["--extractor", "delf", "--delf-handle", str(delf_module), "--json"]
    r = runner.invoke(cli, ["match", str(a), str(b), *args])
    assert r.exit_code == 0, r.output
    import json

    same = json.loads(r.output)
    other = json.loads(runner.invoke(cli, ["match", str(a), str(c), *args]).output)
    assert same["extractor"] == "delf" and same["inliers"] >= 15, (same, other)
    assert other["inliers"] < same["inliers"] / 2


def test_unloadable_handle_is_a_user_error(tmp_path):
    from pipeline.verify.features import make_extractor
    from submissions.errors import UserError

    with pytest.raises(UserError, match="DELF module") as e:
        make_extractor("delf", handle=str(tmp_path / "no_such_module"))
    assert "\n" not in str(e.value) and "hub.resolve" in str(e.value) and "TFHUB_CACHE_DIR" in str(e.value)


def test_delf_repository_export_gives_the_format_message(delf_repo_model):
    """A SavedModel exported by the DELF repository loads with hub.load but has no `default` signature: the
    message names what the folder has, the format needed and how to get a local copy (no raw KeyError)."""
    from pipeline.verify.features import make_extractor
    from submissions.errors import UserError

    with pytest.raises(UserError) as e:
        make_extractor("delf", handle=str(delf_repo_model))
    msg = str(e.value)
    assert "not a DELF module in TF-Hub format" in msg and "serving_default(" in msg and "input_abs_thres" in msg
    for needed in ("google/delf/1", "tfhub_module.pb", "'default'", "score_threshold", "max_feature_num",
                   "TFHUB_CACHE_DIR", "hub.resolve", "--delf-handle"):
        assert needed in msg, needed
    assert "\n" not in msg


def _glr() -> str:
    return str(Path(sys.executable).with_name("glr"))


@pytest.mark.parametrize("kind", ["missing", "not_a_module", "delf_repository"])
def test_bad_delf_handle_stops_glr_verify_with_one_line_and_writes_nothing(kind, synth_comp, tmp_path, request):
    """Before: the extractor was built inside the per-image `except Exception`, so every image became
    "unreadable", glr verify exited 0 with all-zero inliers, and a later run reused the zeros."""
    from submissions.tables import write_predictions
    from tests.verify.test_inliers import _preds

    if kind == "missing":
        handle = tmp_path / "no_such_module"
    elif kind == "not_a_module":
        handle = tmp_path / "not_a_module"
        handle.mkdir()
        (handle / "README.txt").write_text("not a SavedModel")
    else:
        handle = request.getfixturevalue("delf_repo_model")
    write_predictions(_preds(synth_comp), tmp_path / "preds.parquet")
    out, cache = tmp_path / "inliers.parquet", tmp_path / "cache"
    r = subprocess.run([_glr(), "verify", str(tmp_path / "preds.parquet"), "--data-dir", str(synth_comp),
                        "--out", str(out), "--extractor", "delf", "--delf-handle", str(handle),
                        "--cache-dir", str(cache), "--candidates", "2", "--k", "1"],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(handle) in lines[0], lines
    assert "google/delf/1" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".inliers.parquet*"))  # no table, no parts
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]  # no cache entries


def test_blocked_pkg_resources_gives_the_setuptools_line():
    """tensorflow-hub 0.16.1 imports pkg_resources, gone from setuptools >= 82 (tensorflow/hub#934)."""
    code = ("import sys; sys.modules['pkg_resources'] = None\n"
            "from submissions.errors import UserError\n"
            "from pipeline.verify.features import make_extractor\n"
            "try:\n    make_extractor('delf', handle='/nonexistent')\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
    got = [ln for ln in r.stdout.splitlines() if ln.startswith("USERERROR")]
    assert got and "tensorflow-hub needs pkg_resources: pip install 'setuptools<82'" in got[0], r.stdout + r.stderr


def test_installed_distribution_bounds_setuptools(tmp_path):
    """The installed glr (not the checkout's stale egg-info: run from elsewhere) requires setuptools<82."""
    code = "import importlib.metadata as m; print('\\n'.join(m.requires('glr')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    reqs = [x.replace(" ", "") for x in r.stdout.splitlines()]
    assert "setuptools<82" in reqs and "threadpoolctl" in reqs, r.stdout + r.stderr
    cfg = (Path(__file__).resolve().parents[2] / "setup.cfg").read_text()
    assert "setuptools<82" in cfg and "tensorflow/hub#934" in cfg  # the bound says why


def test_delf_verify_with_two_workers_matches_serial(fake_delf_tf1, synth_comp, tmp_path):
    """DELF in spawned workers (one TensorFlow thread each) gives the serial run's counts; threshold 20 px."""
    from pipeline.verify.inliers import table_settings, verify
    from tests.verify.test_inliers import _preds

    preds = _preds(synth_comp, n=1)
    kw = dict(extractor="delf", delf_handle=str(fake_delf_tf1), candidates=1, k=1, chunk_size=4)
    one = verify(preds, synth_comp, tmp_path / "one.parquet", cache_dir=tmp_path / "c1", workers=1, **kw).table
    two = verify(preds, synth_comp, tmp_path / "two.parquet", cache_dir=tmp_path / "c2", workers=2, **kw).table
    import pandas as pd

    pd.testing.assert_frame_equal(one, two)
    assert one["inliers"].max() > 0
    assert table_settings(tmp_path / "one.parquet")["settings"]["match"]["threshold"] == 20.0
