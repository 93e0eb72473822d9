"""The `glr run` configuration: one TOML file that names every stage's settings.

Read with the standard library's `tomllib` and checked key by key against the option schema
(`pipeline.options`), before any stage runs, with messages that name the offending key
(`[verify] candidates: expected an integer, got "three"`). A stage section holds exactly the
options of the stage's command. Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Any

from pipeline.run.layout import check_name, check_submission_file
from pipeline.options import BACKBONES, BY_NAME, DEFAULT_MODELS, MODEL_KINDS, RUN_LEVEL_TRAIN_KEYS, SECTIONS, TRAIN
from submissions.errors import UserError
from tuning.options import check_storage_spec

# sections whose `seed` follows [run] seed unless the file sets it
SEEDED = tuple(s.name for s in SECTIONS if "seed" in s and s.name != "run")


def _section(name: str, values: Any, raw_keys: set[str]) -> dict[str, Any]:
    """The validated `[name]` table: every schema key, each value checked by its option."""
    sec = BY_NAME[name]
    if not isinstance(values, dict):
        raise UserError(f"config: [{name}] must be a table, got {values!r}")
    out = {o.name: copy.deepcopy(o.default) for o in sec.options if o.config}
    for key, value in values.items():
        if key not in out:
            raise UserError(f"[{name}] {key}: unknown key; known keys: {', '.join(out)}")
        out[key] = sec[key].check(value, f"[{name}] {key}")
        raw_keys.add(f"{name}.{key}")
    return out


def is_retrieval(model: dict) -> bool:
    """A [[models]] entry predicting by kNN of its embeddings ([knn]) rather than by its head."""
    return model.get("kind", "classifier") == "retrieval"


def pool_member(cfg: dict) -> dict | None:
    """The retrieval member whose embeddings score [knn] nonlandmark_pool (the first one), when a pool is set."""
    if not cfg["knn"]["nonlandmark_pool"]:
        return None
    return next((m for m in cfg["models"] if is_retrieval(m)), None)


def _models(raw: Any, train: dict) -> list[dict]:
    if raw is None:
        raw = copy.deepcopy(DEFAULT_MODELS)
    if not isinstance(raw, list) or not raw:
        raise UserError("[[models]]: expected at least one [[models]] table with a backbone, "
                        "e.g.  [[models]]\\n backbone = \"vgg16\"")
    models, names = [], set()
    for i, m in enumerate(raw, 1):
        where = f"[[models]] #{i}"
        if not isinstance(m, dict):
            raise UserError(f"{where}: expected a table, got {m!r}")
        if "backbone" not in m:
            raise UserError(f"{where}: missing key backbone (one of {', '.join(BACKBONES)})")
        if m["backbone"] not in BACKBONES:
            raise UserError(f"{where} backbone: {m['backbone']!r} is not one of {', '.join(BACKBONES)}")
        name = m.get("name", m["backbone"])
        check_name(name, f"{where} name")
        if any(c in name for c in ": "):  # ':' separates a stage from its model (train:vgg16)
            raise UserError(f"{where} name: {name!r} must be a single word (no ':' or spaces)")
        if name in names:
            raise UserError(f"{where} name: {name!r} is used twice; give each model a distinct name")
        names.add(name)
        kind = m.get("kind", "classifier")
        if kind not in MODEL_KINDS:
            raise UserError(f"{where} kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        merged = {k: v for k, v in train.items() if k not in RUN_LEVEL_TRAIN_KEYS}
        for k, v in m.items():
            if k in ("backbone", "name", "kind"):
                continue
            if k in RUN_LEVEL_TRAIN_KEYS:
                raise UserError(f"{where} {k}: set it once in [train]; it applies to every model")
            if k not in TRAIN:
                raise UserError(f"{where} {k}: unknown key; known keys: backbone, name, kind, "
                                f"{', '.join(o.name for o in TRAIN.options if o.cli)}")
            merged[k] = TRAIN[k].check(v, f"{where} {k}")
        # kind only when retrieval: a classifier entry (and its stages' fingerprints) as before kinds existed
        models.append({"name": name, "backbone": m["backbone"], **({"kind": kind} if kind != "classifier" else {}),
                       **merged})
    return models


def validate(raw: dict, base_dir: str | os.PathLike = ".") -> dict:
    """Check every key of `raw` (a parsed TOML document) against the option schema; resolve paths.

    Returns a plain dict with every section present (defaults filled in) and a `models` list
    (one entry per model, with `[train]` defaults filled in). Stage seeds not set in the file
    follow `[run] seed`.
    """
    if not isinstance(raw, dict):
        raise UserError("config: expected a TOML document with tables")
    allowed = [s.name for s in SECTIONS] + ["models"]
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise UserError(f"config: unknown section [{unknown[0]}]; known sections: {', '.join(sorted(allowed))}")
    given: set[str] = set()
    cfg: dict[str, Any] = {s.name: _section(s.name, raw.get(s.name, {}), given) for s in SECTIONS}
    for name in SEEDED:
        if f"{name}.seed" not in given:
            cfg[name]["seed"] = cfg["run"]["seed"]
    check_name(cfg["run"]["name"], "[run] name")
    if cfg["tune"]["trials"] == 0 and cfg["tune"]["timeout"] == 0:
        raise UserError("[tune] trials and timeout are both 0: set at least one of them")
    if cfg["tune"]["storage"]:
        check_storage_spec(cfg["tune"]["storage"], "[tune] storage")
    check_submission_file(cfg["submission"]["file"])
    if cfg["kaggle"]["notebook"]:
        from pipeline.run.bundle import check_dataset_ref

        try:
            check_dataset_ref(cfg["kaggle"]["dataset"])
        except UserError as e:
            raise UserError(f"[kaggle] dataset (needed with notebook = true): {str(e).split(': ', 1)[1]}") from None
    cfg["models"] = _models(raw.get("models"), cfg["train"])
    if cfg["knn"]["nonlandmark_pool"] and pool_member(cfg) is None:
        raise UserError("[knn] nonlandmark_pool: needs a retrieval member ([[models]] kind = \"retrieval\"), whose "
                        "embeddings measure a query's similarity to the pool; add one or leave the pool empty")
    w = cfg["ensemble"]["weights"]
    if w and len(w) != len(cfg["models"]):
        raise UserError(f"[ensemble] weights: {len(w)} weight(s) for {len(cfg['models'])} model(s); "
                        "give one per [[models]] entry, in order, or leave it empty for equal weights")
    base = Path(base_dir)
    for sec in SECTIONS:
        for o in sec.options:
            v = cfg[sec.name].get(o.name)
            if o.path and v:
                cfg[sec.name][o.name] = str((base / os.path.expanduser(v)).resolve())
    return cfg


def load_config(path: str | os.PathLike) -> dict:
    """Read and validate a `glr run` TOML file (see `glr config-example`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such config file (write one with `glr config-example > {path.name}`)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    try:
        return validate(raw, path.parent)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
