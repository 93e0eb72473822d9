"""DELF through `tensorflow_hub.load`, against a SavedModel written here with DELF's signature.

No machine here reaches tfhub.dev, so the test writes a stand-in module with the real one's
`default` signature: inputs image (H×W×3 float32 in [0, 1]), score_threshold, image_scales,
max_feature_num; outputs locations ((y, x) in input pixels), descriptors (40-D, unit norm),
scales, attention. Its features are local 5×5 patch intensities at the image's corners
(Harris-like response) so that matching two views of one image really finds a geometry.
"""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from tests.verify.test_features import save, textured

pytestmark = pytest.mark.slow  # TensorFlow import + SavedModel write


@pytest.fixture(scope="module")
def fake_delf(tmp_path_factory):
    tf = pytest.importorskip("tensorflow")

    class FakeDelf(tf.Module):
        @tf.function(input_signature=[
            tf.TensorSpec([None, None, 3], tf.float32, name="image"),
            tf.TensorSpec([], tf.float32, name="score_threshold"),
            tf.TensorSpec([None], tf.float32, name="image_scales"),
            tf.TensorSpec([], tf.int32, name="max_feature_num"),
        ])
        def __call__(self, image, score_threshold, image_scales, max_feature_num):
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

    module = FakeDelf()
    path = tmp_path_factory.mktemp("delf") / "delf_module"
    tf.saved_model.save(module, str(path), signatures={"default": module.__call__})
    return path


def test_delf_extractor_uses_the_hub_signature(fake_delf, tmp_path):
    from pipeline.verify.features import make_extractor

    img = textured(128, seed=5)
    ext = make_extractor("delf", handle=str(fake_delf), score_threshold=1.0, max_feature_num=60)
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
    assert make_extractor("delf", handle=str(fake_delf), score_threshold=1e15).extract_array(img).n == 0


def test_delf_matching_and_glr_match(fake_delf, tmp_path):
    from pipeline.cli import cli

    img = textured(128, seed=6)
    a = save(tmp_path / "a.png", img)
    b = save(tmp_path / "b.png", np.ascontiguousarray(np.roll(img, (9, 14), axis=(0, 1))))  # translated view
    c = save(tmp_path / "c.png", textured(128, seed=11))
    runner = CliRunner()
    args = ["--extractor", "delf", "--delf-handle", str(fake_delf), "--json"]
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

    with pytest.raises(UserError, match="DELF module"):
        make_extractor("delf", handle=str(tmp_path / "no_such_module"))
