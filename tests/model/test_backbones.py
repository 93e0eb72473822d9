"""Backbone registry, heads, weights loading and precision (TensorFlow: slow)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from submissions.errors import UserError


@pytest.fixture(autouse=True)
def _fp32_policy():
    """Each test starts (and ends) with Keras' default float32 policy."""
    from pipeline.model.backbones import set_precision

    set_precision("fp32")
    yield
    set_precision("fp32")


@pytest.mark.slow
@pytest.mark.parametrize("backbone,emb_dim", [("vgg16", 256), ("vgg19", 1024), ("resnet50", 2048)])
def test_build_each_backbone_with_its_head(backbone, emb_dim):
    from pipeline.model import backbones as M

    model = M.build_model(backbone, 3, image_size=32, weights="none")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    p = np.asarray(model(x, training=False))
    assert p.shape == (2, 3)
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert int(model.get_layer("embedding").output.shape[-1]) == emb_dim
    assert model.get_layer("predictions").activation.__name__ == "softmax"
    assert not M.find_base(model).trainable  # frozen until fine-tuning
    head = M.build_head(backbone, 3, M.feature_shape(model))
    M.copy_head(head, model)
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[0],
                                  head.get_layer("predictions").get_weights()[0])


@pytest.mark.slow
def test_224_input_and_bf16_output_stays_float32():
    from pipeline.model import backbones as M

    M.set_precision("bf16")
    model = M.build_model("vgg16", 5, image_size=224, weights="none")
    assert tuple(model.input.shape[1:]) == (224, 224, 3)
    assert M.feature_shape(model) == (7, 7, 512)
    assert model.get_layer("embedding").dtype_policy.name == "mixed_bfloat16"
    assert model.output.dtype == "float32"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Skipping nested container")  # the deliberate vgg16-into-resnet50 mismatch
def test_weights_from_a_file_and_errors(tmp_path):
    from pipeline.model import backbones as M

    base = M.build_base("vgg16", 32, weights="none")
    path = tmp_path / "vgg16.weights.h5"
    base.save_weights(path)
    loaded = M.build_base("vgg16", 32, weights=str(path))
    for a, b in zip(base.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="cannot load into the resnet50 base"):
        M.build_base("resnet50", 32, weights=str(path))
    with pytest.raises(UserError, match="no such file"):
        M.build_base("vgg16", 32, weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(UserError, match="choose one of vgg16, vgg19, resnet50"):
        M.build_base("alexnet", 32, weights="none")
    with pytest.raises(UserError, match="at least 32"):
        M.build_base("vgg16", 16, weights="none")


@pytest.mark.slow
def test_imagenet_offline_is_a_clear_user_error(tmp_path, monkeypatch):
    """The real keras.applications download path runs; offline it becomes one clear line."""
    from pipeline.model import backbones as M

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached weights
    try:
        M.build_base("vgg16", 32, weights="imagenet")
    except UserError as e:
        assert "--weights none" in str(e) and "vgg16" in str(e)
    else:
        pytest.skip("ImageNet weights were reachable (online machine)")


@pytest.mark.slow
def test_unfreeze_top_layers():
    from pipeline.model import backbones as M

    model = M.build_model("resnet50", 3, image_size=32, weights="none")
    n = M.unfreeze_top(model, 4)
    base = M.find_base(model)
    trainable = [l.name for l in base.layers if l.trainable and l.weights]
    assert n == len(trainable) and 1 <= n <= 4
    assert all("bn" not in name for name in trainable)  # BatchNorm stays frozen (trainable = False)
    assert base.layers[1].trainable is False or not base.layers[1].weights


def test_precision_resolution(monkeypatch):
    from pipeline.model import backbones as M

    assert M.resolve_precision("fp32") == "fp32"
    assert M.resolve_precision("bf16") == "bf16"
    with pytest.raises(UserError, match="--precision"):
        M.resolve_precision("int8")
    monkeypatch.setattr(M, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert M.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(M, "cpu_flags", lambda: {"avx2"})
    assert M.resolve_precision("auto") == "fp32"


def test_select_rows_and_stratified_split():
    from pipeline.model.data import select_rows, stratified_split

    train = pd.DataFrame({"id": [f"i{i:03d}" for i in range(60)],
                          "landmark_id": [1] * 40 + [2] * 15 + [3] * 4 + [4] * 1})
    rows = select_rows(train, max_per_class=10, min_per_class=2, seed=0)
    assert rows["landmark_id"].value_counts().to_dict() == {1: 10, 2: 10, 3: 4}
    assert rows.equals(select_rows(train, max_per_class=10, min_per_class=2, seed=0))  # seeded
    split = stratified_split(rows, val_frac=0.2, seed=0)
    val = split[split["split"] == "val"]["landmark_id"].value_counts().to_dict()
    assert val == {1: 2, 2: 2, 3: 1}
    one = stratified_split(pd.DataFrame({"id": ["a", "b"], "landmark_id": [1, 2]}), val_frac=0.5)
    assert (one["split"] == "train").all()  # a class of one image keeps it for training
    with pytest.raises(UserError, match="min-per-class"):
        select_rows(train, min_per_class=50)


def _bn_state(base) -> dict:
    import keras

    return {(l.name, w.path): np.array(w) for l in base.layers if isinstance(l, keras.layers.BatchNormalization)
            for w in l.weights}


@pytest.mark.slow
def test_fine_tuning_leaves_batchnorm_unchanged():
    """A ResNet50 fine-tune epoch (top layers unfrozen, fit passes training=True down) changes the
    unfrozen convolutions but no BatchNormalization moving mean/variance, gamma or beta; a BN layer
    made trainable would move (the check can fail)."""
    import keras

    from pipeline.model import backbones as M

    keras.utils.set_random_seed(0)
    model = M.build_model("resnet50", 3, image_size=32, weights="none")
    base = M.find_base(model)
    assert M.unfreeze_top(model, 6) >= 1
    bn = [l for l in base.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bn and not any(l.trainable for l in bn)
    convs = [l for l in base.layers if l.trainable and l.weights]
    before, conv_before = _bn_state(base), [np.array(l.weights[0]) for l in convs]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 3, 16)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = _bn_state(base)
    assert before.keys() == after.keys() and len(before) == 4 * len(bn)  # gamma, beta, moving mean/variance
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=str(k))
    assert any(not np.array_equal(a, np.array(l.weights[0])) for a, l in zip(conv_before, convs))
    # the control: a trainable BN layer in the same fit does update its moving statistics
    top_bn = bn[-1]
    top_bn.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    mean = np.array(top_bn.moving_mean)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(mean, np.array(top_bn.moving_mean))


def test_tf_config_is_refused_with_the_upstream_issue(monkeypatch):
    from pipeline.model import backbones as M

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["h1:1", "h2:1"]}, "task": {"type": "worker", '
                       '"index": 0}}')
    with pytest.raises(UserError, match=r"keras-team/keras/issues/20585.*MirroredStrategy"):
        M.get_strategy()
    monkeypatch.delenv("TF_CONFIG")
    M.check_single_machine()  # no TF_CONFIG: nothing to refuse
