"""`glr predict`: batched inference of a trained run into the predictions table (+ embeddings)."""
from __future__ import annotations

import io
import json
import shutil
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from submissions.errors import UserError


@pytest.fixture(scope="module")
def run_and_comp(tmp_path_factory):
    """A head-only run (2 epochs on bottleneck features) on 4 landmarks at 32 px; one test image corrupt."""
    from tests.model.tiny import tiny_run

    return tiny_run(tmp_path_factory.mktemp("pred"), seed=2, landmarks=4, per_landmark=8, test=12, epochs=2, bad=5)


@pytest.mark.slow
def test_predict_test_split_with_embeddings(run_and_comp, tmp_path):
    from pipeline.acquire.competition import Competition
    from pipeline.model.data import ImageSkipped, load_square
    from pipeline.model.embeddings import read_embeddings
    from pipeline.model.backbones import load_model
    from pipeline.model.predict import predict
    from submissions.tables import read_predictions

    run, root, bad = run_and_comp
    with pytest.warns(ImageSkipped, match=bad):
        res = predict(run, root, out=tmp_path / "p.parquet", top_k=5, batch_size=4,
                      embeddings=str(tmp_path / "e.npy"))
    comp = Competition(root)
    back = read_predictions(tmp_path / "p.parquet")
    good = [i for i in comp.test_ids if i != bad]
    assert sorted(back["id"].unique()) == sorted(good)
    assert (back.groupby("id").size() == 4).all()  # top-5 of 4 classes → 4 rows each
    labels = set(json.loads((run / "labels.json").read_text()).values())
    assert set(back["landmark_id"]) <= labels
    for _, g in back.groupby("id"):
        assert g["rank"].tolist() == [0, 1, 2, 3] and (np.diff(g["score"].to_numpy()) <= 0).all()
        assert g["score"].sum() == pytest.approx(1.0, abs=1e-4)
    assert res.skipped[0]["id"] == bad and res.predicted == len(good) and res.images == len(comp.test_ids)
    assert len(res.table) == len(back) and set(res.table["id"]) == set(back["id"])
    assert not res.table.attrs  # statistics travel in the result, not on the frame
    assert res.stats()["skipped"] == 1 and res.stats()["out"] == str(tmp_path / "p.parquet")

    # the batched pipeline gives what the model gives on one image read the plain way
    model = load_model(run / "model.keras")
    x = load_square(comp.image_path(good[0], "test"), 32)[None].astype("float32")
    probs = np.asarray(model(x, training=False))[0]
    lab = [json.loads((run / "labels.json").read_text())[str(i)] for i in range(4)]
    top = back[back["id"] == good[0]].set_index("landmark_id")["score"]
    for i, c in enumerate(lab):
        assert top[c] == pytest.approx(probs[i], abs=1e-4)

    ids, vecs = read_embeddings(tmp_path / "e.npy")
    assert ids == [i for i in comp.test_ids if i != bad] and vecs.shape == (len(good), 256)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_predict_val_split_and_cli(run_and_comp, tmp_path):
    from pipeline.cli import cli

    run, root, _ = run_and_comp
    r = CliRunner().invoke(cli, ["predict", str(run), "--data-dir", str(root), "--split", "val",
                                 "--out", str(tmp_path / "v.parquet"), "--top-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output.strip().splitlines()[-1])
    split = pd.read_csv(run / "split.csv", dtype={"id": str})
    val_ids = sorted(split.loc[split["split"] == "val", "id"])
    v = pd.read_parquet(tmp_path / "v.parquet")
    assert sorted(v["id"].unique()) == val_ids and info["images"] == len(val_ids)
    assert (v.groupby("id").size() == 2).all()


@pytest.mark.slow
def test_label_map_mismatch_and_unfinished_run(run_and_comp, tmp_path):
    from pipeline.model.predict import predict

    run, root, _ = run_and_comp
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("cache", "checkpoints"))
    labels = json.loads((broken / "labels.json").read_text())
    del labels["3"]
    (broken / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(UserError, match="class index.*3"):
        predict(broken, root, out=tmp_path / "x.parquet")
    (broken / "manifest.json").unlink()
    with pytest.raises(UserError, match="not a finished"):
        predict(broken, root, out=tmp_path / "x.parquet")
    with pytest.raises(UserError, match="--split"):
        predict(run, root, split="dev", out=tmp_path / "x.parquet")


def _good_images(comp, ids):
    from pipeline.model.data import load_square

    return np.stack([load_square(comp.image_path(i, "test"), 32) for i in ids]).astype("float32")


def _reference_table(probs: np.ndarray, ids: list[str], labels: np.ndarray, k: int) -> pd.DataFrame:
    """The predictions table computed the plain way, from the full probability matrix."""
    k = min(k, probs.shape[1])
    cls = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return pd.DataFrame({"id": np.repeat(ids, k), "landmark_id": labels[cls.ravel()],
                         "score": np.take_along_axis(probs, cls, axis=1).ravel(),
                         "rank": np.tile(np.arange(k, dtype=np.int16), len(ids))})


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4, 7])  # fewer than, as many as, more than the 4 classes
def test_streaming_top_k_equals_full_matrix_reference(run_and_comp, tmp_path, k):
    from pipeline.acquire.competition import Competition
    from pipeline.model.backbones import load_model
    from pipeline.model.predict import predict
    from pipeline.model.train import read_labels
    from submissions.tables import read_predictions

    run, root, bad = run_and_comp
    with pytest.warns(Warning, match=bad):
        res = predict(run, root, out=tmp_path / "p.parquet", top_k=k, batch_size=5)
    good = [i for i in Competition(root).test_ids if i != bad]
    probs = np.asarray(load_model(run / "model.keras")(_good_images(Competition(root), good), training=False))
    ref = _reference_table(probs, good, read_labels(run), k)
    for got in (res.table, read_predictions(tmp_path / "p.parquet")):
        assert got["id"].tolist() == ref["id"].tolist()
        assert got["landmark_id"].tolist() == ref["landmark_id"].tolist()
        assert got["rank"].dtype == np.int16 and got["rank"].tolist() == ref["rank"].tolist()
        assert np.allclose(got["score"], ref["score"], atol=1e-5)


@pytest.mark.slow
def test_embeddings_equal_the_models_and_skip_unreadable(run_and_comp, tmp_path):
    import keras

    from pipeline.acquire.competition import Competition
    from pipeline.model.backbones import load_model
    from pipeline.model.embeddings import read_embeddings
    from pipeline.model.predict import predict

    run, root, bad = run_and_comp
    with pytest.warns(Warning, match=bad):
        predict(run, root, out=tmp_path / "p.parquet", batch_size=3, embeddings=str(tmp_path / "e.npy"))
    good = [i for i in Competition(root).test_ids if i != bad]
    model = load_model(run / "model.keras")
    emb = np.asarray(keras.Model(model.input, model.get_layer("embedding").output)(
        _good_images(Competition(root), good), training=False))
    ids, vecs = read_embeddings(tmp_path / "e.npy")
    assert isinstance(vecs, np.memmap) and not vecs.flags.writeable  # read memory-mapped, never loaded whole
    assert ids == good and bad not in ids
    assert np.allclose(vecs, emb / np.linalg.norm(emb, axis=1, keepdims=True), atol=1e-5)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ids.txt", "e.npy", "p.parquet"]  # no temp left


@pytest.mark.slow
def test_ties_go_to_the_lower_class_index():
    """A head with all-zero weights gives every class the same probability: top-k is classes 0..k-1."""
    from pipeline.model.backbones import build_model
    from pipeline.model.predict import compiled_step

    model = build_model("vgg16", 9, 32, "none")
    head = model.get_layer("predictions")
    head.set_weights([np.zeros_like(w) for w in head.get_weights()])
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    for k, want in ((4, 4), (20, 9)):
        scores, classes, emb = (t.numpy() for t in compiled_step(model, k, True)(x))
        assert classes.tolist() == [list(range(want))] * 3 and np.allclose(scores, 1 / 9)
        assert emb.shape == (3, 256)


def test_embedding_writer_compacts_skipped_rows_and_writes_nothing_on_error(tmp_path):
    from pipeline.model.embeddings import embedding_writer, read_embeddings, write_embeddings

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(2, 4))
    with embedding_writer(tmp_path / "e.npy", capacity=8, dim=4) as w:  # 8 announced, 5 readable
        w.append(["a0", "a1", "a2"], a)
        w.append(["b0", "b1"], b)
    ids, vecs = read_embeddings(tmp_path / "e.npy")
    want = np.vstack([a, b])
    assert ids == ["a0", "a1", "a2", "b0", "b1"] and vecs.shape == (5, 4)
    assert np.allclose(vecs, want / np.linalg.norm(want, axis=1, keepdims=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ids.txt", "e.npy"]

    with pytest.raises(RuntimeError, match="boom"):
        with embedding_writer(tmp_path / "f.npy", capacity=4, dim=4) as w:
            w.append(["x"], a[:1])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ids.txt", "e.npy"]  # nothing written, no temp left

    write_embeddings(tmp_path / "g.npy", ["only"], np.zeros((1, 4)))  # a zero vector stays zero, no NaN
    assert np.array_equal(read_embeddings(tmp_path / "g.npy")[1], np.zeros((1, 4), np.float32))
    (tmp_path / "g.ids.txt").write_text("only\nextra\n")
    with pytest.raises(UserError, match="1 vectors but 2 ids"):
        read_embeddings(tmp_path / "g.npy")


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A run folder with a 20,000-class head (random weights, 32 px) and a competition of 1,000 tiny test
    images: probability matrices big enough to see, fast to compute."""
    from PIL import Image

    from pipeline.acquire.competition import hashed_relpath
    from pipeline.model.backbones import build_model

    root = tmp_path_factory.mktemp("wide")
    run, comp = root / "run", root / "comp"
    run.mkdir()
    build_model("vgg16", 20_000, 32, "none").save(run / "model.keras")
    (run / "labels.json").write_text(json.dumps({str(i): 100_000 + i for i in range(20_000)}))
    (run / "manifest.json").write_text(json.dumps({"backbone": "vgg16", "image_size": 32}))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    ids = [f"{i:016x}" for i in range(1000)]
    for i in ids:
        (comp / "test" / hashed_relpath(i)).parent.mkdir(parents=True, exist_ok=True)
        (comp / "test" / hashed_relpath(i)).write_bytes(buf.getvalue())
    pd.DataFrame({"id": ids[:2], "landmark_id": [100_000, 100_001]}).to_csv(comp / "train.csv", index=False)
    return run, comp, ids


@pytest.mark.slow
def test_memory_does_not_grow_with_images_times_classes(wide_run, tmp_path):
    """Python-side allocations (numpy's included) of predicting 1,000 images exceed those of 20 by far
    less than one 1,000×20,000 probability matrix (80 MB), with embeddings on: nothing N×C is ever held."""
    from pipeline.model.predict import predict

    run, comp, ids = wide_run
    one_matrix = len(ids) * 20_000 * 4

    def peak(n: int) -> int:
        pd.DataFrame({"id": ids[:n], "landmarks": ""}).to_csv(comp / "sample_submission.csv", index=False)
        tracemalloc.start()
        try:
            predict(run, comp, out=tmp_path / f"p{n}.parquet", batch_size=50, embeddings=str(tmp_path / f"e{n}.npy"))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(10)  # warm-up: TensorFlow's one-off allocations
    small, large = peak(20), peak(len(ids))
    assert large - small < one_matrix / 8, (small, large)
    assert len(pd.read_parquet(tmp_path / f"p{len(ids)}.parquet")) == len(ids) * 5
