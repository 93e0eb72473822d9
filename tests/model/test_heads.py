"""Metric-learning heads: ArcFace and GeM against numpy, and `glr train --head arcface --pooling gem`
end to end (save, reload, predict, learn, resume)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from submissions.errors import UserError

TINY = dict(backbone="vgg16", weights="none", image_size=32, batch_size=8, precision="fp32", seed=0)
ARC = dict(head="arcface", pooling="gem", embedding_dim=16, arcface_subcentres=2)


def _layers():
    from pipeline.model.heads import register

    return register()


def _np_cos(x, w, n, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=0, keepdims=True)
    return np.clip((x @ w).reshape(len(x), n, k).max(axis=2), -1, 1)


def _np_arcface_loss(cos, y, m, s):
    """The reference: cos(θ+m) on the true class only (θ = arccos), insightface's fallback past π − m."""
    logits = cos.astype(np.float64).copy()
    for i, c in enumerate(y):
        t = cos[i, c]
        theta = math.acos(float(np.clip(t, -1, 1)))
        logits[i, c] = math.cos(theta + m) if t > math.cos(math.pi - m) else t - math.sin(math.pi - m) * m
    logits *= s
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logits, -logp[np.arange(len(y)), y]


@pytest.mark.parametrize("k", [1, 3])
def test_arcface_layer_cosines_margin_scale_and_subcentres_match_numpy(k):
    import keras

    from pipeline.model.heads import margin_logits

    L = _layers()
    rng = np.random.default_rng(0)
    n, d = 5, 8
    x = rng.normal(size=(6, d)).astype(np.float32)
    arc = L["ArcFace"](n, k, 20.0)
    arc.build((None, d))
    w = rng.normal(size=(d, n * k)).astype(np.float32)
    arc.centres.assign(w)
    cos = keras.ops.convert_to_numpy(arc(x))
    want = _np_cos(x, w, n, k)
    np.testing.assert_allclose(cos, want, atol=1e-5)
    if k > 1:  # the max over sub-centres, not e.g. their mean
        assert not np.allclose(want, _np_cos(x, w.reshape(d, n, k).mean(2), n, 1), atol=1e-3)

    y = np.array([0, 1, 2, 3, 4, 0])
    cos[5, 0] = -0.99  # past π − m: the fallback branch
    m, s = 0.3, 20.0
    logits = keras.ops.convert_to_numpy(margin_logits(keras.ops, y, cos, m, s))
    ref_logits, ref_loss = _np_arcface_loss(cos, y, m, s)
    np.testing.assert_allclose(logits - logits.max(1, keepdims=True), ref_logits, atol=1e-4)
    off = np.ones_like(cos, bool)
    off[np.arange(len(y)), y] = False
    np.testing.assert_allclose(logits[off], s * cos[off], atol=1e-5)  # other classes: no margin, only the scale
    assert (logits[~off] < s * cos[~off]).all()  # the margin lowers the true class's logit
    loss = L["ArcFaceLoss"](m, s)
    assert float(loss(y, cos)) == pytest.approx(ref_loss.mean(), rel=1e-5)
    probs = keras.ops.convert_to_numpy(L["ScaledSoftmax"](s)(cos))  # inference: no margin
    e = np.exp(s * cos - (s * cos).max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), atol=1e-6)


def test_gem_is_average_pooling_at_p1_and_approaches_max_as_p_grows():
    import keras

    L = _layers()
    x = np.random.default_rng(1).uniform(0, 2, size=(3, 4, 5, 6)).astype(np.float32)
    gem = L["GeM"]()
    gem.build(x.shape)
    assert float(gem.p.numpy()) == 3.0 and gem.p.trainable
    gem.p.assign(1.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gem(x)), x.mean(axis=(1, 2)), rtol=1e-5)
    mx = x.max(axis=(1, 2))
    gaps = []
    for p in (3.0, 10.0, 50.0):
        gem.p.assign(p)
        out = keras.ops.convert_to_numpy(gem(x))
        ref = np.mean(np.maximum(x, 1e-6) ** p, axis=(1, 2)) ** (1 / p)
        np.testing.assert_allclose(out, ref, rtol=1e-4)
        # (1/N)^(1/p)·max ≤ GeM ≤ max (N = H·W positions): the lower bound tends to the max as p grows
        assert ((0.05 ** (1 / p)) * mx - 1e-5 <= out).all() and (out <= mx + 1e-5).all()
        gaps.append(float(np.abs(mx - out).max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.15 * gaps[0]
    # clamped at eps: negative inputs do not give NaN
    assert np.isfinite(keras.ops.convert_to_numpy(gem(-x))).all()


@pytest.fixture(scope="module")
def comp(tmp_path_factory) -> Path:
    from pipeline.acquire.synth import make_competition

    root = tmp_path_factory.mktemp("heads") / "comp"
    make_competition(root, seed=3, landmarks=6, per_landmark=10, test=6, distractor_frac=0.0, size=32)
    return root


def _top1_on_train(run: Path, root: Path, out: Path, embeddings: Path | None = None):
    from pipeline.model.predict import predict

    res = predict(run, root, split="train", out=out, top_k=3, embeddings=str(embeddings) if embeddings else None)
    truth = pd.read_csv(root / "train.csv", dtype={"id": str})
    top = res.table[res.table["rank"] == 0].merge(truth, on="id", suffixes=("", "_true"))
    return res, float((top["landmark_id"] == top["landmark_id_true"]).mean())


@pytest.mark.slow
@pytest.mark.parametrize("bottleneck", [True, False])
def test_arcface_gem_model_saves_reloads_predicts_and_exposes_the_embedding(comp, tmp_path, bottleneck):
    from pipeline.model.backbones import load_model
    from pipeline.model.embeddings import read_embeddings
    from pipeline.model.train import train

    out = tmp_path / "run"
    m = train(comp, out=out, epochs=2, fine_tune_epochs=1, bottleneck=bottleneck, cache_dir=tmp_path / "cache",
              **TINY, **ARC)
    assert m["head"] == {"head": "arcface", "pooling": "gem", "embedding_dim": 16, "arcface_scale": 30.0,
                         "arcface_subcentres": 2}
    assert [h["phase"] for h in m["history"]] == ["head", "head", "fine_tune"]
    model = load_model(out / "model.keras")
    assert len(model.inputs) == 1 and model.layers[-1].name == "predictions"
    assert model.get_layer("arcface").centres.shape == (16, 6 * 2)
    assert model.get_layer("head_pool").__class__.__name__ == "GeM"
    assert int(model.get_layer("embedding").output.shape[-1]) == 16
    probs = model.predict(np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32"), verbose=0)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)

    res, _ = _top1_on_train(out, comp, tmp_path / "p.parquet", tmp_path / "e.npy")
    t = res.table
    labels = set(json.loads((out / "labels.json").read_text()).values())
    assert res.predicted == 60 and len(t) == 60 * 3 and set(t["landmark_id"]) <= labels
    assert t.groupby("id")["rank"].apply(list).map([0, 1, 2].__eq__).all()
    assert t.groupby("id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    ids, emb = read_embeddings(tmp_path / "e.npy")
    assert emb.shape == (60, 16) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-3)
    if bottleneck:  # another precision than training's rebuilds the model: with the same (ArcFace) head
        from pipeline.model.predict import predict

        other = predict(out, comp, split="train", out=tmp_path / "p16.parquet", top_k=3, precision="bf16")
        assert other.precision == "mixed_bfloat16" and other.predicted == 60


@pytest.mark.slow
def test_arcface_learns_the_synthetic_competition(comp, tmp_path):
    """From scratch (random base), head only: top-1 on the training images far above chance (1/6).
    (Measured: softmax 0.82, arcface + GeM + 64-d neck 0.97 after 30 head epochs.)"""
    from pipeline.model.train import train

    out = tmp_path / "run"
    train(comp, out=out, epochs=30, fine_tune_epochs=0, patience=100, val_frac=0.0, head_batch_size=16,
          cache_dir=tmp_path / "cache", **TINY, head="arcface", pooling="gem", embedding_dim=64)
    _, top1 = _top1_on_train(out, comp, tmp_path / "p.parquet")
    assert top1 >= 0.6, top1


class _Stop(Exception):
    """An interruption injected right after a checkpoint (as a kill -9 there would leave the run)."""


@pytest.mark.slow
def test_arcface_run_resumes_after_interruptions_in_both_phases(comp, tmp_path, monkeypatch):
    """Interrupted right after the checkpoint of head epoch 1 and of fine-tune epoch 1 (the view is
    reloaded with its ArcFace loss and optimizer state): every epoch runs exactly once."""
    import pipeline.model.train as T

    out, cache = tmp_path / "run", tmp_path / "cache"
    opts = dict(out=out, epochs=2, fine_tune_epochs=2, patience=100, cache_dir=cache, **TINY, **ARC)
    save = T._Run.save_state
    stops = {("head", 1), ("fine_tune", 1)}

    def save_then_stop(self, state):
        save(self, state)
        at = (state["phase"], state["epoch"])
        if at in stops and state["history"] and state["history"][-1]["phase"] == at[0]:
            stops.discard(at)
            raise _Stop(f"stopped after {at}")

    monkeypatch.setattr(T._Run, "save_state", save_then_stop)
    for _ in range(2):
        with pytest.raises(_Stop):
            T.train(comp, resume=True, **opts)
    assert not stops
    with pytest.raises(UserError, match="head='softmax'"):
        T.train(comp, resume=True, **{**opts, "head": "softmax"})
    m = T.train(comp, resume=True, **opts)
    assert [(h["phase"], h["epoch"]) for h in m["history"]] == [("head", 1), ("head", 2), ("fine_tune", 1),
                                                                 ("fine_tune", 2)]
    assert [(r["phase"], r["epoch"]) for r in m["resumed"]] == [("head", 1), ("fine_tune", 1)]
    assert (out / "model.keras").exists()


def test_unknown_head_or_pooling_is_a_user_error(comp, tmp_path):
    from pipeline.model.train import train

    with pytest.raises(UserError, match="--head 'cosface'"):
        train(comp, out=tmp_path / "r", **TINY, head="cosface")
    with pytest.raises(UserError, match="--pooling 'max'"):
        train(comp, out=tmp_path / "r", **TINY, pooling="max")


@pytest.mark.slow
def test_the_head_kind_does_not_change_the_bottleneck_cache(comp, tmp_path):
    """The bottleneck store is keyed by the base only: a softmax and an arcface run share it."""
    from pipeline.model.train import train

    cache = tmp_path / "cache"
    runs = [train(comp, out=tmp_path / name, epochs=1, fine_tune_epochs=0, cache_dir=cache, **TINY, **head)
            for name, head in (("softmax", {}), ("arcface", ARC))]
    first, second = (m["caches"]["bottleneck"] for m in runs)
    assert first["store"] == second["store"] and first["computed"] == 60
    assert second["computed"] == 0 and second["cached"] == 60
