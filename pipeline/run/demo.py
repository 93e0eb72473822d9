"""`glr demo`: the embedded default — a synthetic mini-competition and the whole pipeline on it.

Small enough to finish in a few minutes on two CPU cores (12 landmarks × 30 photos at 64 px, three
classifiers and one retrieval member (ArcFace + kNN) from scratch, head epochs on bottleneck
features, SIFT verification, a modest Optuna budget), yet every stage is the real one, so the same
folder is a template for `glr run`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from submissions.errors import UserError
from submissions.files import atomic_write_json, atomic_write_text, sha256_file

SYNTH = {"landmarks": 12, "per_landmark": 30, "test": 120, "distractor_frac": 0.3, "size": 64, "public_frac": 0.5}

CONFIG = """\
# glr demo: the built-in small config (see `glr config-example` for every key).
[run]
name = "run"
root = "."
seed = {seed}

[data]
data_dir = "competition"     # written by `glr synth` (the demo's first step)

[localval]
holdout_frac = 0.25
unseen_class_frac = 0.17     # 2 of 12 classes left out: their photos are the non-landmark queries
seed = {seed}

[train]
weights = "none"             # offline: models from scratch
image_size = 64
epochs = 40                  # head epochs on bottleneck features: cheap
fine_tune_epochs = 0
batch_size = 32
head_batch_size = 32         # a few hundred images: small steps (the default 256 suits tens of thousands of classes)
lr = 0.003                   # any `glr train` option can be set here
patience = 10
seed = {seed}
final_fit = "all"            # retrain each model on all training images for the test predictions (as a
                             # competitor would); the local-validation models still feed the tuning

[[models]]
backbone = "vgg16"

[[models]]
backbone = "vgg19"

[[models]]
backbone = "resnet50"

[[models]]                   # a retrieval member: ArcFace + GeM embeddings, classes by kNN among the
name = "arcface"             # training images ([knn]), averaged with the classifiers like any member
backbone = "vgg16"
kind = "retrieval"
head = "arcface"
pooling = "gem"
embedding_dim = 64

[knn]
k = 10

[predict]
top_k = 5

[verify]
extractor = "sift"
candidates = 3
k = 3
refs = "random"
workers = 2
seed = {seed}

[tune]
policy = "auto"
trials = 60
holdout = 0.3
seed = {seed}

[report]
examples = 6
"""


def demo_config(seed: int = 0) -> str:
    """The demo's TOML text."""
    return CONFIG.replace("{seed}", str(int(seed)))


MARKER = "glr-demo.json"  # what the demo wrote here: the synth parameters and glr.toml's digest


def _read_marker(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _plan(out: Path, params: dict, text: str, overwrite: bool) -> tuple[bool, bool]:
    """(make the competition, write glr.toml), after refusing to touch anything glr did not write.

    glr wrote `competition/` when it holds glr synth's `synth.json`; it wrote `glr.toml` when the
    file's digest is the one the marker recorded (an edited config is the user's). Files glr wrote
    for other settings are replaced only with `overwrite`; anything else is never touched.
    """
    record = _read_marker(out / MARKER)
    comp, config = out / "competition", out / "glr.toml"
    make = not comp.exists() or record.get("synth") != params
    if make and comp.exists():
        if not (comp.is_dir() and (comp / "synth.json").is_file()):
            raise UserError(f"{comp}: exists and was not written by glr synth; glr demo leaves it alone — "
                            "choose another --out")
        if not overwrite:
            raise UserError(f"{comp}: a synthetic competition made with other settings; pass --overwrite to "
                            "replace it, or choose another --out")
    write = not config.exists() or config.read_bytes() != text.encode("utf-8")
    if write and config.exists():
        if not config.is_file() or sha256_file(config) != record.get("config_sha256"):
            raise UserError(f"{config}: not the config glr demo wrote (edited, or another file); glr demo leaves "
                            f"it alone — run it with `glr run {config}`, or choose another --out")
        if not overwrite:
            raise UserError(f"{config}: the demo config of another seed; pass --overwrite to replace it, or choose "
                            "another --out")
    return make, write


def demo(out: str | os.PathLike = "demo", *, seed: int = 0, overwrite: bool = False,
         echo: Callable[[str], None] = print) -> dict:
    """Write the synthetic competition and config into `out`, then `glr run` it; return the run manifest.

    Re-running reuses the competition (same seed and sizes) and skips every finished stage. What
    glr demo wrote for other settings is replaced only with `overwrite`; what it did not write
    (a foreign `competition/`, an edited `glr.toml`) is never touched — the demo stops first.
    """
    from pipeline.acquire.synth import make_competition
    from pipeline.run.stages import run

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another --out")
    params = {**SYNTH, "seed": int(seed)}
    text = demo_config(seed)
    make, write = _plan(out, params, text, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    comp, config = out / "competition", out / "glr.toml"
    record = _read_marker(out / MARKER)
    if make:
        echo(f"[synth] {comp}: {SYNTH['landmarks']} landmarks × {SYNTH['per_landmark']} photos, "
             f"{SYNTH['test']} test queries, {SYNTH['size']} px")
        make_competition(comp, overwrite=True, **params)
    if write:
        atomic_write_text(config, text)
    if make or write or record.get("config_sha256") != sha256_file(config):
        atomic_write_json(out / MARKER, {"synth": params, "config_sha256": sha256_file(config)})
    return run(config, echo=echo)
