"""`glr run --dry-run`'s costs: exact image counts, disk projections against a real tiny run, the fit warnings.

The counts are checked against the real split and selection functions on a long-tailed table
(caps active), and on a real competition folder through make_local_validation; the disk of the
decoded-image cache and of the predictions against what a real tiny run writes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.model.data import select_rows, stratified_split
from pipeline.run.config import validate
from pipeline.run.costs import (RATES, Counts, Limits, costed_plan, distinct_references, dry_run, format_plan,
                                localval_counts, read_counts, selection_counts, stage_costs)
from pipeline.run.localval import make_local_validation, split_ids

BIG = 1e15


def long_tailed(n_classes: int = 3000, seed: int = 0) -> pd.DataFrame:
    """A train table with Zipf-like class sizes 1…~2,000 (so max_per_class caps bite) and 16-hex ids."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.zipf(1.6, n_classes), 2000)
    lids = rng.choice(10 ** 6, n_classes, replace=False)
    n = int(sizes.sum())
    ids = np.char.mod("%016x", rng.choice(2 ** 62, n, replace=False))
    return pd.DataFrame({"id": ids.astype(str), "landmark_id": np.repeat(lids, sizes).astype(np.int64)})


def counts_of(train: pd.DataFrame, test: int = 100) -> Counts:
    ids, sizes = np.unique(train["landmark_id"].to_numpy(), return_counts=True)
    return Counts(ids, sizes.astype(np.int64), test)


LV = dict(holdout_frac=0.2, unseen_class_frac=0.1, min_train_per_class=2, seed=3)
MODEL = dict(max_per_class=40, min_per_class=2, val_frac=0.1, seed=5)


@pytest.mark.parametrize("max_queries", [0, 500])
def test_localval_and_selection_counts_equal_the_real_split(max_queries):
    train = long_tailed()
    counts = counts_of(train)
    lv = {**LV, "max_queries": max_queries}
    proj = localval_counts(counts, lv)
    subset, queries = split_ids(train, **lv)
    assert proj["train_images"] == len(subset) and proj["queries"] == len(queries)
    assert proj["train_classes"] == subset["landmark_id"].nunique()
    real_sizes = subset["landmark_id"].value_counts().reindex(counts.class_ids, fill_value=0).to_numpy()
    assert np.array_equal(proj["train_sizes"], real_sizes)
    landmark = int((queries["landmarks"] != "").sum())
    if max_queries:  # a random draw of the queries: the expected landmark share
        assert abs(proj["landmark_queries"] - landmark) < 0.1 * max_queries
    else:
        assert proj["landmark_queries"] == landmark

    for table, sizes in ((train, counts.class_sizes), (subset, proj["train_sizes"])):
        rows = stratified_split(select_rows(table, max_per_class=MODEL["max_per_class"],
                                            min_per_class=MODEL["min_per_class"], seed=MODEL["seed"]),
                                val_frac=MODEL["val_frac"], seed=MODEL["seed"])
        sel = selection_counts(sizes, MODEL)
        assert sel["selected"] == len(rows) and sel["classes"] == rows["landmark_id"].nunique()
        assert sel["val"] == int((rows["split"] == "val").sum()) and sel["train"] == int((rows["split"] == "train").sum())


def test_decoded_images_are_the_union_of_both_fits():
    """The image cache is keyed by image file: the split fit and the full fit share the images both select."""
    from pipeline.run.costs import _Plan, _Rates, RATES

    train = long_tailed()
    counts = counts_of(train)
    cfg = validate({"localval": {**LV, "max_queries": 0}, "train": {**MODEL, "final_fit": "all"},
                    "models": [{"backbone": "vgg16"}]})
    p = _Plan(cfg, counts, _Rates(RATES, 2))
    m = cfg["models"][0]
    first = p.add_rows(("images", 96), m, False)
    second = p.add_rows(("images", 96), m, True)
    assert p.add_rows(("images", 96), m, True) == 0  # the same selection again adds nothing
    subset, _ = split_ids(train, **cfg["localval"])
    a = set(select_rows(subset, max_per_class=40, min_per_class=2, seed=5)["id"])
    b = set(select_rows(train, max_per_class=40, min_per_class=2, seed=5)["id"])
    assert first == len(a)
    assert abs(first + second - len(a | b)) < 0.02 * len(a | b)


def test_distinct_references():
    sizes = np.array([1, 2, 100, 1000])
    refs, per_query = distinct_references(sizes, queries=10 ** 6, candidates=3, k=3, refs="random")
    assert refs == 1 + 2 + 3 + 3  # every class is a candidate: its fixed references, at most k
    assert per_query == pytest.approx(3 * (1 * 1 + 2 * 2 + 100 * 3 + 1000 * 3) / 1103)
    near, _ = distinct_references(sizes, queries=10 ** 6, candidates=3, k=3, refs="nearest")
    assert near == pytest.approx(sizes.sum(), rel=0.01)  # per-query references end up covering the classes
    assert distinct_references(sizes, 0, 3, 3, "random") == (0, 0.0)


def _competition(synth_comp: Path, tmp: Path) -> Path:
    """The synthetic competition with unequal class sizes (rows dropped from train.csv)."""
    comp = tmp / "comp"
    shutil.copytree(synth_comp, comp)
    train = pd.read_csv(comp / "train.csv", dtype={"id": str})
    keep = train.groupby("landmark_id").cumcount() < train["landmark_id"].rank(method="dense").astype(int) + 2
    train[keep.to_numpy()].to_csv(comp / "train.csv", index=False)
    return comp


def test_counts_equal_make_local_validation(synth_comp, tmp_path):
    comp = _competition(synth_comp, tmp_path)
    counts = read_counts(comp)
    assert counts.rows == len(pd.read_csv(comp / "train.csv")) and counts.test_images == 30
    lv = {**LV, "unseen_class_frac": 0.2, "max_queries": 0}
    real = make_local_validation(comp, tmp_path / "lv", **lv)
    proj = localval_counts(counts, lv)
    for key in ("train_images", "train_classes", "queries", "landmark_queries", "non_landmark_queries"):
        assert proj[key] == real[key], key


TINY = """
[run]
root = "."
[data]
data_dir = "comp"
[localval]
unseen_class_frac = 0.2
[train]
weights = "none"
image_size = 32
epochs = 1
fine_tune_epochs = 0
final_fit = "split"
[[models]]
backbone = "vgg16"
[predict]
batch_size = 8
"""


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


@pytest.mark.slow
def test_disk_projection_within_a_factor_of_a_real_tiny_run(synth_comp, tmp_path):
    """Decoded-image cache and prediction tables: projected vs written by the real stages (0.5–2×)."""
    from pipeline.caches import cache_root
    from pipeline.run.config import load_config
    from pipeline.run.engine import execute
    from pipeline.run.layout import layout_of
    from pipeline.run.stages import plan

    _competition(synth_comp, tmp_path)
    (tmp_path / "glr.toml").write_text(TINY)
    cfg = load_config(tmp_path / "glr.toml")
    wanted = {"data", "localval", "train:vgg16", "predict:vgg16"}
    stages = [s for s in plan(cfg) if s.name in wanted]
    execute(stages, layout_of(cfg).root, cfg, echo=lambda s: None)
    costs = stage_costs(cfg, read_counts(cfg["data"]["data_dir"]))
    run_dir = layout_of(cfg).root
    root = cache_root(cfg["data"]["data_dir"], cfg["run"]["cache_dir"])
    # the shared image store, or (older layout) the training run's own cache
    decoded = _bytes((root / "images").rglob("rows.bin")) + _bytes(run_dir.rglob("images_*.npy"))
    projected = costs["train:vgg16"].parts["decoded images"]
    assert 0.5 * projected <= decoded <= 2 * projected, (decoded, projected)
    lay = layout_of(cfg)
    written = _bytes([lay.predictions("vgg16", part) for part in ("val", "test")])
    projected = costs["predict:vgg16"].parts["predictions"]
    assert 0.5 * projected <= written <= 2 * projected, (written, projected)
    checkpoints = _bytes((run_dir / "models" / "vgg16").rglob("*"))
    projected = costs["train:vgg16"].parts["model checkpoints"]
    assert 0.5 * projected <= checkpoints <= 2 * projected, (checkpoints, projected)


def _plan(tmp_path: Path, synth_comp: Path, limits: Limits, extra: str = "") -> tuple[dict, str]:
    _competition(synth_comp, tmp_path)
    (tmp_path / "glr.toml").write_text(TINY + extra)
    lines: list[str] = []
    plan = dry_run(tmp_path / "glr.toml", limits=limits, echo=lines.append)
    return plan, "\n".join(lines)


def test_plan_prints_costs_and_keeps_the_engine_columns(synth_comp, tmp_path):
    plan, text = _plan(tmp_path, synth_comp, Limits(BIG, BIG, BIG, BIG, True))
    assert plan["fits"] and "warning" not in text
    import re

    assert re.search(r"train:vgg16\s+run\s+input from localval will be redone\s+\d+", text), text
    assert "peak RAM" in text and "total of the stages to run" in text
    rows = {s["stage"]: s for s in plan["stages"]}
    assert rows["train:vgg16"]["cost"]["images"] > 0 and rows["predict:vgg16"]["cost"]["disk_run_bytes"] > 0
    assert not (tmp_path / "glr" / "manifest.json").exists()  # a dry run writes nothing


def test_warnings_name_the_option_that_makes_it_fit(synth_comp, tmp_path):
    plan, text = _plan(tmp_path, synth_comp, Limits(ram=1.0e9, ram_available=1.0e9, run_free=1.0e6,
                                                    cache_free=1.0e6, same_disk=True))
    assert not plan["fits"]
    ram = [l for l in text.splitlines() if l.startswith("warning: train:vgg16 needs")]
    assert ram and "[train] head_batch_size" in ram[0], text
    disk = [l for l in text.splitlines() if l.startswith("warning: disk:")]
    assert len(disk) == 1 and "model checkpoints" in disk[0] and "[run] root on a bigger disk" in disk[0], text
    # the cache on its own, small disk: its largest part (the local features here) names the options
    plan, text = _plan(tmp_path / "b", synth_comp, Limits(BIG, BIG, BIG, 1.0e5, False), "[verify]\nextractor = \"orb\"\n")
    disk = [l for l in text.splitlines() if l.startswith("warning: disk:")]
    assert len(disk) == 1 and "the cache will hold" in disk[0] and "local features" in disk[0], text
    assert "[verify] n_features" in disk[0] and "[run] cache_dir on a bigger disk" in disk[0], text


def test_fixes_are_single_option_changes_that_fit():
    train = long_tailed()
    counts = counts_of(train, test=2000)
    cfg = validate({"localval": {**LV, "max_queries": 0}, "models": [{"backbone": "resnet50"}]})
    actions = [{"stage": name, "action": "run", "why": "never run"} for name in stage_costs(cfg, counts)]
    need = costed_plan(cfg, actions, run_dir="r", counts=counts, limits=Limits(BIG, BIG, BIG, BIG, True))["totals"]
    cache = need["disk_cache_bytes"]
    tight = Limits(BIG, BIG, BIG, cache * 0.8, False)  # the cache's disk 20% short
    plan = costed_plan(cfg, actions, run_dir="r", counts=counts, limits=tight)
    assert not plan["fits"] and "[train] bottleneck = false" in plan["fixes"]
    assert "warning: the whole run fits with any one of" in "\n".join(format_plan(plan))


def test_dry_run_json_through_the_cli(synth_comp, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli

    _competition(synth_comp, tmp_path)
    (tmp_path / "glr.toml").write_text(TINY)
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "glr.toml"), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert [s["stage"] for s in plan["stages"]][:3] == ["data", "localval", "train:vgg16"]
    assert plan["counts"]["test_images"] == 30 and plan["totals"]["seconds"] > 0
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "glr.toml"), "--json"])
    assert res.exit_code == 2 and "--dry-run" in res.output


def test_plan_without_the_competition_says_costs_are_unknown(tmp_path):
    (tmp_path / "glr.toml").write_text('[run]\nroot = "."\n[data]\ndata_dir = "nowhere"\n')
    lines: list[str] = []
    plan = dry_run(tmp_path / "glr.toml", echo=lines.append)
    assert plan["counts"] is None and plan["fits"]
    assert any(l.startswith("costs: unknown") for l in lines)


def test_a_retrieval_member_costs_its_index_and_its_search():
    """kind = retrieval: the training images of both parts embedded, q × N × dim × 2 FLOPs of exact search
    (the approximate index: faster, but its rows in RAM)."""
    counts = counts_of(long_tailed(), test=2000)
    member = {"backbone": "vgg16", "embedding_dim": 512}

    def predict(kind: str | None, refs: str = "random", **knn):
        cfg = validate({"localval": LV, "knn": knn, "verify": {"refs": refs},
                        "models": [{**member, **({"kind": kind} if kind else {})}]})
        return stage_costs(cfg, counts)["predict:vgg16"], cfg

    classifier, _ = predict(None)
    exact, cfg = predict("retrieval")
    assert exact.images > classifier.images and exact.parts["embeddings"] > 0 and "embeddings" not in classifier.parts
    # the same images embedded by a classifier for refs = nearest: the difference is the search alone
    nearest, _ = predict(None, refs="nearest")
    assert nearest.images == exact.images and nearest.parts["embeddings"] == exact.parts["embeddings"]
    lv = localval_counts(counts, cfg["localval"])
    flops = 2 * 512 * (lv["queries"] * lv["train_images"] + counts.test_images * counts.rows)
    assert exact.seconds - nearest.seconds == pytest.approx(flops / (RATES["knn_gflops"] * 1e9))
    ivf, _ = predict("retrieval", search="ivf")
    assert ivf.seconds < exact.seconds and ivf.ram >= counts.rows * 512 * 4
    half, _ = predict("retrieval", float16=True)
    assert half.parts["embeddings"] == exact.parts["embeddings"] / 2
