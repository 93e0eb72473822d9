"""The stages of `glr run`: one top-level function per stage kind, and `plan`, which orders them.

Each stage function calls the same public function as the stage's command (`glr train`,
`glr predict`, …) with the options of its config section, reads and writes only the paths
its `Layout` names, and returns the metrics recorded in the manifest. `plan` says which
stage reads which (its deps) and what it writes (its outputs): the engine does the rest.
Heavy libraries are imported inside the stages, so planning a run costs nothing.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from pipeline.run.config import is_retrieval, pool_member
from pipeline.run.engine import Context, Stage, execute, file_digest, hash_obj, tree_stat_digest
from pipeline.run.layout import PARTS, Layout, data_files, layout_of, solution_of
from submissions.files import atomic_write_json, json_default


def _data_dir(ctx: Context) -> Path:
    return Path(ctx.cfg["data"]["data_dir"])


def _part_dir(ctx: Context, part: str) -> Path:
    """Where a part's images and labels are: the local validation folder, or the competition."""
    return ctx.layout.localval if part == "val" else _data_dir(ctx)


def _evaluate(preds_path: Path, data_dir: Path) -> dict | None:
    """GAP and top-1 accuracy of a predictions table against the folder's solution.csv, if it has one."""
    from submissions.metric import evaluate_predictions

    solution = solution_of(data_dir)
    if solution is None:
        return None
    res = evaluate_predictions(preds_path, solution)
    return {"gap": float(res["gap"]), "accuracy": float(res["accuracy"])}


def jsonable(obj: Any) -> Any:
    """Metrics as plain JSON for the manifest (numpy scalars as numbers, tables dropped, the rest as text)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not hasattr(v, "to_parquet")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return json_default(obj)


# -- one step on one competition folder: what the stages and `glr infer` (pipeline.run.infer) share ---

def test_model_dir(lay: Layout, cfg: dict, model: str) -> Path:
    """The model that predicts the real test set: models_all/<m> when [train] final_fit = "all", else models/<m>."""
    return lay.model_dir(model, cfg["train"]["final_fit"] == "all")


def predict_part(cfg: dict, model_dir: Path, data_dir: Path, out: Path, embeddings: Path | None = None):
    """`glr predict` of a test split with the run's [predict] options (the query embeddings when asked)."""
    from pipeline.model.predict import predict

    return predict(model_dir, data_dir, split="test", out=out, embeddings=embeddings, **cfg["predict"])


def predict_refs(cfg: dict, model_dir: Path, data_dir: Path, out: Path, embeddings: Path):
    """The training images' predictions and embeddings: the references of [verify] refs = nearest."""
    from pipeline.model.predict import predict

    return predict(model_dir, data_dir, split="train", out=out, embeddings=embeddings, **cfg["predict"])


def embed_part(cfg: dict, model_dir: Path, out: Path, **images):
    """`glr embed` with the run's [predict] batch and precision and [knn] storage; `images`: data_dir and
    split, or a folder (`images=`)."""
    from pipeline.model.predict import embed

    p = cfg["predict"]
    return embed(model_dir, out=out, batch_size=p["batch_size"], precision=p["precision"],
                 float16=cfg["knn"]["float16"], **images)


def embed_index(cfg: dict, model_dir: Path, data_dir: Path, out: Path):
    """A folder's training images embedded: a retrieval member's index (grows with train, not test)."""
    return embed_part(cfg, model_dir, out, data_dir=data_dir, split="train")


def retrieval_part(cfg: dict, model_dir: Path, data_dir: Path, out: Path, queries: Path, index: Path) -> float:
    """A retrieval member's predictions of a folder's test images: `glr embed` of them into `queries`, then
    `glr knn` among `index` (embed_index) with the run's [knn] options. Returns the seconds spent."""
    from pipeline.model.knn import knn

    q = embed_part(cfg, model_dir, queries, data_dir=data_dir, split="test")
    res = knn(queries, index, labels=Path(data_dir) / "train.csv", out=out, top_k=cfg["predict"]["top_k"],
              **knn_options(cfg))
    return q.seconds + res.seconds


def knn_options(cfg: dict) -> dict:
    """The run's [knn] keys that are `glr knn`'s options (not the embeddings' storage, not the pool's)."""
    from pipeline.options import KNN

    return {o.name: cfg["knn"][o.name] for o in KNN.options if o.cli}


def member_part(cfg: dict, model: dict, model_dir: Path, data_dir: Path, out: Path,
                embeddings: Path | None = None, index: Path | None = None) -> float:
    """One [[models]] member's predictions of a folder's test images (a classifier's `glr predict`, or
    retrieval_part, whose `index` embed_index wrote); returns the seconds spent streaming images."""
    if is_retrieval(model):
        return retrieval_part(cfg, model_dir, data_dir, out, queries=embeddings, index=index)
    return predict_part(cfg, model_dir, data_dir, out, embeddings=embeddings).seconds


def nonlandmark_part(cfg: dict, queries: Path, pool: Path, out: Path) -> dict:
    """`glr nonlandmark` of a folder's query embeddings against the pool's (both by the same model)."""
    from pipeline.model.nonlandmark import nonlandmark

    kn = cfg["knn"]
    return nonlandmark(queries, pool, out=out, k=kn["nonlandmark_k"], block_size=kn["block_size"],
                       query_block=kn["query_block"], backend=kn["backend"])


def ensemble_part(cfg: dict, paths: list[Path], out: Path):
    """`glr ensemble` of the models' tables (in [[models]] order) with the run's [ensemble] options."""
    from pipeline.model.ensemble import ensemble

    e = cfg["ensemble"]
    return ensemble(paths, weights=e["weights"] or None, out=out, top_k=e["top_k"])


def verify_part(cfg: dict, preds: Path, data_dir: Path, out: Path, cache_dir: Path,
                embeddings: tuple[Path, Path] | None = None, **overrides):
    """`glr verify` with the run's [verify] options; `embeddings` (queries', references') serve refs = nearest."""
    from pipeline.verify.inliers import verify

    v = {**cfg["verify"], "cache_dir": cache_dir, **overrides}
    if v["refs"] == "nearest":
        v.update(embeddings=embeddings[0], ref_embeddings=embeddings[1])
    return verify(preds, data_dir, out, **v)


def rescore_part(preds: Path, inliers: Path, policy: Path, out: Path, nonlandmark: Path | None = None) -> None:
    """`glr rescore`: the tuned policy applied to an ensemble table and its inliers (and the queries'
    non-landmark signal, when the run has a pool)."""
    from submissions.tables import read_inliers, read_predictions, write_predictions
    from tuning.policy import rescore

    write_predictions(rescore(read_predictions(preds), read_inliers(inliers), str(policy),
                              str(nonlandmark) if nonlandmark else None), out)


# -- the stages, in run order ---------------------------------------------------------------------

def data_stage(ctx: Context) -> dict:
    """Fetch when asked, then check the competition opens; its CSV digests feed every later stage."""
    from pipeline.acquire.competition import Competition

    d, data_dir = ctx.cfg["data"], _data_dir(ctx)
    if d["fetch"]:
        from pipeline.acquire.kaggle import fetch

        fetch(d["competition"], data_dir, files=d["files"] or None)
    summary = Competition(data_dir).summary()
    # the state the fingerprint took (~10 s of stat at GLDv2 size), unless the fetch just changed it
    state = _competition_state(data_dir) if d["fetch"] else ctx.external
    files = {Path(k).name: v for k, v in state["files"].items()}
    atomic_write_json(ctx.layout.data_summary, {"summary": summary, "files": files, "images": state["images"]})
    return summary


def localval_stage(ctx: Context) -> dict:
    from pipeline.run.localval import make_local_validation

    s = make_local_validation(_data_dir(ctx), ctx.layout.localval, overwrite=True, **ctx.cfg["localval"])
    return {k: s[k] for k in ("train_images", "train_classes", "queries", "landmark_queries",
                              "non_landmark_queries")}


def train_stage(ctx: Context, model: dict, full: bool) -> dict:
    """`glr train` of one [[models]] entry: on the local-validation split, or (`full`) on all of train."""
    import shutil

    from pipeline.caches import cache_root
    from pipeline.model.train import train

    out = ctx.layout.model_dir(model["name"], full)
    if out.exists() and not ctx.resume:
        shutil.rmtree(out)  # a stale run of another config, written by this stage: start afresh
    options = {k: v for k, v in model.items() if k not in ("name", "backbone", "kind")}
    source = _data_dir(ctx) if full else ctx.layout.localval
    # one cache for both fits: the local-validation folder's images are links to the competition's
    cache_dir = ctx.cfg["run"]["cache_dir"] or cache_root(_data_dir(ctx))
    m = train(source, backbone=model["backbone"], out=out, resume=ctx.resume, cache_dir=cache_dir, **options)
    return jsonable({k: m.get(k) for k in ("final", "best", "timings", "n_classes", "resumed", "caches")})


def _finished_embeddings(path: Path) -> bool:
    """`glr embed` finished writing `path`: rows and ids there, no progress folder left."""
    from pipeline.model.embeddings import ids_path, partial_dir

    return path.is_file() and ids_path(path).is_file() and not partial_dir(path).exists()


def _remove_embeddings(path: Path) -> None:
    from pipeline.model.embeddings import ids_path

    path.unlink(missing_ok=True)
    ids_path(path).unlink(missing_ok=True)


def predict_stage(ctx: Context, model: dict, embeddings: bool) -> dict:
    """One model's predictions of both parts (val by the split model; test by the model final_fit chose):
    `glr predict`, or for a retrieval member `glr embed` of the part's training and test images + `glr knn`."""
    lay, name = ctx.layout, model["name"]
    folders = {"val": lay.model_dir(name), "test": test_model_dir(lay, ctx.cfg, name)}
    out: dict = {"models": {part: lay.rel(f) for part, f in folders.items()}}
    retrieval = is_retrieval(model)
    if retrieval and not ctx.resume:  # a fresh attempt: no index of another config may pass for this one's
        for part in PARTS:
            _remove_embeddings(lay.embeddings(name, part, train=True))
    for part in PARTS:
        ddir, target = _part_dir(ctx, part), lay.predictions(name, part)
        queries, index = lay.embeddings(name, part), lay.embeddings(name, part, train=True)
        # its index is also the references of refs = nearest; an interrupted attempt's finished index is
        # kept (at GLDv2 size it is hours of embedding)
        if retrieval and not (ctx.resume and _finished_embeddings(index)):
            embed_index(ctx.cfg, folders[part], ddir, index)
        member_part(ctx.cfg, model, folders[part], ddir, target,
                    embeddings=queries if embeddings or retrieval else None, index=index)
        if embeddings and not retrieval:  # references for refs = nearest: the training images of the same folder
            predict_refs(ctx.cfg, folders[part], ddir, lay.train_predictions(name, part), index)
        out[part] = _evaluate(target, ddir)
    return out


def ensemble_stage(ctx: Context) -> dict:
    lay = ctx.layout
    out = {}
    for part in PARTS:
        paths = [lay.predictions(m["name"], part) for m in ctx.cfg["models"]]
        ensemble_part(ctx.cfg, paths, lay.ensemble(part))
        out[part] = _evaluate(lay.ensemble(part), _part_dir(ctx, part))
    return out


def verify_stage(ctx: Context, part: str) -> dict:
    from pipeline.caches import cache_root

    lay = ctx.layout
    # the competition's cache for both parts: the validation folder's images are links to its files
    cache = cache_root(_data_dir(ctx), ctx.cfg["run"]["cache_dir"])
    first = ctx.cfg["models"][0]["name"]  # refs = nearest: the first model's global descriptors choose
    result = verify_part(ctx.cfg, lay.ensemble(part), _part_dir(ctx, part), lay.inliers(part), cache,
                         embeddings=(lay.embeddings(first, part), lay.embeddings(first, part, train=True)))
    return {"pairs": int(len(result.table))}


def nonlandmark_stage(ctx: Context, model: dict) -> dict:
    """Both parts' queries scored against [knn] nonlandmark_pool, embedded by the part's model of `model`
    (the test one's embeddings of the pool are what `glr infer` reuses)."""
    lay, name = ctx.layout, model["name"]
    folders = {"val": lay.model_dir(name), "test": test_model_dir(lay, ctx.cfg, name)}
    out = {}
    for part in PARTS:
        embed_part(ctx.cfg, folders[part], lay.pool_embeddings(name, part), images=ctx.cfg["knn"]["nonlandmark_pool"])
        out[part] = nonlandmark_part(ctx.cfg, lay.embeddings(name, part), lay.pool_embeddings(name, part),
                                     lay.nonlandmark(part))
    return out


def tune_stage(ctx: Context) -> dict:
    """`glr tune` on the validation part; a policy that loses on the held-out queries gives way to identity."""
    from pipeline.progress import enabled
    from tuning.search import tune

    lay, t = ctx.layout, dict(ctx.cfg["tune"])
    # a study per input: trials of another ensemble / inlier table must not be mixed in
    t["study"] = t["study"] or f"{ctx.cfg['run']['name']}-{hash_obj(ctx.records['tune']['inputs'])[:10]}"
    inputs = (lay.ensemble("val"), lay.inliers("val"), lay.localval_solution, lay.policy)
    if pool_member(ctx.cfg):
        t["nonlandmark"] = lay.nonlandmark("val")
    res = tune(*inputs, **t, progress=enabled())  # honours `glr run --quiet`, like every other stage's bar
    if not res["accepted"] and not t["force"]:
        ctx.echo(f"warning: {res['message']}\nwarning: continuing with the identity policy (no rescoring); "
                 "set [tune] force = true to use the tuned one anyway")
        refused = res["message"]
        res = tune(*inputs, **{**t, "policy": "identity", "force": True, "study": t["study"] + "-identity"},
                   progress=enabled())
        res = {**res, "fallback": f"tuned policy refused ({refused}); identity policy used"}
    return jsonable(res)


def rescore_stage(ctx: Context) -> dict:
    lay, out = ctx.layout, {}
    pool = pool_member(ctx.cfg)
    for part in PARTS:
        rescore_part(lay.ensemble(part), lay.inliers(part), lay.policy, lay.rescored(part),
                     lay.nonlandmark(part) if pool else None)
        out[part] = _evaluate(lay.rescored(part), _part_dir(ctx, part))
    return out


def submission_stage(ctx: Context) -> dict:
    """`glr write-submission` of the rescored test predictions, scored when the competition has a solution."""
    from submissions.format import write_submission_file

    lay = ctx.layout
    info = write_submission_file(lay.rescored("test"), _data_dir(ctx), lay.submission)
    out = {"path": str(lay.submission), "rows": info["rows"], "predicted": info["predicted"]}
    test = _evaluate(lay.rescored("test"), _data_dir(ctx))
    if test is not None:
        out["test"] = test
    return out


def bundle_stage(ctx: Context) -> dict:
    """`glr bundle` of this run into RUN/bundle (its size is in the stage record)."""
    from pipeline.run.bundle import build_bundle

    return build_bundle(ctx.run_dir, ctx.layout.bundle, ctx.cfg["kaggle"]["dataset"], echo=lambda m: None)


def notebook_stage(ctx: Context) -> dict:
    """`glr notebook` for the run's competition into RUN/kernel."""
    from pipeline.acquire.notebook import write_notebook

    k = ctx.cfg["kaggle"]
    res = write_notebook(ctx.run_dir, ctx.cfg["data"]["competition"], k["dataset"], ctx.layout.kernel,
                         kernel=k["kernel"] or None)
    return {"kernel": res["kernel"], "notebook": res["notebook"], "enable_gpu": res["enable_gpu"]}


def _upload_notebook(ctx: Context) -> dict:
    """The code-competition route: upload the bundle, push the notebook, wait for Kaggle's run, submit it."""
    from pipeline.acquire.kaggle import push_kernel, submit_kernel, upload_dataset, wait_kernel

    k = ctx.cfg["kaggle"]
    out = {"dataset": upload_dataset(ctx.layout.bundle, notes=k["message"]), "push": push_kernel(ctx.layout.kernel)}
    kernel, version = out["push"]["kernel"], out["push"]["version"]
    out["wait"] = wait_kernel(kernel, version=version)
    out["submit"] = submit_kernel(kernel, ctx.cfg["data"]["competition"], k["message"], version=version)
    return out


def upload_stage(ctx: Context) -> dict:
    from pipeline.acquire.kaggle import submit

    k = ctx.cfg["kaggle"]
    if k["notebook"]:
        res = jsonable(_upload_notebook(ctx))
        atomic_write_json(ctx.layout.upload, res)
        return res
    res = jsonable(submit(str(ctx.layout.submission), ctx.cfg["data"]["competition"], k["message"],
                          data_dir=_data_dir(ctx)))
    atomic_write_json(ctx.layout.upload, res)
    return res


def report_stage(ctx: Context) -> dict:
    from pipeline.run.report import write_report

    return {"path": str(write_report(ctx.run_dir, ctx.cfg, ctx.records))}


def _competition_state(data_dir: str | Path) -> dict:
    """What the data stage's fingerprint covers: the CSVs' contents and every image's size and mtime,
    so images replaced in place redo every stage that read them."""
    root = Path(data_dir)
    return {"files": file_digest(*data_files(root)),
            "images": {split: tree_stat_digest(root / split) for split in ("train", "test", "index")}}


# -- the graph ------------------------------------------------------------------------------------

def plan(cfg: dict) -> list[Stage]:
    """The stages of a run, in order, from a validated config (see pipeline.run.config).

    train:<model> learns the local-validation split's training part (the models tuning is honest
    about); with [train] final_fit = "all", train_all:<model> retrains the same settings on the
    whole competition training set, and those models predict the real test set.
    """
    lay, models = layout_of(cfg), cfg["models"]
    names = [m["name"] for m in models]
    data_dir = cfg["data"]["data_dir"]
    final_all = cfg["train"]["final_fit"] == "all"
    nearest = cfg["verify"]["refs"] == "nearest"
    rel = lay.rel
    stages = [
        Stage("data", data_stage, config=cfg["data"], outputs=[rel(lay.data_summary)],
              external=lambda: _competition_state(data_dir)),
        Stage("localval", localval_stage, deps=["data"], config=cfg["localval"], outputs=[rel(lay.localval)],
              digest=[rel(p) for p in lay.localval_digest_files]),
    ]
    for kind, full, source in [("train", False, "localval")] + ([("train_all", True, "data")] if final_all else []):
        for m in models:
            f = lay.model_files(m["name"], full)
            # the kind is not a training option: turning a member into a retrieval one keeps its models
            stages.append(Stage(f"{kind}:{m['name']}", partial(train_stage, model=m, full=full), deps=[source],
                                config={k: v for k, v in m.items() if k != "kind"},
                                outputs=[rel(f["model"]), rel(f["manifest"])],
                                digest=[rel(f["model"]), rel(f["labels"])]))
    for i, (name, m) in enumerate(zip(names, models)):
        emb, retrieval = nearest and i == 0, is_retrieval(m)
        outputs = [rel(lay.predictions(name, part)) for part in PARTS]
        if emb or retrieval:
            outputs += [rel(lay.embeddings(name, part, train)) for part in PARTS for train in (False, True)]
        deps = ["data", "localval", f"train:{name}"] + ([f"train_all:{name}"] if final_all else [])
        stages.append(Stage(f"predict:{name}", partial(predict_stage, model=m, embeddings=emb), deps=deps,
                            config={"predict": cfg["predict"], "embeddings": emb,
                                    **({"retrieval": {**knn_options(cfg), "float16": cfg["knn"]["float16"]}}
                                       if retrieval else {}),
                                    **({"test_models": rel(lay.model_dir("", full=True))} if final_all else {})},
                            outputs=outputs))
    stages.append(Stage("ensemble", ensemble_stage, deps=[f"predict:{n}" for n in names],
                        config={"ensemble": cfg["ensemble"], "models": names},
                        outputs=[rel(lay.ensemble(part)) for part in PARTS]))
    for part in PARTS:
        deps = ["ensemble", "localval" if part == "val" else "data"] + ([f"predict:{names[0]}"] if nearest else [])
        stages.append(Stage(f"verify:{part}", partial(verify_stage, part=part), deps=deps, config=cfg["verify"],
                            outputs=[rel(lay.inliers(part))]))
    pool = pool_member(cfg)
    if pool:
        kn = cfg["knn"]
        stages.append(Stage("nonlandmark", partial(nonlandmark_stage, model=pool), deps=[f"predict:{pool['name']}"],
                            config={k: kn[k] for k in ("nonlandmark_pool", "nonlandmark_k", "float16")},
                            outputs=[rel(p) for part in PARTS for p in (lay.pool_embeddings(pool["name"], part),
                                                                         lay.nonlandmark(part))],
                            external=lambda: tree_stat_digest(kn["nonlandmark_pool"])))
    with_pool = ["nonlandmark"] if pool else []
    stages += [
        Stage("tune", tune_stage, deps=["localval", "ensemble", "verify:val", *with_pool], config=cfg["tune"],
              outputs=[rel(lay.policy)], digest=[rel(lay.policy)]),
        Stage("rescore", rescore_stage, deps=["ensemble", "verify:val", "verify:test", "tune", *with_pool],
              outputs=[rel(lay.rescored(part)) for part in PARTS]),
        Stage("submission", submission_stage, deps=["data", "rescore"], config=cfg["submission"],
              outputs=[rel(lay.submission)]),
    ]
    if cfg["kaggle"]["notebook"]:
        finals = [f"{'train_all' if final_all else 'train'}:{n}" for n in names]
        kaggle_cfg = {"dataset": cfg["kaggle"]["dataset"], "kernel": cfg["kaggle"]["kernel"]}
        # the bundle holds the run's config (config.json): any option but [kaggle] and [report] redoes it
        bundled = {**{k: v for k, v in cfg.items() if k not in ("kaggle", "report")}, "kaggle": kaggle_cfg}
        stages.append(Stage("bundle", bundle_stage, deps=[*finals, "tune"], config=bundled,
                            outputs=[rel(lay.bundle)]))
        stages.append(Stage("notebook", notebook_stage, deps=["bundle"], config=kaggle_cfg,
                            outputs=[rel(lay.kernel)]))
    if cfg["kaggle"]["submit"]:
        deps = ["submission"] + (["notebook"] if cfg["kaggle"]["notebook"] else [])
        stages.append(Stage("upload", upload_stage, deps=deps, config=cfg["kaggle"],
                            outputs=[rel(lay.upload)]))
    stages.append(Stage("report", report_stage, deps=[s.name for s in stages], config=cfg["report"],
                        outputs=[rel(lay.report)]))
    return stages


def run(config: str | Path | dict, *, from_stage: str | None = None, only: str | None = None,
        dry_run: bool = False, echo=print) -> dict:
    """Run (or with `dry_run`, plan) the pipeline of a config file or a config dict; return the manifest.

    The whole config is checked against the option schema before any stage runs.
    """
    from pipeline.run.config import load_config, validate

    cfg = load_config(config) if not isinstance(config, dict) else validate(config)
    return execute(plan(cfg), layout_of(cfg).root, cfg, from_stage=from_stage, only=only, dry_run=dry_run,
                   echo=echo)
