"""`glr train`: two phases on a tiny synthetic competition, corrupt images, resume after kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
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
    # the head trained on cached bottleneck features, kept in the competition's shared cache, not the run folder
    caches = manifest["caches"]
    assert caches["root"] == str(tiny_comp / ".glr-cache")
    assert Path(caches["bottleneck"]["store"]).parent == tiny_comp / ".glr-cache" / "bottleneck"
    assert (Path(caches["images"]["store"]) / "rows.bin").stat().st_size == 31 * 32 * 32 * 3
    assert not (out / "cache").exists()


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

    from pipeline.model.data import ImageSkipped

    with pytest.warns(ImageSkipped, match=(tiny_comp / "corrupt_id.txt").read_text()):
        m = train(tiny_comp, out=tmp_path / "r", epochs=1, fine_tune_epochs=0, bottleneck=False,
                  cache_dir=tmp_path / "cache", **{**TINY, "backbone": "resnet50"})
    assert [(h["phase"], h["epoch"]) for h in m["history"]] == [("head", 1)]
    assert "bottleneck" not in m["caches"] and not (tmp_path / "cache" / "bottleneck").exists()
    init = load_model(tmp_path / "r" / "checkpoints" / "init.keras")
    final = load_model(tmp_path / "r" / "model.keras")
    # the base stayed frozen, the head learned
    for a, b in zip(find_base(init).get_weights(), find_base(final).get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(init.get_layer("predictions").get_weights()[0],
                              final.get_layer("predictions").get_weights()[0])


def _copy_comp(src: Path, dst: Path) -> Path:
    """A private copy of a competition (its images may be changed)."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".glr-cache"))
    return dst


def _decode(comp_root: Path, cache: Path, ids=None):
    from pipeline.acquire.competition import Competition
    from pipeline.model.data import decode_images

    comp = Competition(comp_root)
    ids = comp.train["id"].tolist() if ids is None else list(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ids, decode_images(ids, comp.image_paths(ids, "train"), 32, cache)


def test_decode_once_then_reuse_and_a_changed_image_is_decoded_again(tiny_comp, tmp_path, capsys):
    import numpy as np

    from pipeline.acquire.competition import Competition
    from pipeline.model.data import image_store, load_square

    comp_root = _copy_comp(tiny_comp, tmp_path / "comp")
    bad = (comp_root / "corrupt_id.txt").read_text()
    ids, (images, rows, _, skipped, stats) = _decode(comp_root, tmp_path / "cache")
    assert stats["decoded"] == len(ids) - 1 and [s["id"] for s in skipped] == [bad]
    assert "adding 32 (0 cached), 98.3 KB" in capsys.readouterr().err  # sized before it is built
    comp = Competition(comp_root)
    k = 5
    np.testing.assert_array_equal(images[rows[k]], load_square(comp.image_path(ids[k], "train"), 32))
    # a second look decodes nothing, the corrupt file included (its failure is remembered)
    _, (images2, rows2, _, skipped2, stats2) = _decode(comp_root, tmp_path / "cache")
    assert stats2["decoded"] == 0 and len(skipped2) == 1 and (rows2 == rows).all()
    assert capsys.readouterr().err == ""
    # the file of image k changes (another photo's bytes, a later mtime): decoded again, a new row
    path = comp.image_path(ids[k], "train")
    before = path.stat()
    path.write_bytes(comp.image_path(ids[k + 1], "train").read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    _, (images3, rows3, _, _, stats3) = _decode(comp_root, tmp_path / "cache")
    assert stats3["decoded"] == 1 and rows3[k] == len(ids) - 1 and (np.delete(rows3, k) == np.delete(rows, k)).all()
    np.testing.assert_array_equal(images3[rows3[k]], images3[rows3[k + 1]])
    assert image_store(tmp_path / "cache", 32).index().n_rows == len(ids)  # 30 good + the new version


def test_an_append_killed_midway_leaves_a_valid_store(tiny_comp, tmp_path):
    """kill -9 during an append leaves rows past the index: they are ignored, then overwritten."""
    import numpy as np

    from pipeline.acquire.competition import Competition
    from pipeline.model.data import image_store, load_square

    cache = tmp_path / "cache"
    comp = Competition(tiny_comp)
    bad = (tiny_comp / "corrupt_id.txt").read_text()
    _decode(tiny_comp, cache, [i for i in comp.train["id"] if i != bad][:10])
    store = image_store(cache, 32)
    committed = store.data_path.stat().st_size
    with open(store.data_path, "ab") as f:  # what a killed appender leaves: rows (and a partial one), no index
        f.write(np.full(32 * 32 * 3 * 2 + 1000, 7, np.uint8).tobytes())
    assert store.index().n_rows == 10 and store.array().shape == (10, 32, 32, 3)
    ids, (images, rows, _, _, stats) = _decode(tiny_comp, cache)
    assert stats["decoded"] == len(ids) - 11 and store.data_path.stat().st_size == committed + \
        stats["decoded"] * 32 * 32 * 3
    for k in (0, 9, 10, 20):  # old rows intact, new rows where the junk was
        if rows[k] >= 0:
            np.testing.assert_array_equal(images[rows[k]], load_square(comp.image_path(ids[k], "train"), 32))
    assert sorted(rows[rows >= 0]) == list(range(len(ids) - 1))
    # an index whose rows.bin was lost is a store that starts again, not a crash
    store.data_path.unlink()
    _, (_, rows2, _, _, stats2) = _decode(tiny_comp, cache)
    assert stats2["decoded"] == len(ids) - 1 and sorted(rows2[rows2 >= 0]) == list(range(len(ids) - 1))


def test_two_processes_append_under_one_lock(tiny_comp, tmp_path):
    """Two processes decoding the same images into one store: each image decoded once in all."""
    code = ("import sys, json, warnings; warnings.simplefilter('ignore'); sys.path.insert(0, sys.argv[3]);"
            "from pipeline.acquire.competition import Competition;"
            "from pipeline.model.data import decode_images;"
            "c = Competition(sys.argv[1]); ids = c.train['id'].tolist();"
            "r = decode_images(ids, c.image_paths(ids, 'train'), 32, sys.argv[2]);"
            "print(json.dumps(r[4]))")
    root = str(Path(__file__).resolve().parents[2])
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_comp), str(tmp_path / "cache"), root],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    stats = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert sorted(s["decoded"] for s in stats)[1] <= 31 and sum(s["decoded"] for s in stats) == 31
    from pipeline.model.data import image_store

    assert image_store(tmp_path / "cache", 32).index().n_rows == 31


def test_a_short_disk_is_refused_before_anything_is_written(tmp_path):
    from pipeline.caches import announce

    with pytest.raises(UserError, match="--cache-dir"):
        announce(tmp_path, "decoded-image", 10**12, 0, 96 * 96 * 3)  # 27.6 PB
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def shared_cache_runs(tiny_comp, tmp_path_factory):
    """vgg16, then resnet50, then vgg16 again into one cache root (1 head epoch each)."""
    from pipeline.model.train import train

    base = tmp_path_factory.mktemp("shared")
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, backbone in (("a", "vgg16"), ("b", "resnet50"), ("c", "vgg16")):
            runs[name] = train(tiny_comp, out=base / name, epochs=1, fine_tune_epochs=0, cache_dir=base / "cache",
                               **{**TINY, "backbone": backbone})
    return base, runs


@pytest.mark.slow
def test_two_backbones_share_one_decoded_image_cache(shared_cache_runs):
    from pipeline.caches import list_caches

    base, runs = shared_cache_runs
    images = [r["caches"]["images"] for r in runs.values()]
    assert [i["decoded"] for i in images] == [31, 0, 0] and images[1]["cached"] == 31
    assert len({i["store"] for i in images}) == 1
    # bottleneck: one store per base; the same base (same seed, same weights) finds its features
    bott = [r["caches"]["bottleneck"] for r in runs.values()]
    assert [b["computed"] for b in bott] == [31, 31, 0] and bott[0]["store"] == bott[2]["store"] != bott[1]["store"]
    listed = {(e["kind"], e["entries"]) for e in list_caches(base / "cache")}
    assert listed == {("images", 31), ("bottleneck", 31)} and len(list_caches(base / "cache")) == 3
    vgg = next(e for e in list_caches(base / "cache") if e["key"].startswith("vgg16"))
    assert vgg["describe"]["precision"] == "fp32" and vgg["bytes"] >= 31 * 512 * 2  # float16: (1, 1, 512) per image


@pytest.mark.slow
def test_full_fit_after_split_fit_decodes_only_what_the_split_lacked(tiny_comp, tmp_path):
    """glr run's split fit reads the local-validation folder (links to the same files): the full fit
    on the competition then decodes only the held-out images, and reuses their base features."""
    from pipeline.run.localval import make_local_validation
    from pipeline.model.train import train

    lv = make_local_validation(tiny_comp, tmp_path / "localval", holdout_frac=0.25, unseen_class_frac=0.25,
                               min_train_per_class=2, max_queries=0, seed=0)
    cache = tmp_path / "cache"
    opts = dict(epochs=1, fine_tune_epochs=0, cache_dir=cache, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = train(tmp_path / "localval", out=tmp_path / "split", **opts)
        full = train(tiny_comp, out=tmp_path / "full", **opts)
    corrupt_in_split = int(split["data"]["skipped_images"])
    assert split["caches"]["images"]["decoded"] == lv["train_images"] - corrupt_in_split
    assert full["caches"]["images"]["decoded"] == 31 - split["caches"]["images"]["decoded"]
    assert full["caches"]["images"]["cached"] == split["caches"]["images"]["decoded"]
    assert full["caches"]["bottleneck"]["computed"] == full["caches"]["images"]["decoded"]
    assert full["caches"]["bottleneck"]["store"] == split["caches"]["bottleneck"]["store"]


@pytest.mark.slow
def test_cache_dir_may_change_on_resume_and_head_batch_size_is_used(tiny_comp, tmp_path):
    from pipeline.model.train import train

    opts = dict(epochs=1, fine_tune_epochs=0, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = train(tiny_comp, out=tmp_path / "r", cache_dir=tmp_path / "c1", head_batch_size=5, **opts)
        assert m["config"]["head_batch_size"] == 5
        again = train(tiny_comp, out=tmp_path / "r", cache_dir=tmp_path / "c2", head_batch_size=7, resume=True,
                      **opts)
    assert again["history"] == m["history"]
    with pytest.raises(UserError, match="head-batch-size"):
        train(tiny_comp, out=tmp_path / "x", head_batch_size=0, **opts)


def test_tf_config_is_refused_before_any_decoding(tiny_comp, tmp_path, monkeypatch):
    from pipeline.model.train import train

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["h1:1", "h2:1"]}, "task": {"type": "worker", "index": 1}}')
    with pytest.raises(UserError, match="20585"):
        train(tiny_comp, out=tmp_path / "r", cache_dir=tmp_path / "cache", **TINY)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r").exists()
