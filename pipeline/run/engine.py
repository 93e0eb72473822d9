"""`glr run`: the stages of a competitor's day, driven by one config, each skipped when unchanged.

A stage writes its artefacts into the run folder, then its record goes into
`<run>/manifest.json` (atomically): fingerprint = hash of the stage's config slice, the
content digests of the artefacts it reads (its input stages' outputs) and of outside inputs
(the competition's CSVs); plus the digest of what it wrote. On a re-run a stage is skipped
when its fingerprint matches and its artefacts are still there, unchanged. So a run killed in
any stage, re-run, redoes only the unfinished stage and what depends on it, and changing
only the tuning budget redoes only tuning and what follows.

The engine (`execute`) knows nothing about landmarks; `plan` builds the real stage graph.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import package_versions
from pipeline.progress import enabled as progress_enabled
from submissions.errors import UserError
from submissions.files import atomic_write_text, sha256_file

MANIFEST = "manifest.json"
LOCK = ".glr-run.lock"


@dataclass
class Stage:
    """One step: `action(ctx)` writes `outputs` (paths relative to the run folder) and returns metrics."""

    name: str
    action: Callable[["Context"], dict]
    deps: list[str] = field(default_factory=list)
    config: Any = None
    outputs: list[str] = field(default_factory=list)
    digest: list[str] | None = None  # files/folders hashed as the stage's output (default: outputs)
    external: Callable[[], Any] | None = None  # outside inputs' digest (e.g. the competition's CSVs)

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]


@dataclass
class Context:
    """What an action sees: the run folder, the config, and the finished stages' records."""

    run_dir: Path
    cfg: dict
    records: dict[str, dict]
    resume: bool = False  # the stage was interrupted before with the same config and inputs
    echo: Callable[[str], None] = print


    def path(self, rel: str) -> Path:
        return self.run_dir / rel

    def metrics(self, stage: str) -> dict:
        return self.records.get(stage, {}).get("metrics", {})


# -- digests ----------------------------------------------------------------------------------

def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def digest_paths(root: Path, rels: list[str]) -> str | None:
    """Content digest of files / folders (every file inside, by relative path); None if one is missing."""
    h = hashlib.sha256()
    for rel in rels:
        p = root / rel
        if p.is_file():
            h.update(f"F {rel}\n".encode())
            _hash_file(h, p)
        elif p.is_dir():
            for sub in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
                h.update(f"F {sub.relative_to(root)}\n".encode())
                _hash_file(h, sub)
        else:
            return None
    return h.hexdigest()


def _hash_obj(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(*paths: Path) -> dict:
    """Digest of outside files (absent ones as None), for a stage's `external`."""
    out = {}
    for p in paths:
        p = Path(p)
        if p.is_file():
            out[str(p)] = sha256_file(p)
        else:
            out[str(p)] = None
    return out


# -- manifest ---------------------------------------------------------------------------------

def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return {"stages": {}}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable run manifest ({e}); delete it to redo every stage") from None
    data.setdefault("stages", {})
    return data


def _write_manifest(run_dir: Path, manifest: dict) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(run_dir / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """One `glr run` per run folder; the OS drops the lock when the process dies (kill -9)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir}: another `glr run` is working in this run folder; wait for it or "
                            "use another [run] name") from None
        yield


# -- selection --------------------------------------------------------------------------------

def _select(stages: list[Stage], name: str, option: str) -> list[int]:
    hits = [i for i, s in enumerate(stages) if s.name == name or s.kind == name]
    if not hits:
        names = ", ".join(dict.fromkeys([s.kind for s in stages] + [s.name for s in stages]))
        raise UserError(f"{option} {name}: no such stage; stages: {names}")
    return hits


# -- engine -----------------------------------------------------------------------------------

def _decide(stage: Stage, rec: dict | None, inputs: dict, config_hash: str, external: Any,
            run_dir: Path) -> tuple[bool, str]:
    """(run?, why) for a stage given its previous record and its current inputs."""
    if not rec or rec.get("status") != "done":
        return True, "not finished before" if rec else "never run"
    if rec.get("config_hash") != config_hash:
        return True, "config changed"
    old_inputs = rec.get("inputs", {})
    for dep, d in inputs.items():
        if old_inputs.get(dep) != d:
            return True, f"input from {dep} changed"
    if _hash_obj(external) != rec.get("external_hash"):
        return True, "outside input changed (competition files)"
    for rel in stage.outputs:
        if not (run_dir / rel).exists():
            return True, f"output {rel} missing"
    if digest_paths(run_dir, stage.digest if stage.digest is not None else stage.outputs) != rec.get("digest"):
        return True, "output modified since it was written"
    return False, "unchanged"


def execute(stages: list[Stage], run_dir: str | os.PathLike, cfg: dict | None = None, *,
            from_stage: str | None = None, only: str | None = None, dry_run: bool = False,
            echo: Callable[[str], None] = print) -> dict:
    """Run `stages` in order into `run_dir`, skipping those whose fingerprint is unchanged.

    `from_stage`: that stage and all after it are redone; earlier ones are used as they are.
    `only`: just that stage is redone. `dry_run`: print the plan (run/skip and why), run nothing.
    Returns the manifest.
    """
    run_dir = Path(run_dir)
    if from_stage and only:
        raise UserError("--from and --only cannot be combined")
    names = [s.name for s in stages]
    for s in stages:
        for d in s.deps:
            if d not in names[: names.index(s.name)]:
                raise ValueError(f"stage {s.name} depends on {d}, which does not come before it")
    forced: set[int] = set()
    limited: set[int] | None = None
    if from_stage:
        first = min(_select(stages, from_stage, "--from"))
        forced = set(range(first, len(stages)))
        limited = forced
    if only:
        forced = set(_select(stages, only, "--only"))
        limited = forced

    lock = contextlib.nullcontext() if dry_run else _run_lock(run_dir)
    with lock:
        manifest = read_manifest(run_dir)
        records: dict[str, dict] = manifest["stages"]
        manifest["plan"] = names
        if cfg is not None:
            manifest["config"] = cfg
        manifest["versions"] = _versions()
        ctx = Context(run_dir, cfg or {}, records, echo=echo)
        will_run: set[str] = set()
        current: dict[str, str | None] = {}  # stage -> digest of its outputs now
        plan_rows = []
        for i, stage in enumerate(stages):
            rec = records.get(stage.name)
            if limited is not None and i not in limited:
                missing = [o for o in stage.outputs if not (run_dir / o).exists()]
                if (not rec or rec.get("status") != "done" or missing) and any(
                        stage.name in stages[j].deps for j in limited):
                    raise UserError(f"stage {stage.name} has not finished (needed by the stages you asked for); "
                                    "run without --from/--only first")
                current[stage.name] = rec.get("digest") if rec else None
                plan_rows.append((stage.name, "keep", "not selected"))
                continue
            config_hash = _hash_obj(stage.config)
            pending = [d for d in stage.deps if d in will_run]
            if dry_run and pending:
                will_run.add(stage.name)
                plan_rows.append((stage.name, "run", f"input from {pending[0]} will be redone"))
                continue
            inputs = {d: current.get(d) for d in stage.deps}
            external = stage.external() if stage.external else None
            if i in forced:
                run, why = True, f"forced by {'--only' if only else '--from'}"
            else:
                run, why = _decide(stage, rec, inputs, config_hash, external, run_dir)
            plan_rows.append((stage.name, "run" if run else "skip", why))
            if dry_run:
                if run:
                    will_run.add(stage.name)
                else:
                    current[stage.name] = rec.get("digest")
                continue
            if not run:
                current[stage.name] = rec["digest"]
                echo(f"[skip] {stage.name}: {why}")
                continue
            echo(f"[run ] {stage.name}: {why}")
            ctx.resume = bool(rec and rec.get("status") == "running" and rec.get("config_hash") == config_hash
                              and rec.get("inputs") == inputs and i not in forced)
            records[stage.name] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "config_hash": config_hash, "inputs": inputs, "runs": (rec or {}).get("runs", 0)}
            _write_manifest(run_dir, manifest)
            t0 = time.perf_counter()
            try:
                metrics = stage.action(ctx) or {}
            except MissingStage:
                raise
            except UserError as e:  # say which stage, keep the one-line message
                raise UserError(f"stage {stage.name}: {e}") from None
            seconds = time.perf_counter() - t0
            missing = [o for o in stage.outputs if not (run_dir / o).exists()]
            if missing:
                raise RuntimeError(f"stage {stage.name} finished without writing {', '.join(missing)}")
            digest = digest_paths(run_dir, stage.digest if stage.digest is not None else stage.outputs)
            current[stage.name] = digest
            records[stage.name] = {
                "status": "done", "config_hash": config_hash, "inputs": inputs,
                "external_hash": _hash_obj(external), "digest": digest,
                "fingerprint": _hash_obj([config_hash, inputs, _hash_obj(external)]),
                "started": records[stage.name]["started"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": round(seconds, 3), "runs": (rec or {}).get("runs", 0) + 1, "metrics": metrics,
                "outputs": stage.outputs,
            }
            _write_manifest(run_dir, manifest)
            echo(f"[done] {stage.name} in {seconds:.1f} s")
        if dry_run:
            width = max(len(n) for n in names) if names else 0
            echo(f"plan for {run_dir}:")
            for name, what, why in plan_rows:
                echo(f"  {name:<{width}}  {what:<4}  {why}")
        manifest["last_plan"] = [{"stage": n, "action": a, "why": w} for n, a, w in plan_rows]
        if not dry_run:
            _write_manifest(run_dir, manifest)
    return manifest


def _versions() -> dict:
    return package_versions("glr", "tensorflow", "keras", "numpy", "pandas", "optuna", "opencv-python-headless",
                            "kaggle")


# -- the real stage graph ---------------------------------------------------------------------

class MissingStage(UserError):
    """A stage's implementation is not importable in this checkout."""


def _fn(module: str, name: str, stage: str):
    """Import `module.name` lazily (TensorFlow stays unloaded until a stage needs it)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            raise MissingStage(f"stage {stage} needs {module}.{name}, but {module} is not installed in this checkout")
        raise
    try:
        return getattr(mod, name)
    except AttributeError:
        raise MissingStage(f"stage {stage} needs {module}.{name}, which {module} does not define") from None


def _call(func, section: str, fixed: dict, options: dict):
    """Call `func(**fixed, **options)`, options restricted to keywords it takes (pass-through keys checked)."""
    import inspect

    from pipeline.run.config import DEFAULTS, check_kwargs

    params = inspect.signature(func).parameters
    extra = {k: v for k, v in options.items() if k not in DEFAULTS.get(section, {})}
    check_kwargs(f"[{section}]", func, extra)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in options.items() if (takes_any or k in params) and k not in fixed}
    return func(**fixed, **kwargs)


# stage kind -> (module, function) it calls; checked before anything runs
IMPLEMENTATIONS = {
    "data": [("pipeline.acquire.competition", "Competition")],
    "localval": [("pipeline.run.localval", "make_local_validation")],
    "train": [("pipeline.model.train", "train")],
    "train_all": [("pipeline.model.train", "train")],
    "predict": [("pipeline.model.predict", "predict")],
    "ensemble": [("pipeline.model.ensemble", "ensemble")],
    "verify": [("pipeline.verify.inliers", "verify")],
    "tune": [("tuning.search", "tune")],
    "rescore": [("tuning.policy", "rescore")],
    "submission": [("submissions.format", "submission_from_predictions"),
                   ("submissions.format", "write_submission"), ("submissions.format", "check_submission")],
    "upload": [("pipeline.acquire.kaggle", "submit")],
    "report": [("pipeline.run.report", "write_report")],
}


def missing_implementations(stages: list[Stage]) -> dict[str, str]:
    """{stage kind: why} for each stage function that cannot be imported (a stage still being written)."""
    out: dict[str, str] = {}
    for kind in dict.fromkeys(s.kind for s in stages):
        for module, name in IMPLEMENTATIONS.get(kind, []):
            try:
                _fn(module, name, kind)
            except MissingStage as e:
                out.setdefault(kind, str(e))
    return out


PASS_THROUGH_FUNCS = {"train": ("pipeline.model.train", "train"), "predict": ("pipeline.model.predict", "predict"),
                      "ensemble": ("pipeline.model.ensemble", "ensemble"), "verify": ("pipeline.verify.inliers", "verify"),
                      "tune": ("tuning.search", "tune")}


def check_options(cfg: dict, missing: dict | None = None) -> None:
    """Before anything runs: every extra key of a stage section must be a keyword of its function."""
    from pipeline.run.config import DEFAULTS, check_kwargs

    for section, (module, name) in PASS_THROUGH_FUNCS.items():
        if missing and section in missing:
            continue
        func = _fn(module, name, section)
        extra = {k: v for k, v in cfg[section].items() if k not in DEFAULTS[section]}
        check_kwargs(f"[{section}]", func, extra)
        if section == "train":
            for i, m in enumerate(cfg["models"], 1):
                extra = {k: v for k, v in m.items() if k not in DEFAULTS["train"] and k not in ("name", "backbone")}
                check_kwargs(f"[[models]] #{i}", func, extra)


def run_dir_of(cfg: dict) -> Path:
    return Path(cfg["run"]["root"]) / cfg["run"]["name"]


def _data_files(data_dir: str) -> list[Path]:
    root = Path(data_dir)
    return [root / n for n in ("train.csv", "test.csv", "sample_submission.csv", "solution.csv")]


def _solution(data_dir: str | Path) -> Path | None:
    p = Path(data_dir) / "solution.csv"
    return p if p.exists() else None


def _evaluate(preds_path: Path, solution: Path | None) -> dict | None:
    """GAP and top-1 accuracy of a predictions table (rank 0 = the prediction) against a solution."""
    if solution is None:
        return None
    from submissions.format import read_solution, submission_from_predictions
    from submissions.metric import evaluate
    from submissions.tables import read_predictions

    res = evaluate(submission_from_predictions(read_predictions(preds_path)), read_solution(solution))
    return {"gap": float(res["gap"]), "accuracy": float(res["accuracy"])}


def plan(cfg: dict) -> list[Stage]:
    """The stages of a run, in order, from a validated config (see pipeline.run.config)."""
    data_dir = cfg["data"]["data_dir"]
    models = cfg["models"]
    refs_nearest = cfg["verify"]["refs"] == "nearest"
    stages: list[Stage] = []

    # data: fetch when asked, then check the competition opens; its CSV digests feed every later stage
    def data(ctx: Context) -> dict:
        d = ctx.cfg["data"]
        if d["fetch"]:
            fetch = _fn("pipeline.acquire.kaggle", "fetch", "data")
            fetch(d["competition"], data_dir, files=d["files"] or None)
        from pipeline.acquire.competition import Competition

        summary = Competition(data_dir).summary()
        body = {"summary": summary, "files": {Path(k).name: v for k, v in file_digest(*_data_files(data_dir)).items()}}
        atomic_write_text(ctx.path("data.json"), json.dumps(body, indent=2, sort_keys=True) + "\n")
        return summary

    stages.append(Stage("data", data, config=cfg["data"], outputs=["data.json"],
                        external=lambda: file_digest(*_data_files(data_dir))))

    def localval(ctx: Context) -> dict:
        from pipeline.run.localval import make_local_validation

        s = make_local_validation(data_dir, ctx.path("localval"), overwrite=True, **ctx.cfg["localval"])
        return {k: s[k] for k in ("train_images", "train_classes", "queries", "landmark_queries",
                                  "non_landmark_queries")}

    stages.append(Stage("localval", localval, deps=["data"], config=cfg["localval"], outputs=["localval"],
                        digest=["localval/train.csv", "localval/solution.csv", "localval/localval.json"]))

    # train:<model> learns the local-validation split's training part (the models tuning is honest
    # about); with [train] final_fit = "all", train_all:<model> retrains the same settings on the
    # whole competition training set, and those models predict the real test set
    final_all = cfg["train"]["final_fit"] == "all"
    sources = [("train", "localval", "models")] + ([("train_all", "data", "models_all")] if final_all else [])
    for kind, source, folder in sources:
        for m in models:
            name = m["name"]

            def train_stage(ctx: Context, m=m, name=name, kind=kind, source=source, folder=folder) -> dict:
                import shutil

                train = _fn("pipeline.model.train", "train", f"{kind}:{name}")
                out = ctx.path(f"{folder}/{name}")
                if out.exists() and not ctx.resume:
                    shutil.rmtree(out)  # stale run of another config: start afresh
                options = {k: v for k, v in m.items() if k not in ("name", "backbone")}
                ddir = ctx.path("localval") if source == "localval" else Path(data_dir)
                manifest = _call(train, "train", {"data_dir": str(ddir), "backbone": m["backbone"],
                                                  "out": str(out), "resume": ctx.resume}, options)
                m_ = manifest if isinstance(manifest, dict) else {}
                return _jsonable({"final": m_.get("final"), "best": m_.get("best"), "timings": m_.get("timings"),
                                  "n_classes": m_.get("n_classes"), "resumed": m_.get("resumed")})

            stages.append(Stage(f"{kind}:{name}", train_stage, deps=[source], config=m,
                                outputs=[f"{folder}/{name}/model.keras", f"{folder}/{name}/manifest.json"],
                                digest=[f"{folder}/{name}/model.keras", f"{folder}/{name}/labels.json"]))

    for i, m in enumerate(models):
        name = m["name"]
        emb = refs_nearest and i == 0
        # which models predict which part: tuning data always from the split models
        folders = {"val": f"models/{name}", "test": f"models_all/{name}" if final_all else f"models/{name}"}

        def predict_stage(ctx: Context, name=name, emb=emb, folders=folders) -> dict:
            predict = _fn("pipeline.model.predict", "predict", f"predict:{name}")
            p = ctx.cfg["predict"]
            out: dict = {"models": dict(folders)}
            for part, ddir in (("val", ctx.path("localval")), ("test", Path(data_dir))):
                run = str(ctx.path(folders[part]))
                target = ctx.path(f"preds/{name}.{part}.parquet")
                fixed = {"run_dir": run, "data_dir": str(ddir), "split": "test", "out": str(target)}
                if emb:
                    fixed["embeddings"] = str(ctx.path(f"preds/{name}.{part}.emb.npy"))
                _call(predict, "predict", fixed, p)
                if emb:  # references for --refs nearest: the training images of the same folder
                    _call(predict, "predict", {"run_dir": run, "data_dir": str(ddir), "split": "train",
                                               "out": str(ctx.path(f"preds/{name}.{part}.train.parquet")),
                                               "embeddings": str(ctx.path(f"preds/{name}.{part}.train.emb.npy"))}, p)
                out[part] = _evaluate(target, _solution(ddir))
            return out

        outputs = [f"preds/{name}.val.parquet", f"preds/{name}.test.parquet"]
        if emb:
            outputs += [f"preds/{name}.{part}{t}.emb.npy" for part in ("val", "test") for t in ("", ".train")]
        deps = ["data", "localval", f"train:{name}"] + ([f"train_all:{name}"] if final_all else [])
        stages.append(Stage(f"predict:{name}", predict_stage, deps=deps,
                            config={"predict": cfg["predict"], "embeddings": emb,
                                    **({"test_models": "models_all"} if final_all else {})},
                            outputs=outputs))

    def ensemble_stage(ctx: Context) -> dict:
        ensemble = _fn("pipeline.model.ensemble", "ensemble", "ensemble")
        e = dict(ctx.cfg["ensemble"])
        weights = e.pop("weights") or None
        out = {}
        for part in ("val", "test"):
            target = ctx.path(f"ens.{part}.parquet")
            paths = [str(ctx.path(f"preds/{m['name']}.{part}.parquet")) for m in models]
            _call(ensemble, "ensemble", {"paths": paths, "weights": weights, "out": str(target)}, e)
            out[part] = _evaluate(target, _solution(ctx.path("localval") if part == "val" else data_dir))
        return out

    stages.append(Stage("ensemble", ensemble_stage, deps=[f"predict:{m['name']}" for m in models],
                        config={"ensemble": cfg["ensemble"], "models": [m["name"] for m in models]},
                        outputs=["ens.val.parquet", "ens.test.parquet"]))

    for part in ("val", "test"):
        def verify_stage(ctx: Context, part=part) -> dict:
            verify = _fn("pipeline.verify.inliers", "verify", f"verify:{part}")
            v = dict(ctx.cfg["verify"])
            v["cache_dir"] = v.get("cache_dir") or str(ctx.path("features"))
            ddir = ctx.path("localval") if part == "val" else Path(data_dir)
            fixed = {"preds": str(ctx.path(f"ens.{part}.parquet")), "data_dir": str(ddir),
                     "out": str(ctx.path(f"inliers.{part}.parquet"))}
            if refs_nearest:
                first = models[0]["name"]
                fixed["embeddings"] = str(ctx.path(f"preds/{first}.{part}.emb.npy"))
                fixed["ref_embeddings"] = str(ctx.path(f"preds/{first}.{part}.train.emb.npy"))
            df = _call(verify, "verify", fixed, v)
            return {"pairs": int(len(df)) if df is not None else None}

        deps = ["ensemble", "localval" if part == "val" else "data"]
        if refs_nearest:
            deps.append(f"predict:{models[0]['name']}")
        stages.append(Stage(f"verify:{part}", verify_stage, deps=deps, config=cfg["verify"],
                            outputs=[f"inliers.{part}.parquet"]))

    def tune_stage(ctx: Context) -> dict:
        tune = _fn("tuning.search", "tune", "tune")
        t = dict(ctx.cfg["tune"])
        # a study per input: trials of another ensemble / inlier table must not be mixed in
        t["storage"] = t.get("storage") or None
        t["study"] = t.get("study") or f"{ctx.cfg['run']['name']}-{_hash_obj(ctx.records['tune']['inputs'])[:10]}"
        t["timeout"] = t.get("timeout") or None
        fixed = {"preds": str(ctx.path("ens.val.parquet")), "inliers": str(ctx.path("inliers.val.parquet")),
                 "solution": str(ctx.path("localval/solution.csv")), "out": str(ctx.path("tune/policy.json")),
                 "progress": progress_enabled()}  # honours `glr run --quiet`, like every other stage's bar
        try:
            res = _call(tune, "tune", fixed, t)
        except UserError as e:
            if t.get("force"):
                raise
            # the tuned policy lost on the held-out part: the run goes on without rescoring
            ctx.echo(f"warning: {e}\nwarning: continuing with the identity policy (no rescoring); "
                     "set [tune] force = true to use the tuned one anyway")
            res = _call(tune, "tune", fixed, {**t, "policy": "identity", "force": True,
                                              "study": t["study"] + "-identity"})
            res = {**res, "fallback": f"tuned policy refused ({e}); identity policy used"}
        return _jsonable(res)

    stages.append(Stage("tune", tune_stage, deps=["localval", "ensemble", "verify:val"], config=cfg["tune"],
                        outputs=["tune/policy.json"], digest=["tune/policy.json"]))

    def rescore_stage(ctx: Context) -> dict:
        rescore = _fn("tuning.policy", "rescore", "rescore")
        from submissions.tables import read_inliers, read_predictions, write_predictions

        out = {}
        for part in ("val", "test"):
            preds = read_predictions(ctx.path(f"ens.{part}.parquet"))
            inliers = read_inliers(ctx.path(f"inliers.{part}.parquet"))
            target = ctx.path(f"rescored.{part}.parquet")
            write_predictions(rescore(preds, inliers, str(ctx.path("tune/policy.json"))), target)
            out[part] = _evaluate(target, _solution(ctx.path("localval") if part == "val" else data_dir))
        return out

    stages.append(Stage("rescore", rescore_stage, deps=["ensemble", "verify:val", "verify:test", "tune"],
                        outputs=["rescored.val.parquet", "rescored.test.parquet"]))

    sub_file = cfg["submission"]["file"]

    def submission_stage(ctx: Context) -> dict:
        from submissions.format import (align_submission, check_submission, read_solution, read_submission,
                                        submission_from_predictions, write_submission)
        from submissions.tables import read_predictions

        from pipeline.acquire.competition import Competition

        comp = Competition(data_dir)
        sub = submission_from_predictions(read_predictions(ctx.path("rescored.test.parquet")))
        sub = align_submission(sub, comp.test_ids)
        target = ctx.path(sub_file)
        write_submission(sub, target)
        check_submission(target, comp.sample_submission_path)
        out = {"path": str(target), "rows": int(len(sub)), "predicted": int(sub["landmark_id"].notna().sum())}
        if comp.solution_path is not None:
            from submissions.metric import evaluate

            res = evaluate(read_submission(target), read_solution(comp.solution_path))
            out["test"] = {k: float(res[k]) for k in ("gap", "accuracy")}
        return out

    stages.append(Stage("submission", submission_stage, deps=["data", "rescore"], config=cfg["submission"],
                        outputs=[sub_file]))

    if cfg["kaggle"]["submit"]:
        def upload_stage(ctx: Context) -> dict:
            submit = _fn("pipeline.acquire.kaggle", "submit", "upload")
            res = submit(str(ctx.path(sub_file)), cfg["data"]["competition"], cfg["kaggle"]["message"],
                         data_dir=data_dir)
            atomic_write_text(ctx.path("upload.json"), json.dumps(_jsonable(res), indent=2) + "\n")
            return _jsonable(res)

        stages.append(Stage("upload", upload_stage, deps=["submission"], config=cfg["kaggle"],
                            outputs=["upload.json"]))

    def report_stage(ctx: Context) -> dict:
        write_report = _fn("pipeline.run.report", "write_report", "report")
        return {"path": str(write_report(ctx.run_dir, ctx.cfg, ctx.records))}

    stages.append(Stage("report", report_stage, deps=[s.name for s in stages], config=cfg["report"],
                        outputs=["report.html"]))
    return stages


def _jsonable(obj: Any) -> Any:
    """Metrics as plain JSON (numpy scalars, paths, DataFrames dropped)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not hasattr(v, "to_parquet")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (ValueError, AttributeError):
            return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def run(config: str | os.PathLike | dict, *, from_stage: str | None = None, only: str | None = None,
        dry_run: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run (or with `dry_run`, plan) the pipeline of a config file; return the manifest.

    Before anything runs, every stage's implementation is imported: a missing one is one
    error listing all of them.
    """
    from pipeline.run.config import load_config, validate

    cfg = load_config(config) if not isinstance(config, dict) else validate(config)
    stages = plan(cfg)
    missing = missing_implementations(stages)
    check_options(cfg, missing)
    if not missing or dry_run:
        return execute(stages, run_dir_of(cfg), cfg, from_stage=from_stage, only=only, dry_run=dry_run, echo=echo)
    # run what can run (its work is kept), then say exactly what is missing
    first = next(i for i, s in enumerate(stages) if s.kind in missing)
    echo(f"warning: stopping before stage {stages[first].name}: " + "; ".join(missing.values()))
    if first and not (only or from_stage):
        execute(stages[:first], run_dir_of(cfg), cfg, echo=echo)
    raise MissingStage(f"cannot finish the run: {'; '.join(missing.values())}")


def tune_parts(metrics: dict) -> dict:
    """{'tuning': (before, after), 'held-out': (before, after)} GAPs from `tune`'s result, when present."""
    out = {}
    for part, key in (("tuning", "tune"), ("held-out", "holdout")):
        d = metrics.get(key)
        if isinstance(d, dict) and "before" in d and "after" in d:
            b, a = d["before"], d["after"]
            b = b.get("gap") if isinstance(b, dict) else b
            a = a.get("gap") if isinstance(a, dict) else a
            out[part] = (b, a)
    return out


def summary_rows(manifest: dict) -> list[tuple[str, float | None, float | None]]:
    """(what, GAP on the local validation queries, GAP on the competition's test set or None)."""
    stages = manifest.get("stages", {})

    def gaps(name: str) -> tuple[float | None, float | None]:
        m = stages.get(name, {}).get("metrics", {}) or {}
        val, test = m.get("val") or {}, m.get("test") or {}
        return val.get("gap"), test.get("gap")

    rows = []
    for name in manifest.get("plan", []):
        if name.startswith("predict:"):
            rows.append((f"model {name.split(':', 1)[1]}", *gaps(name)))
    rows.append(("ensemble", *gaps("ensemble")))
    rows.append(("ensemble + rescoring", *gaps("rescore")))
    return rows


def predicting_models(manifest: dict) -> str | None:
    """One line saying which models produced the test predictions (None before any predict stage ran).

    Read from what the predict stages recorded, so a run folder says what really happened.
    """
    stages = manifest.get("stages", {})
    folders = {}
    for name in manifest.get("plan", []):
        rec = stages.get(name, {})
        if name.startswith("predict:") and rec.get("status") == "done":
            model = name.split(":", 1)[1]
            folders[model] = ((rec.get("metrics") or {}).get("models") or {}).get("test", f"models/{model}")
    if not folders:
        return None
    full = [m for m, f in folders.items() if f.startswith("models_all/")]
    split = [m for m in folders if m not in full]
    if not split:
        return (f"test predictions: models retrained on the full training set ({', '.join(folders.values())}); "
                "local val: the split models (models/)")
    line = (f"test predictions: the local-validation models ({', '.join(folders[m] for m in split)}), which never "
            "saw the left-out classes nor the held-out images ([train] final_fit = \"all\" retrains on everything)")
    if full:
        line += f"; retrained on the full training set: {', '.join(folders[m] for m in full)}"
    return line


def summary_table(manifest: dict) -> str:
    """The final table `glr run` / `glr demo` print: GAPs, time per stage, submission and report paths."""
    stages = manifest.get("stages", {})

    def f(x):
        return "    -" if x is None else f"{x:.4f}"

    rows = summary_rows(manifest)
    has_test = any(t is not None for _, _, t in rows)
    lines = ["", f"{'GAP':<24} {'local val':>10}" + (f" {'test':>8}" if has_test else "")]
    for what, val, test in rows:
        lines.append(f"{what:<24} {f(val):>10}" + (f" {f(test):>8}" if has_test else ""))
    which = predicting_models(manifest)
    if which:
        import textwrap

        lines += textwrap.wrap(which, 100, subsequent_indent="  ", break_on_hyphens=False)
    parts = tune_parts(stages.get("tune", {}).get("metrics", {}) or {})
    if parts:
        lines += ["", f"{'rescoring (local val)':<24} {'before':>10} {'after':>8}"]
        for part, (before, after) in parts.items():
            lines.append(f"  {part + ' part':<22} {f(before):>10} {f(after):>8}")
    lines += ["", "time per stage"]
    total = 0.0
    skipped = {r["stage"] for r in manifest.get("last_plan", []) if r["action"] == "skip"}
    for name in manifest.get("plan", []):
        rec = stages.get(name, {})
        sec = rec.get("seconds")
        if sec is None:
            lines.append(f"  {name:<20} {'not run':>9}")
            continue
        note = "  (skipped now: unchanged)" if name in skipped else ""
        if name not in skipped:
            total += sec
        lines.append(f"  {name:<20} {sec:>8.1f}s{note}")
    lines.append(f"  {'total (this run)':<20} {total:>8.1f}s")
    sub = stages.get("submission", {}).get("metrics", {}).get("path")
    rep = stages.get("report", {}).get("metrics", {}).get("path")
    lines += ["", f"submission: {sub or '-'}", f"report:     {rep or '-'}"]
    return "\n".join(lines)
