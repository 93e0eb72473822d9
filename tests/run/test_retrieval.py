"""A retrieval member in `glr run` (`[[models]] kind = "retrieval"`): embed + exact kNN as an ensemble member,
its index serving as refs = nearest, reproduced by `glr infer`, and its own fingerprint ([knn])."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from tests.run.test_stages import TINY, glr

RETRIEVAL = """
[[models]]
name = "arc"
backbone = "vgg16"
kind = "retrieval"
head = "arcface"
pooling = "gem"
embedding_dim = 32
[knn]
k = 5
"""


def _config(epochs: int = 1) -> str:
    """TINY with the retrieval member first (so its index is refs = nearest's references) and the classifier."""
    toml = TINY.format(epochs=epochs, trials=2).replace("[[models]]", RETRIEVAL.strip() + "\n[[models]]", 1)
    return toml.replace("[verify]\n", '[verify]\nrefs = "nearest"\n')


def _brute_force_top1(queries: np.ndarray, index: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """Per query: the class with the largest sum of max(similarity, 0) over its top-k neighbours, / k."""
    sims = queries.astype(np.float64) @ index.astype(np.float64).T
    best, scores = [], []
    for row in sims:
        top = np.argsort(-row, kind="stable")[:k]
        per = pd.Series(np.maximum(row[top], 0)).groupby(labels[top]).sum() / k
        best.append(per.idxmax())
        scores.append(per.max())
    return np.array(best), np.array(scores)


@pytest.mark.slow
def test_a_retrieval_member_runs_beside_a_classifier_and_infer_reproduces_it(tmp_path):
    from pipeline.acquire.synth import make_competition
    from pipeline.model.embeddings import read_embeddings
    from pipeline.run.layout import Layout
    from submissions.tables import read_predictions

    make_competition(tmp_path / "comp", landmarks=4, per_landmark=8, test=12, size=64, seed=0)
    (tmp_path / "glr.toml").write_text(_config())
    res = glr("run", "glr.toml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"model arc \(kNN\)\s+\d\.\d{4}", res.stdout), res.stdout
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert all(r["status"] == "done" for r in manifest["stages"].values())
    assert manifest["stages"]["predict:arc"]["metrics"]["val"]["gap"] is not None

    # the member's table is the kNN of its stored embeddings: the brute-force top class and score
    lay = Layout(tmp_path / "run")
    for part, folder in (("val", lay.localval), ("test", tmp_path / "comp")):
        q_ids, q = read_embeddings(lay.embeddings("arc", part))
        x_ids, x = read_embeddings(lay.embeddings("arc", part, train=True))
        train = pd.read_csv(folder / "train.csv").set_index("id")["landmark_id"]
        assert sorted(x_ids) == sorted(train.index) and len(q_ids) == len(pd.read_csv(folder / "sample_submission.csv"))
        best, score = _brute_force_top1(np.asarray(q), np.asarray(x), train.loc[x_ids].to_numpy(), k=5)
        top = read_predictions(lay.predictions("arc", part)).query("rank == 0").set_index("id").loc[q_ids]
        assert (top["landmark_id"].to_numpy() == best).all(), part
        np.testing.assert_allclose(top["score"].to_numpy(), score, atol=1e-5)

    # the test-time half on the same competition: the same submission, byte for byte
    out = glr("infer", "run", "--data-dir", "comp", "--out", "out/submission.csv", "--expect-test", "100", "--json",
              "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "out" / "submission.csv").read_bytes() == (tmp_path / "run" / "submission.csv").read_bytes()
    figures = json.loads(out.stdout)
    assert figures["stages"]["index"]["images_per_s"] > 0 and "references" not in figures["stages"]

    # a non-landmark pool (any folder of photos): scored by the retrieval member, searched by tune, applied
    make_competition(tmp_path / "other", landmarks=3, per_landmark=2, test=8, size=64, seed=7)
    pooled = _config().replace("[knn]\n", '[knn]\nnonlandmark_pool = "other/test"\n')
    (tmp_path / "glr.toml").write_text(pooled)
    res = glr("run", "glr.toml", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    redone = sorted(s for s, r in stages.items() if r["runs"] > manifest["stages"].get(s, {}).get("runs", 0))
    # what follows from them only when its inputs changed (an unchanged rescored table: no new submission)
    assert {"nonlandmark", "tune", "rescore"} <= set(redone) <= {"nonlandmark", "tune", "rescore", "submission",
                                                                  "report"}, redone
    pool_ids, _ = read_embeddings(lay.pool_embeddings("arc", "test"))
    assert len(pool_ids) == 8 and all(i.count("/") == 3 for i in pool_ids)  # ids: paths under the pool folder
    for part, folder in (("val", lay.localval), ("test", tmp_path / "comp")):
        nl = pd.read_parquet(lay.nonlandmark(part))
        assert sorted(nl["id"]) == sorted(pd.read_csv(folder / "sample_submission.csv")["id"])
        assert nl["nonlandmark"].between(0, 1).all() and nl["nonlandmark"].max() > 0
    # infer needs no pool folder: the run's test-model embeddings of the pool travel with it
    (tmp_path / "other").rename(tmp_path / "gone")
    out = glr("infer", "run", "--data-dir", "comp", "--out", "out2/submission.csv", "--expect-test", "100", "--json",
              "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "out2" / "submission.csv").read_bytes() == (tmp_path / "run" / "submission.csv").read_bytes()
    assert json.loads(out.stdout)["stages"]["nonlandmark"]["seconds"] > 0

    # [knn] is the member's own setting: changing it redoes its predictions, not its training
    (tmp_path / "glr.toml").write_text(_config().replace("k = 5", "k = 3"))
    plan = glr("run", "glr.toml", "--dry-run", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert re.search(r"train:arc\s+skip\s+unchanged", plan.stdout), plan.stdout
    assert re.search(r"predict:arc\s+run\s+config changed", plan.stdout), plan.stdout
    assert re.search(r"predict:vgg16\s+skip\s+unchanged", plan.stdout), plan.stdout


def test_a_models_kind_is_checked(tmp_path):
    from pipeline.run.config import validate

    with pytest.raises(Exception, match=r"\[\[models\]\] #1 kind: 'knn' is not one of classifier, retrieval"):
        validate({"models": [{"backbone": "vgg16", "kind": "knn"}]}, tmp_path)
    cfg = validate({"models": [{"backbone": "vgg16"}, {"backbone": "vgg16", "name": "r", "kind": "retrieval"}]},
                   tmp_path)
    assert "kind" not in cfg["models"][0] and cfg["models"][1]["kind"] == "retrieval"
    assert cfg["knn"]["k"] == 20 and cfg["knn"]["score"] == "sum"
    with pytest.raises(Exception, match=r"nonlandmark_pool: needs a retrieval member"):
        validate({"models": [{"backbone": "vgg16"}], "knn": {"nonlandmark_pool": "pool"}}, tmp_path)


def test_a_resumed_predict_stage_keeps_the_index_it_finished_and_a_fresh_one_drops_old_ones(tmp_path, monkeypatch):
    """At GLDv2 size an index is hours of embedding: an interrupted predict stage (same config, same inputs)
    keeps the index it finished; a fresh attempt first removes any index an earlier config left."""
    from types import SimpleNamespace

    import pipeline.model.knn
    import pipeline.model.predict
    from pipeline.model.embeddings import ids_path, partial_dir, write_embeddings
    from pipeline.run.config import validate
    from pipeline.run.engine import Context
    from pipeline.run.layout import Layout
    from pipeline.run.stages import plan

    calls, stop = [], []

    def embed(model_dir, **kwargs):
        calls.append(kwargs.get("split"))
        write_embeddings(kwargs["out"], ["a"], np.ones((1, 4)))
        return SimpleNamespace(seconds=0.0)

    def knn(*args, **kwargs):
        if stop:
            raise RuntimeError(stop.pop())
        return SimpleNamespace(seconds=0.0)

    monkeypatch.setattr(pipeline.model.predict, "embed", embed)
    monkeypatch.setattr(pipeline.model.knn, "knn", knn)
    cfg = validate({"data": {"data_dir": str(tmp_path / "comp")},
                    "models": [{"backbone": "vgg16", "name": "r", "kind": "retrieval"}]}, tmp_path)
    stage = next(s for s in plan(cfg) if s.name == "predict:r")
    lay = Layout(tmp_path / "run")
    val, test = lay.embeddings("r", "val", train=True), lay.embeddings("r", "test", train=True)

    def run(resume: bool) -> list:
        calls.clear()
        stage.action(Context(lay.root, cfg, {}, resume=resume, echo=lambda s: None))
        return sorted(calls)

    write_embeddings(val, ["old"], np.ones((1, 4)))  # an earlier config's indexes
    write_embeddings(test, ["old"], np.ones((1, 4)))
    stop.append("killed")  # a fresh attempt stops in the val part, after its index
    with pytest.raises(RuntimeError, match="killed"):
        run(resume=False)
    assert ids_path(val).read_text().split() == ["a"] and not test.exists()  # the old test index is gone
    assert run(resume=True) == ["test", "test", "train"]  # val's index kept; test's made
    assert run(resume=True) == ["test", "test"]  # both finished: kept
    partial_dir(test).mkdir()  # the test index was being written when the run stopped
    assert run(resume=True) == ["test", "test", "train"]
    assert run(resume=False) == ["test", "test", "train", "train"]  # a fresh attempt makes both anew
