"""`glr predict`: batched inference of a trained run into the predictions table (+ embeddings)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from submissions.errors import UserError


@pytest.fixture(scope="module")
def run_and_comp(tmp_path_factory):
    """A head-only run (2 epochs on bottleneck features) on 4 landmarks at 32 px; one test image corrupt."""
    from pipeline.acquire.competition import Competition
    from pipeline.acquire.synth import make_competition
    from pipeline.model.train import train

    root = tmp_path_factory.mktemp("pred") / "comp"
    make_competition(root, seed=2, landmarks=4, per_landmark=8, test=12, distractor_frac=0.25, size=32)
    comp = Competition(root)
    bad = comp.test_ids[5]
    comp.image_path(bad, "test").write_bytes(b"garbage")
    out = root.parent / "run"
    train(root, backbone="vgg16", out=out, weights="none", image_size=32, epochs=2, fine_tune_epochs=0,
          batch_size=8, precision="fp32")
    return out, root, bad


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
