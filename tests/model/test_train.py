"""`glr train`: two phases on a tiny synthetic competition, corrupt images, resume after kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from submissions.errors import UserError

GLR = str(Path(sys.executable).with_name("glr"))
TINY = dict(backbone="vgg16", weights="none", image_size=32, batch_size=8, precision="fp32", seed=0)


@pytest.fixture(scope="module")
def tiny_comp(tmp_path_factory) -> Path:
    """4 landmarks × 8 photos at 32 px, with one train image replaced by garbage bytes."""
    from pipeline.acquire.competition import Competition
    from pipeline.acquire.synth import make_competition

    root = tmp_path_factory.mktemp("tiny") / "comp"
    make_competition(root, seed=1, landmarks=4, per_landmark=8, test=12, distractor_frac=0.25, size=32)
    comp = Competition(root)
    bad = comp.train["id"].iloc[3]
    comp.image_path(bad, "train").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "corrupt_id.txt").write_text(bad)
    return root


@pytest.fixture(scope="module")
def trained(tiny_comp, tmp_path_factory):
    """One finished run (1 head epoch + 1 fine-tune epoch), and the warnings it gave."""
    from pipeline.model.data import ImageSkipped
    from pipeline.model.train import train

    out = tmp_path_factory.mktemp("runs") / "vgg16"
    with pytest.warns(ImageSkipped) as rec:
        manifest = train(tiny_comp, out=out, epochs=1, fine_tune_epochs=1, **TINY)
    return out, manifest, [str(w.message) for w in rec]


@pytest.mark.slow
def test_train_writes_the_run_directory(trained, tiny_comp):
    out, manifest, warned = trained
    for name in ("model.keras", "labels.json", "split.csv", "history.json", "manifest.json", "training_curve.png"):
        assert (out / name).stat().st_size > 0, name
    bad = (tiny_comp / "corrupt_id.txt").read_text()
    assert any(bad in w for w in warned)
    assert manifest["data"]["skipped_images"] == 1 and manifest["data"]["skipped"][0]["id"] == bad
    labels = json.loads((out / "labels.json").read_text())
    train_csv = pd.read_csv(tiny_comp / "train.csv")
    assert sorted(labels.values()) == sorted(train_csv["landmark_id"].unique().tolist())
    split = pd.read_csv(out / "split.csv", dtype={"id": str})
    assert set(split.loc[split["split"] == "val", "landmark_id"]) == set(train_csv["landmark_id"])  # stratified
    assert [(h["phase"], h["epoch"]) for h in manifest["history"]] == [("head", 1), ("fine_tune", 1)]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(manifest["history"][0])
    assert manifest["precision"] == "fp32" and manifest["strategy"] == "_DefaultDistributionStrategy"
    assert manifest["versions"]["tensorflow"] and manifest["data"]["train_csv_sha256"]
    assert manifest["timings"]["head_images_per_s"] > 0 and manifest["timings"]["fine_tune_images_per_s"] > 0
    assert manifest["data"]["train_images"] + manifest["data"]["val_images"] == len(train_csv) - 1
    # the head trained on cached bottleneck features, stored in the run directory
    assert (out / "cache" / "features_train.npy").exists()


@pytest.mark.slow
def test_existing_run_needs_resume_and_same_options(trained, tiny_comp):
    from pipeline.model.train import train

    out, manifest, _ = trained
    with pytest.raises(UserError, match="--resume"):
        train(tiny_comp, out=out, epochs=1, fine_tune_epochs=1, **TINY)
    with pytest.raises(UserError, match="image-size"):
        train(tiny_comp, out=out, epochs=1, fine_tune_epochs=1, resume=True, **{**TINY, "image_size": 48})
    # a finished run resumes to itself without training again
    again = train(tiny_comp, out=out, epochs=1, fine_tune_epochs=1, resume=True, **TINY)
    assert again["history"] == manifest["history"]


def _glr_env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_kill_9_then_resume_continues_from_the_last_epoch(tiny_comp, tmp_path):
    out = tmp_path / "run"
    cmd = [GLR, "train", str(tiny_comp), "--backbone", "vgg16", "--out", str(out), "--weights", "none",
           "--image-size", "32", "--batch-size", "8", "--precision", "fp32", "--epochs", "2",
           "--fine-tune-epochs", "40", "--patience", "100", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_glr_env())
    state_path = out / "state.json"
    deadline = time.time() + 240
    state = None
    try:
        while time.time() < deadline and proc.poll() is None:
            if state_path.exists():
                try:
                    state = json.loads(state_path.read_text())
                except json.JSONDecodeError:
                    state = None
                if state and state["phase"] == "fine_tune" and state["epoch"] >= 1:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads(state_path.read_text())
    done = state["epoch"]
    assert state["phase"] == "fine_tune" and 1 <= done < 40
    assert not (out / "manifest.json").exists()

    # resume, asking for one more fine-tune epoch than were finished
    resume = cmd[:cmd.index("--fine-tune-epochs")] + ["--fine-tune-epochs", str(done + 1), "--patience", "100",
                                                      "--quiet", "--resume", "--json"]
    r = subprocess.run(resume, capture_output=True, text=True, env=_glr_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"][0]["phase"] == "fine_tune" and manifest["resumed"][0]["epoch"] == done
    epochs = [(h["phase"], h["epoch"]) for h in manifest["history"]]
    # every epoch exactly once: not restarted from scratch, nothing repeated
    assert epochs == [("head", 1), ("head", 2)] + [("fine_tune", e) for e in range(1, done + 2)]
    assert (out / "model.keras").exists()


@pytest.mark.slow
def test_head_on_augmented_images_without_bottleneck(tiny_comp, tmp_path):
    """--no-bottleneck: the head phase trains the full model (frozen base) on augmented images."""
    import numpy as np

    from pipeline.model.backbones import find_base, load_model
    from pipeline.model.train import train

    m = train(tiny_comp, out=tmp_path / "r", epochs=1, fine_tune_epochs=0, bottleneck=False,
              **{**TINY, "backbone": "resnet50"})
    assert [(h["phase"], h["epoch"]) for h in m["history"]] == [("head", 1)]
    assert not (tmp_path / "r" / "cache" / "features_train.npy").exists()
    init = load_model(tmp_path / "r" / "checkpoints" / "init.keras")
    final = load_model(tmp_path / "r" / "model.keras")
    # the base stayed frozen, the head learned
    for a, b in zip(find_base(init).get_weights(), find_base(final).get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(init.get_layer("predictions").get_weights()[0],
                              final.get_layer("predictions").get_weights()[0])


@pytest.mark.slow
def test_feature_extraction_resumes_where_it_stopped(tmp_path):
    """Bottleneck features are written batch by batch; an interrupted extraction continues."""
    import json

    import keras
    import numpy as np

    from pipeline.model.data import extract_features

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8)
    inp = keras.Input((8, 8, 3))
    extractor = keras.Model(inp, keras.layers.Conv2D(4, 3, dtype="float32")(inp))
    index = np.arange(3, 20)
    expected = np.asarray(extractor(images[index].astype("float32")))
    path = tmp_path / "features_train.npy"
    feats, n = extract_features(extractor, images, index, path, batch_size=4)
    assert n == len(index) and np.allclose(feats, expected, atol=1e-5)
    assert not path.with_name("features_train.progress.json").exists()
    # a complete file is reused as it is
    assert extract_features(extractor, images, index, path, batch_size=4)[1] == 0
    # simulate a kill after 8 rows: later rows were never written
    arr = np.load(path, mmap_mode="r+")
    arr[8:] = np.nan
    arr.flush()
    del arr
    path.with_name("features_train.progress.json").write_text(json.dumps({"rows": 8}))
    feats, n = extract_features(extractor, images, index, path, batch_size=4)
    assert n == len(index) - 8 and np.allclose(feats, expected, atol=1e-5)
