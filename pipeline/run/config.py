"""The `glr run` configuration: one TOML file that names every stage's settings.

Read with the standard library's `tomllib`, merged over `DEFAULTS`, validated with messages
that name the offending key (`[verify] candidates: expected an integer, got "three"`).
Stage sections also accept any keyword of the stage's public function (e.g. an option of
`glr train` that this file does not list); those are checked against the function's
signature when the run starts, so a typo fails before any stage has run.
Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Any

from pipeline.model.backbones import BACKBONES, PRECISIONS
from submissions.errors import UserError

# section -> key -> default. `None` means "not set" (the stage function's own default applies).
DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {"name": "glr", "root": "runs", "seed": 0},
    "data": {
        "data_dir": "data",
        "competition": "landmark-recognition-2021",
        "fetch": False,
        "files": [],
    },
    "localval": {
        "holdout_frac": 0.2,
        "unseen_class_frac": 0.1,
        "min_train_per_class": 2,
        "max_queries": 0,
        "seed": 0,
    },
    "train": {
        "weights": "imagenet",
        "image_size": 96,
        "epochs": 10,
        "fine_tune_epochs": 2,
        "batch_size": 32,
        "precision": "auto",
        "max_per_class": 3000,
        "min_per_class": 1,
        "val_frac": 0.1,
        "seed": 0,
        "final_fit": "all",  # run-level, not a `glr train` option: see RUN_LEVEL_TRAIN_KEYS
    },
    "predict": {"top_k": 5, "batch_size": 64},
    "ensemble": {"weights": [], "top_k": 5},
    "verify": {
        "extractor": "sift",
        "candidates": 3,
        "k": 3,
        "refs": "random",
        "workers": 1,
        "cache_dir": "",
        "seed": 0,
    },
    "tune": {
        "policy": "auto",
        "trials": 100,
        "timeout": 0,
        "storage": "",
        "study": "",
        "jobs": 1,
        "holdout": 0.3,
        "seed": 0,
        "force": False,
        "plots": True,
    },
    "submission": {"file": "submission.csv"},
    "kaggle": {"submit": False, "message": "glr run"},
    "report": {"examples": 6},
}

# keys whose values are checked here; everything else in a stage section is passed through
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("verify", "extractor"): ("sift", "orb", "delf"),
    ("verify", "refs"): ("first", "random", "nearest"),
    ("tune", "policy"): ("auto", "bands", "blend", "seed-rules", "identity"),
    ("train", "precision"): PRECISIONS,
    ("train", "final_fit"): ("all", "split"),
}
# [train] keys about the run, not about one model: never merged into [[models]] (so they do not
# change a model's fingerprint) and never passed to `glr train`
RUN_LEVEL_TRAIN_KEYS = ("final_fit",)
# sections whose unknown keys go to a stage function (checked against its signature later)
PASS_THROUGH = ("train", "predict", "ensemble", "verify", "tune")
PATH_KEYS = {("run", "root"), ("data", "data_dir"), ("verify", "cache_dir")}

DEFAULT_MODELS = [{"backbone": "vgg16"}, {"backbone": "vgg19"}, {"backbone": "resnet50"}]


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _check_value(where: str, key: str, value: Any, default: Any) -> Any:
    """Return `value` coerced to the default's type, or raise UserError naming `where`."""
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{where} {key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} {key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} {key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise UserError(f"{where} {key}: expected a string, got {_type_name(value)} {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise UserError(f"{where} {key}: expected a list, got {value!r}")
        return value
    return value


def _ranges(cfg: dict) -> None:
    def frac(sec: str, key: str, lo_open: bool = False, hi: int = 1) -> None:
        v = cfg[sec][key]
        if not (0.0 < v < hi if lo_open else 0.0 <= v < hi):
            raise UserError(f"[{sec}] {key}: must be in {'(' if lo_open else '['}0, {hi}), got {v}")

    frac("localval", "holdout_frac", lo_open=True)
    frac("localval", "unseen_class_frac")
    frac("tune", "holdout")
    for sec, key in [("verify", "candidates"), ("verify", "k"), ("verify", "workers"), ("predict", "top_k"),
                     ("predict", "batch_size"), ("tune", "jobs"), ("localval", "min_train_per_class"),
                     ("ensemble", "top_k")]:
        if cfg[sec][key] < 1:
            raise UserError(f"[{sec}] {key}: must be at least 1, got {cfg[sec][key]}")
    for sec, key in [("tune", "trials"), ("tune", "timeout"), ("localval", "max_queries"), ("report", "examples")]:
        if cfg[sec][key] < 0:
            raise UserError(f"[{sec}] {key}: must be 0 or more, got {cfg[sec][key]}")
    if cfg["tune"]["trials"] == 0 and cfg["tune"]["timeout"] == 0:
        raise UserError("[tune] trials and timeout are both 0: set at least one of them")


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
        if not isinstance(name, str) or not name or any(c in name for c in "/\\: "):
            raise UserError(f"{where} name: {name!r} must be a non-empty word (no '/', ':' or spaces)")
        if name in names:
            raise UserError(f"{where} name: {name!r} is used twice; give each model a distinct name")
        names.add(name)
        merged = {k: v for k, v in train.items() if k not in RUN_LEVEL_TRAIN_KEYS}
        for k, v in m.items():
            if k in ("backbone", "name"):
                continue
            if k in RUN_LEVEL_TRAIN_KEYS:
                raise UserError(f"{where} {k}: set it once in [train]; it applies to every model")
            merged[k] = _check_value(where, k, v, DEFAULTS["train"].get(k))
        if merged.get("precision") not in CHOICES[("train", "precision")]:
            raise UserError(f"{where} precision: {merged.get('precision')!r} is not one of "
                            f"{', '.join(CHOICES[('train', 'precision')])}")
        models.append({"name": name, "backbone": m["backbone"], **merged})
    return models


def validate(raw: dict, base_dir: str | os.PathLike = ".") -> dict:
    """Merge `raw` (a parsed TOML document) over `DEFAULTS`; check every key; resolve paths.

    Returns a plain dict with every section present and a `models` list (one entry per
    backbone, with `[train]` defaults filled in).
    """
    if not isinstance(raw, dict):
        raise UserError("config: expected a TOML document with tables")
    allowed = set(DEFAULTS) | {"models"}
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise UserError(f"config: unknown section [{unknown[0]}]; known sections: "
                        f"{', '.join(sorted(allowed))}")
    cfg: dict[str, Any] = copy.deepcopy(DEFAULTS)
    for sec, values in raw.items():
        if sec == "models":
            continue
        if not isinstance(values, dict):
            raise UserError(f"config: [{sec}] must be a table, got {values!r}")
        for key, value in values.items():
            if key in DEFAULTS[sec]:
                cfg[sec][key] = _check_value(f"[{sec}]", key, value, DEFAULTS[sec][key])
            elif sec in PASS_THROUGH:
                cfg[sec][key] = value  # checked against the stage function's signature at run start
            else:
                raise UserError(f"[{sec}] {key}: unknown key; known keys: {', '.join(DEFAULTS[sec])}")
    for (sec, key), choices in CHOICES.items():
        if cfg[sec][key] not in choices:
            raise UserError(f"[{sec}] {key}: {cfg[sec][key]!r} is not one of {', '.join(choices)}")
    if not cfg["run"]["name"] or any(c in cfg["run"]["name"] for c in "/\\"):
        raise UserError(f"[run] name: {cfg['run']['name']!r} must be a folder name (no slashes)")
    w = cfg["ensemble"]["weights"]
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 for x in w):
        raise UserError(f"[ensemble] weights: expected non-negative numbers, got {w!r}")
    _ranges(cfg)
    cfg["models"] = _models(raw.get("models"), cfg["train"])
    if w and len(w) != len(cfg["models"]):
        raise UserError(f"[ensemble] weights: {len(w)} weight(s) for {len(cfg['models'])} model(s); "
                        "give one per [[models]] entry, in order, or leave it empty for equal weights")
    base = Path(base_dir)
    for sec, key in PATH_KEYS:
        v = cfg[sec][key]
        if v:
            cfg[sec][key] = str((base / os.path.expanduser(v)).resolve())
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


def check_kwargs(where: str, func, extra: dict) -> None:
    """Raise UserError when a pass-through key (of `where`, e.g. "[verify]") is not a keyword of `func`."""
    import inspect

    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in extra:
        if key not in params:
            known = [p for p in params if params[p].kind is params[p].KEYWORD_ONLY]
            raise UserError(f"{where} {key}: unknown key; {func.__module__}.{func.__name__} takes "
                            f"{', '.join(known) or 'no options'}")


EXAMPLE = '''\
# glr run configuration. Print this with `glr config-example > glr.toml`, edit, then `glr run glr.toml`.
# Every key is optional; the values shown are the defaults. Relative paths are relative to this file.
# Stage sections ([train], [predict], [ensemble], [verify], [tune]) also accept any other option of the
# matching command (`glr train --help` …), spelled with underscores: e.g. `fine_tune_layers = 4`.

[run]
name = "glr"                 # the run folder is <root>/<name>; re-running reuses it and skips unchanged stages
root = "runs"
seed = 0

[data]
data_dir = "data"            # a competition folder in Kaggle's layout (train.csv, train/, test/, sample_submission.csv)
competition = "landmark-recognition-2021"
fetch = false                # true: `glr fetch <competition>` into data_dir first (needs Kaggle credentials)
files = []                   # with fetch: only these files of the competition, e.g. ["train.csv", "train/0/0/0"]

[localval]                   # local validation split built from the training data (tuning uses it)
holdout_frac = 0.2           # per class, this share of the images become validation queries
unseen_class_frac = 0.1      # this share of the classes is left out of training: their images are non-landmark queries
min_train_per_class = 2      # a class keeps at least this many training images (smaller classes give no queries)
max_queries = 0              # cap on validation queries (0 = no cap)
seed = 0

[train]                      # defaults for every model below (`glr train` options)
weights = "imagenet"         # imagenet | none | path to a weights file
image_size = 96
epochs = 10                  # head epochs on frozen-base features
fine_tune_epochs = 2         # then fine-tune the top layers with augmentation
batch_size = 32
precision = "auto"           # auto | bf16 | fp16 | fp32
max_per_class = 3000
min_per_class = 1
val_frac = 0.1
seed = 0
final_fit = "all"            # models that predict the real test set: all = each model retrained with these
                             # settings on the FULL training set (stages train_all:<model>), so the classes and
                             # images held out for local validation can be predicted too; split = the
                             # local-validation models (faster: no second training). Tuning always uses split.
# fine_tune_layers = 4       # other `glr train` options, with their defaults:
# lr = 0.001
# fine_tune_lr = 0.0001
# decay = 0.0
# patience = 3               # early stopping on validation loss
# augment = true
# flip = false
# bottleneck = true          # head epochs on cached frozen-base features

# One [[models]] table per model; any [train] key may be overridden per model.
[[models]]
backbone = "vgg16"           # vgg16 | vgg19 | resnet50

[[models]]
backbone = "vgg19"

[[models]]
backbone = "resnet50"
# name = "resnet50"          # stage and folder name (default: the backbone)
# image_size = 128

[predict]                    # `glr predict` options
top_k = 5
batch_size = 64
# precision = "auto"         # default: the model's training precision

[ensemble]                   # `glr ensemble` options
weights = []                 # one per [[models]] entry, in order; empty = equal weights
top_k = 5

[verify]                     # `glr verify` options
extractor = "sift"           # sift | orb | delf (delf needs the TF-Hub module or a local copy)
candidates = 3               # top-N candidate classes checked per query
k = 3                        # reference training images per candidate class
refs = "random"              # first | random | nearest (nearest: by the models' global embeddings)
workers = 1
cache_dir = ""               # feature cache folder; empty = inside the run folder
seed = 0
# max_side = 512             # other `glr verify` options, with their defaults:
# n_features = 1000          # sift/orb keypoints per image
# delf_handle = "https://tfhub.dev/google/delf/1"   # or a local copy of the module
# ratio = 0.85               # Lowe's ratio test
# mutual = true              # mutual nearest neighbours only
# model = "affine"           # affine | homography | fundamental
# method = "ransac"          # ransac | magsac
# threshold = 12.0           # RANSAC reprojection threshold (working-image pixels)
# chunk_size = 64            # pairs per finished chunk (the unit of resuming)

[tune]                       # `glr tune` options (on the local validation split)
policy = "auto"              # auto | bands | blend | seed-rules | identity
trials = 100
timeout = 0                  # seconds, 0 = no limit
storage = ""                 # Optuna storage URL; empty = a journal file in the run folder; postgresql://… to share
study = ""                   # study name; empty = derived from the run name
jobs = 1
holdout = 0.3                # share of validation queries the study never sees
seed = 0
force = false                # write the policy even when it loses on the held-out part
plots = true
# bootstrap = 1000           # resamples for the before/after confidence intervals

[submission]
file = "submission.csv"      # written in the run folder

[kaggle]
submit = false               # true: upload the submission with `glr submit` at the end
message = "glr run"

[report]
examples = 6                 # example queries drawn with their best reference and inlier matches
'''
