"""`glr infer`: the test-time half of a finished run, on any copy of its competition.

From a finished run folder (or a bundle of it, `glr bundle`) and a competition folder:
predict (each final model) → ensemble → verify (test) → rescore with the run's tuned policy →
submission.csv, checked against the folder's sample_submission.csv. Every step calls the same
helper as the run's stage (`pipeline.run.stages`: predict_part, ensemble_part, verify_part,
rescore_part; then `write_submission_file`) with the options of the run's saved config, so on
the run's own competition the submission is byte-identical to the run's.

Nothing in the source folder is written: the tables go to a work folder beside the output
(`<out>.infer/`), laid out as a run folder (`Layout`). Verification's feature cache is
`--cache-dir`, else the run's `[run] cache_dir` when that folder exists here, else the
competition's own (DATA_DIR/.glr-cache) when DATA_DIR is writable, else `<out folder>/.glr-cache`
(Kaggle mounts /kaggle/input read-only).

Time: before the full run, the chain runs on two disjoint samples of the test set (the first
[predict] batch_size images, then the next two batches; each in a competition folder of links,
with its own cold feature cache), timed per stage. The two points give each stage a fixed part
(graph tracing, process start) and a per-image part (`fit_costs`); loading the models is paid
once. With [verify] refs = nearest the training images' descriptors are timed on as many training
images as test images (a second sample folder) and get a per-training-image rate (BY_TRAIN), while
the samples' verification draws its references at random (same pairs, same images to extract).
A retrieval member's index (its embeddings of DATA_DIR's training images) is computed once, before
the samples, so their kNN searches the whole index and its time counts as spent. The
projection for `expect_test` images (default `expected_test_images`) and the competition's training
images adds them up, with the time already spent (the notebook's clock runs from its start). When
it exceeds `time_limit_h`, infer refuses with one line before the full run: nothing is written to `out`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from pipeline.run.config import is_retrieval, pool_member
from pipeline.run.layout import Layout
from submissions.errors import UserError

SAMPLE_BATCHES = 3  # test images timed before the full run: 3 predict batches (1, then 2 more)
# The hidden test sets Kaggle runs a submitted notebook on. GLR 2020 and 2021 score on GLDv2's
# recognition test set (117,577 images), of which the notebook sees ~1% (test/); an assumption
# rounded up, documented in docs/commands.md. Other competitions: the visible test set is all there is.
HIDDEN_TEST = {"landmark-recognition-2020": 120_000, "landmark-recognition-2021": 120_000}
ONCE = ("load",)  # stages whose time does not grow with the images
BY_TRAIN = ("references", "index")  # stages whose time grows with the training images (refs = nearest), not the test
CONFIG_FILE = "config.json"  # a bundle's copy of the run's validated config


# -- the source: a finished run folder, or a bundle -----------------------------------------------

def _final_stages(cfg: dict) -> list[str]:
    kind = "train_all" if cfg["train"]["final_fit"] == "all" else "train"
    return [f"{kind}:{m['name']}" for m in cfg["models"]] + ["tune"]


def infer_inputs(run_dir: str | os.PathLike) -> dict:
    """What `infer` reads from a finished run folder, for `glr bundle` to copy exactly that.

    Returns {"config": the run's validated config (write it as `config.json` at the bundle's root),
    "files": run-folder-relative paths (POSIX) of every file infer reads — each final model's
    model.keras, manifest.json, labels.json and tune/policy.json — to be copied to the same
    relative paths in the bundle}. Raises UserError when the run is not finished.
    """
    cfg = load_source(run_dir)[0]
    lay = Layout(Path(run_dir))
    from pipeline.run.stages import test_model_dir

    files = [lay.rel(p) for m in cfg["models"]
             for p in (test_model_dir(lay, cfg, m["name"]) / f for f in ("model.keras", "manifest.json", "labels.json"))]
    return {"config": cfg, "files": files + [lay.rel(p) for p in _pool_files(lay, cfg)] + [lay.rel(lay.policy)]}


def _pool_files(lay: Layout, cfg: dict) -> list[Path]:
    """[knn] nonlandmark_pool as the test model embedded it (rows and ids): infer needs no pool folder."""
    from pipeline.model.embeddings import ids_path

    member = pool_member(cfg)
    if member is None:
        return []
    rows = lay.pool_embeddings(member["name"], "test")
    return [rows, ids_path(rows)]


def load_source(source: str | os.PathLike) -> tuple[dict, Path]:
    """(config, folder) of a finished run folder (manifest.json with its config) or a bundle (config.json)."""
    src = Path(source)
    if not src.is_dir():
        raise UserError(f"{src}: no such folder (give a finished `glr run` folder or a `glr bundle` folder)")
    lay = Layout(src)
    manifest = _read_json(lay.manifest) if lay.manifest.is_file() else {}
    if "config" in manifest and "stages" in manifest:
        cfg, records = manifest["config"], manifest["stages"]
        pending = [s for s in _final_stages(cfg) if (records.get(s) or {}).get("status") != "done"]
        if pending:
            raise UserError(f"{src}: not a finished run (stage {pending[0]} has not finished); finish it with "
                            "`glr run CONFIG` first")
    elif (src / CONFIG_FILE).is_file():
        cfg = _read_json(src / CONFIG_FILE)
    else:
        raise UserError(f"{src}: neither a `glr run` folder (manifest.json with its config) nor a `glr bundle` "
                        f"folder ({CONFIG_FILE})")
    from pipeline.run.stages import test_model_dir

    needed = ([test_model_dir(lay, cfg, m["name"]) / "model.keras" for m in cfg["models"]] + _pool_files(lay, cfg)
              + [lay.policy])
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: missing; {src} is not a finished run (or a complete bundle)")
    return cfg, src


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


# -- where things go ---------------------------------------------------------------------------

def _writable(path: Path) -> bool:
    from submissions.files import check_writable

    try:
        check_writable(path, folder=True)
    except UserError:
        return False
    return True


def choose_cache_dir(cfg: dict, data_dir: Path, out: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """--cache-dir; else the run's [run] cache_dir if it exists here; else DATA_DIR/.glr-cache if DATA_DIR is
    writable; else <out folder>/.glr-cache (a read-only competition, as /kaggle/input)."""
    from pipeline.caches import DEFAULT_NAME, cache_root

    if cache_dir:
        return Path(cache_dir)
    run_cache = cfg["run"].get("cache_dir")
    if run_cache and Path(run_cache).is_dir():
        return Path(run_cache)
    if _writable(data_dir):
        return cache_root(data_dir)
    return out.parent / DEFAULT_NAME


def expected_test_images(cfg: dict, visible: int) -> int:
    """The default --expect-test: the hidden test set's size for GLR 2020/2021 (`HIDDEN_TEST`), else the visible."""
    return max(visible, HIDDEN_TEST.get(cfg["data"].get("competition", ""), 0))


def _sample_competition(data_dir: Path, folder: Path, start: int, n: int, train_rows: int | None = None) -> Path:
    """A competition folder of links to DATA_DIR's files whose test set is `n` of its test images from `start`
    (and, with `train_rows`, whose train.csv is that many rows of DATA_DIR's from the same place)."""
    import shutil

    from pipeline.acquire.competition import Competition

    comp = Competition(data_dir)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in ("train.csv", "train", "test", "index"):
        if (data_dir / name).exists() and not (name == "train.csv" and train_rows):
            (folder / name).symlink_to((data_dir / name).resolve())
    if train_rows:
        rows = comp.train
        rows.iloc[start % max(len(rows) - train_rows, 1):][:train_rows].to_csv(folder / "train.csv", index=False)
    ids = comp.test_ids[start:start + n]
    sample = comp.sample_submission
    if sample is not None:
        sample.iloc[start:start + n].to_csv(folder / "sample_submission.csv", index=False)
    else:
        import pandas as pd

        pd.DataFrame({"id": ids, "landmarks": ""}).to_csv(folder / "sample_submission.csv", index=False)
    return folder


# -- the chain ----------------------------------------------------------------------------------

def _indexes(cfg: dict, src: Path, data_dir: Path, work: Layout) -> dict[str, Path]:
    """Each retrieval member's index: `glr embed` of DATA_DIR's training images (once, before the samples,
    so their kNN searches the full index: its time is counted as spent, not projected)."""
    from pipeline.run.stages import embed_index, test_model_dir

    out = {}
    for m in cfg["models"]:
        if is_retrieval(m):
            out[m["name"]] = work.embeddings(m["name"], "test", train=True)
            embed_index(cfg, test_model_dir(Layout(src), cfg, m["name"]), data_dir, out[m["name"]])
    return out


def _chain(cfg: dict, src: Path, data_dir: Path, work: Layout, cache: Path, workers: int | None,
           indexes: dict[str, Path], refs_dir: Path | None = None) -> dict[str, float]:
    """[references →] predict → ensemble → verify → rescore on one competition folder; seconds per stage.

    `indexes`: the retrieval members' (`_indexes`). `refs_dir` (a timed sample): the references'
    descriptors are computed on that folder's training images (a sample of them), and verification
    draws its references at random — the same number of pairs and images to extract, without the
    descriptors of every training image. A retrieval first model's index serves as the references.
    """
    from pipeline.run.stages import (ensemble_part, member_part, nonlandmark_part, predict_refs, rescore_part,
                                     test_model_dir, verify_part)

    lay, secs = Layout(src), {}
    models = cfg["models"]
    names = [m["name"] for m in models]
    refs, nearest = None, cfg["verify"]["refs"] == "nearest"
    if nearest and is_retrieval(models[0]):
        refs = None if refs_dir else (None, indexes[names[0]])
    elif nearest:  # the training images' descriptors: they grow with train, not test
        refs = (work.train_predictions(names[0], "test"), work.embeddings(names[0], "test", train=True))
        t = time.perf_counter()
        predict_refs(cfg, test_model_dir(lay, cfg, names[0]), refs_dir or data_dir, *refs)
        secs["references"] = time.perf_counter() - t
        if refs_dir:
            refs = None
    t, streamed = time.perf_counter(), 0.0
    for i, (name, m) in enumerate(zip(names, models)):
        queries = (nearest and i == 0) or is_retrieval(m)
        streamed += member_part(cfg, m, test_model_dir(lay, cfg, name), data_dir, work.predictions(name, "test"),
                                embeddings=work.embeddings(name, "test") if queries else None,
                                index=indexes.get(name))
    secs["load"] = time.perf_counter() - t - streamed  # reading the models and the test list: once
    secs["predict"] = streamed
    t = time.perf_counter()
    ensemble_part(cfg, [work.predictions(n, "test") for n in names], work.ensemble("test"))
    secs["ensemble"] = time.perf_counter() - t
    t = time.perf_counter()
    overrides = {"workers": workers} if workers is not None else {}
    verify_part(cfg, work.ensemble("test"), data_dir, work.inliers("test"), cache,
                embeddings=(work.embeddings(names[0], "test"), refs[1]) if refs else None,
                **overrides, **({"refs": "random"} if refs_dir else {}))
    secs["verify"] = time.perf_counter() - t
    nonlandmark = None
    pool = pool_member(cfg)
    if pool:  # the queries against the pool the run's test model embedded
        t, nonlandmark = time.perf_counter(), work.nonlandmark("test")
        nonlandmark_part(cfg, work.embeddings(pool["name"], "test"), lay.pool_embeddings(pool["name"], "test"),
                         nonlandmark)
        secs["nonlandmark"] = time.perf_counter() - t
    t = time.perf_counter()
    rescore_part(work.ensemble("test"), work.inliers("test"), lay.policy, work.rescored("test"), nonlandmark)
    secs["rescore"] = time.perf_counter() - t
    return secs


def _samples(n: int) -> tuple[int, int]:
    """Sizes of the two disjoint samples, `n` test images in all: a third, then the rest (with n =
    3 predict batches, one batch then two, so that padding the last batch does not hide the slope)."""
    if n < 2:
        return n, 0
    return n // 3 or 1, n - (n // 3 or 1)


def fit_costs(a: int, ta: dict[str, float], b: int, tb: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Per stage (fixed seconds, seconds per image) from two disjoint samples of `a` < `b` images.

    t = fixed + n·per_image through both points: model loading and graph tracing are paid once.
    Timing noise can make the slope meaningless (≤ 0 or above the larger sample's whole time per
    image); then every second of the larger sample counts per image (no fixed part): conservative.
    """
    out = {}
    for k, t_b in tb.items():
        if k in ONCE:
            out[k] = (t_b, 0.0)
            continue
        t_a = ta.get(k, 0.0)
        per = (t_b - t_a) / (b - a) if b > a else 0.0
        if not 0 < per <= t_b / max(b, 1):
            per = t_b / max(b, 1)
        out[k] = (max(t_b - b * per, 0.0), per)
    return out


def project(costs: dict[str, tuple[float, float]], n: int, train: int = 0) -> float:
    """Seconds for `n` test images (and `train` training images, for the stages in BY_TRAIN): each stage's
    fixed part plus its images × its per-image seconds."""
    return sum(f + (train if k in BY_TRAIN else n) * per for k, (f, per) in costs.items())


def _hours(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def infer(source: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike, *,
          expect_test: int | None = None, time_limit_h: float = 12.0, workers: int | None = None,
          cache_dir: str | os.PathLike | None = None, sample: int | None = None,
          echo: Callable[[str], None] = print) -> dict:
    """Write `out` (submission.csv) from a finished run or bundle `source` and the competition `data_dir`.

    Returns {"submission", "rows", "predicted", "test_images", "expect_test", "time_limit_h", "projected_s",
    "sample": {"images", "costs": {stage: {fixed_s, per_image_s}}}, "stages": {stage: {seconds, images_per_s}},
    "seconds", "work", "cache_dir"}. Raises UserError, before the full run and with nothing written to `out`,
    when the projected time of `expect_test` images exceeds `time_limit_h` hours.
    """
    import shutil

    from pipeline.acquire.competition import Competition
    from submissions.format import write_submission_file

    cfg, src = load_source(source)
    data_dir, out = Path(data_dir), Path(out).absolute()
    visible = len(Competition(data_dir).test_ids)
    if not visible:
        raise UserError(f"{data_dir}: no test images (sample_submission.csv lists none): nothing to infer")
    expect = int(expect_test) if expect_test else expected_test_images(cfg, visible)
    work = Layout(out.parent / f"{out.name}.infer")
    work.root.mkdir(parents=True, exist_ok=True)
    cache = choose_cache_dir(cfg, data_dir, out, cache_dir)
    echo(f"infer {src} on {data_dir}: {visible:,} test images; cache {cache}; work folder {work.root}")
    t_all = time.perf_counter()

    nearest = cfg["verify"]["refs"] == "nearest"
    retrieval = any(is_retrieval(m) for m in cfg["models"])
    n_train = len(Competition(data_dir).train) if nearest or retrieval else 0
    t = time.perf_counter()
    indexes = _indexes(cfg, src, data_dir, work)
    index_s = time.perf_counter() - t
    a, b = _samples(min(sample or SAMPLE_BATCHES * cfg["predict"]["batch_size"], visible))
    timed = []
    for i, (start, n) in enumerate([(0, a), (a, b)]):
        if n == 0:
            continue
        folder = work.root / f"sample-{i}"  # its own cold cache: the images the full run has not seen
        comp = _sample_competition(data_dir, folder / "competition", start, n)
        # refs = nearest: the references' descriptors timed on as many training images as test images
        refs_dir = _sample_competition(data_dir, folder / "refs", start, n, train_rows=n) if nearest else None
        timed.append((n, _chain(cfg, src, comp, Layout(folder / "work"), folder / "cache", workers, indexes,
                                refs_dir)))
    (na, ta), (nb, tb) = timed[0], timed[-1]
    costs = fit_costs(na if len(timed) > 1 else 0, ta if len(timed) > 1 else {}, nb, tb)
    # the notebook's clock runs from its start: what the references and the samples took counts too
    projected = time.perf_counter() - t_all + project(costs, expect, n_train)
    limit_s = time_limit_h * 3600
    echo(f"sample: {a + b} test images, " + ", ".join(f"{k} {1 / per:,.1f} images/s" if per else f"{k} {f:.1f} s"
                                                    for k, (f, per) in costs.items())
         + f"; projected for {expect:,} test images: {_hours(projected)} (limit {_hours(limit_s)})")
    for i in range(2):
        shutil.rmtree(work.root / f"sample-{i}", ignore_errors=True)
    if projected > limit_s:
        raise UserError(f"projected time {_hours(projected)} for {expect:,} test images exceeds the limit of "
                        f"{_hours(limit_s)} (--time-limit); no submission written — use fewer/smaller models or "
                        "verification candidates, or a larger --time-limit")
    secs = {**({"index": index_s} if indexes else {}), **_chain(cfg, src, data_dir, work, cache, workers, indexes)}
    t = time.perf_counter()
    info = write_submission_file(work.rescored("test"), data_dir, out)
    secs["submission"] = time.perf_counter() - t
    total = time.perf_counter() - t_all
    for k, s in secs.items():
        echo(f"  {k:<12} {s:8.1f} s  {_rate(visible, s, k, n_train)}")
    echo(f"submission: {out} ({info['rows']:,} rows, {info['predicted']:,} predicted) in {total:.1f} s")
    return {"submission": str(out), "rows": int(info["rows"]), "predicted": int(info["predicted"]),
            "test_images": visible, "expect_test": expect, "time_limit_h": time_limit_h,
            "projected_s": round(projected, 3),
            "sample": {"images": a + b, "train_images": n_train,
                       "costs": {k: {"fixed_s": round(f, 3), "per_image_s": round(per, 9)}
                                 for k, (f, per) in costs.items()}},
            "stages": _figures(secs, visible, n_train), "seconds": round(total, 3), "work": str(work.root),
            "cache_dir": str(cache)}


def _rate(n: int, s: float, stage: str, train: int = 0) -> str:
    if stage in BY_TRAIN:
        return f"{train / s:,.1f} training images/s" if s > 0 else "-"
    return "once" if stage in ONCE else f"{n / s:,.1f} images/s" if s > 0 else "-"


def _figures(secs: dict[str, float], n: int, train: int = 0) -> dict:
    """Seconds and images/s per stage (training images/s for the references; None for what is paid once)."""
    return {k: {"seconds": round(s, 3), "images_per_s": None if k in ONCE or s <= 0
                else round((train if k in BY_TRAIN else n) / s, 2)} for k, s in secs.items()}
