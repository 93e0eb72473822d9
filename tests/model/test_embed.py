"""`glr embed`: every image of a split into the embeddings file pair, streamed, resumable."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from submissions.errors import UserError


@pytest.fixture(scope="module")
def run_and_comp(tmp_path_factory):
    """A head-only run (1 epoch) on 3 landmarks at 32 px, weights none; one test image corrupt."""
    from tests.model.tiny import tiny_run

    return tiny_run(tmp_path_factory.mktemp("embed"), seed=3, landmarks=3, per_landmark=6, test=11, epochs=1, bad=4)


@pytest.mark.slow
def test_embed_writes_what_predict_embeddings_writes(run_and_comp, tmp_path):
    from pipeline.model.data import ImageSkipped
    from pipeline.model.embeddings import partial_dir, read_embeddings
    from pipeline.model.predict import embed, predict

    run, root, bad = run_and_comp
    with pytest.warns(ImageSkipped, match=bad):
        predict(run, root, out=tmp_path / "p.parquet", batch_size=4, embeddings=str(tmp_path / "p.npy"))
    with pytest.warns(ImageSkipped, match=bad):
        res = embed(run, root, split="test", out=tmp_path / "e.npy", batch_size=3)
    ids_p, vec_p = read_embeddings(tmp_path / "p.npy")
    ids_e, vec_e = read_embeddings(tmp_path / "e.npy")
    assert ids_e == ids_p and bad not in ids_e and vec_e.dtype == np.float32
    np.testing.assert_allclose(vec_e, vec_p, atol=1e-5)
    assert res.embedded == len(ids_e) == res.images - 1 and res.resumed_from == 0 and len(res.skipped) == 1
    assert not partial_dir(tmp_path / "e.npy").exists()  # the progress folder is gone once finished

    # float16 storage: half the bytes, read back within float16 rounding, norms ~1
    with pytest.warns(ImageSkipped):
        embed(run, root, split="test", out=tmp_path / "h.npy", batch_size=5, float16=True)
    ids_h, vec_h = read_embeddings(tmp_path / "h.npy")
    assert ids_h == ids_e and vec_h.dtype == np.float16
    np.testing.assert_allclose(vec_h.astype(np.float32), vec_e, atol=2e-3)
    assert (tmp_path / "h.npy").stat().st_size < 0.6 * (tmp_path / "e.npy").stat().st_size


@pytest.mark.slow
def test_an_interrupted_embed_continues_where_it_stopped(run_and_comp, tmp_path, monkeypatch):
    import pipeline.model.predict as P
    from pipeline.model.embeddings import partial_dir, read_embeddings

    run, root, _ = run_and_comp
    whole = P.embed(run, root, split="train", out=tmp_path / "whole.npy", batch_size=4)
    real = P.compiled_step

    def interrupted_step(*a, **kw):  # Ctrl-C during the 4th batch
        step, calls = real(*a, **kw), []

        def wrapped(x):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return step(x)
        return wrapped

    monkeypatch.setattr(P, "compiled_step", interrupted_step)
    out = tmp_path / "e.npy"
    with pytest.raises(KeyboardInterrupt):
        P.embed(run, root, split="train", out=out, batch_size=4, commit_s=0)
    assert not out.exists() and partial_dir(out).is_dir()
    assert json.loads((partial_dir(out) / "progress.json").read_text())["images"] == 12
    monkeypatch.setattr(P, "compiled_step", real)

    res = P.embed(run, root, split="train", out=out, batch_size=4)
    assert res.resumed_from == 12 and res.embedded == whole.embedded
    ids, vecs = read_embeddings(out)
    ids_w, vecs_w = read_embeddings(tmp_path / "whole.npy")
    assert ids == ids_w
    np.testing.assert_allclose(vecs, vecs_w, atol=1e-6)

    # a partial folder left by another split is not continued: the run starts afresh
    monkeypatch.setattr(P, "compiled_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        P.embed(run, root, split="train", out=tmp_path / "x.npy", batch_size=4, commit_s=0)
    monkeypatch.setattr(P, "compiled_step", real)
    res = P.embed(run, root, split="val", out=tmp_path / "x.npy", batch_size=4)
    val = P.embed(run, root, split="val", out=tmp_path / "v.npy", batch_size=4)
    assert res.resumed_from == 0 and res.embedded == val.embedded
    assert read_embeddings(tmp_path / "x.npy")[0] == read_embeddings(tmp_path / "v.npy")[0]


@pytest.mark.slow
def test_embed_cli_and_its_errors(run_and_comp, tmp_path):
    from pipeline.cli import cli
    from pipeline.model.embeddings import read_embeddings

    run, root, _ = run_and_comp
    r = CliRunner().invoke(cli, ["embed", str(run), "--data-dir", str(root), "--split", "val",
                                 "--out", str(tmp_path / "v.npy"), "--json", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output.strip().splitlines()[-1])
    ids, vecs = read_embeddings(tmp_path / "v.npy")
    assert info["embedded"] == len(ids) > 0 and info["dim"] == vecs.shape[1]
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)

    r = CliRunner().invoke(cli, ["embed", str(tmp_path / "nope"), "--data-dir", str(root), "--out",
                                 str(tmp_path / "n.npy")])
    assert isinstance(r.exception, UserError) and "not a finished `glr train` run" in str(r.exception)
    assert "\n" not in str(r.exception)  # one line


def test_float16_rows_read_back_and_unknown_storage_refused(tmp_path):
    from pipeline.model.embeddings import read_embeddings, resumable_writer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 16)).astype(np.float32)
    w = resumable_writer(tmp_path / "h.npy", 8, 16, "float16", {"k": 1}, commit_s=0)
    w.append([f"a{i}" for i in range(4)], x[:4], images=4)
    w.append([f"a{i}" for i in range(4, 7)], x[4:], images=4)  # one of 8 images skipped
    w.finish_into(tmp_path / "h.npy")
    ids, vecs = read_embeddings(tmp_path / "h.npy")
    assert ids == [f"a{i}" for i in range(7)] and vecs.dtype == np.float16 and vecs.shape == (7, 16)
    ref = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(vecs.astype(np.float32), ref, atol=1e-3)
    with pytest.raises(UserError, match="float16"):
        resumable_writer(tmp_path / "b.npy", 8, 16, "int8", {})


def test_embed_a_plain_folder_of_images(run_and_comp, tmp_path):
    """--images: any folder (a non-landmark pool); ids are relative paths without the extension, and the
    rows are the ones the competition's own copy of the same images gets."""
    import shutil

    from pipeline.acquire.competition import Competition
    from pipeline.cli import cli
    from pipeline.model.embeddings import read_embeddings
    from pipeline.model.predict import embed

    run, root, bad = run_and_comp
    comp = Competition(root)
    pool = tmp_path / "pool"
    picked = [i for i in comp.test_ids if i != bad][:5]
    for n, image_id in enumerate(picked):
        dest = pool / ("people" if n % 2 else "rooms") / f"{image_id}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(comp.image_path(image_id, "test"), dest)
    (pool / ".glr-work").mkdir()
    shutil.copy(comp.image_path(picked[0], "test"), pool / ".glr-work" / "hidden.jpg")  # never embedded
    (pool / "notes.txt").write_text("not an image")

    r = CliRunner().invoke(cli, ["embed", str(run), "--images", str(pool), "--out", str(tmp_path / "pool.npy"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    ids, vecs = read_embeddings(tmp_path / "pool.npy")
    assert ids == sorted(f"{'people' if n % 2 else 'rooms'}/{i}" for n, i in enumerate(picked))
    embed(run, root, split="test", out=tmp_path / "test.npy")
    t_ids, t_vecs = read_embeddings(tmp_path / "test.npy")
    same = np.asarray(t_vecs)[[t_ids.index(i.split("/")[1]) for i in ids]]
    np.testing.assert_allclose(np.asarray(vecs), same, atol=1e-5)

    for args, message in ((["--images", str(tmp_path / "none")], "no such folder"),
                          (["--images", str(pool), "--data-dir", str(root)], "either --data-dir"),
                          ([], "either --data-dir")):
        r = CliRunner().invoke(cli, ["embed", str(run), "--out", str(tmp_path / "x.npy"), *args])
        assert isinstance(r.exception, UserError) and message in str(r.exception), (args, r.output)
    shutil.copy(comp.image_path(picked[0], "test"), pool / "rooms" / f"{picked[0]}.png")
    with pytest.raises(UserError, match="share the id"):
        embed(run, images=pool, out=tmp_path / "y.npy")
