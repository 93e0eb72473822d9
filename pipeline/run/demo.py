"""`glr demo`: the embedded default — a synthetic mini-competition and the whole pipeline on it.

Small enough to finish in a few minutes on two CPU cores (12 landmarks × 30 photos at 64 px,
models from scratch, head epochs on bottleneck features, SIFT verification, a modest Optuna
budget), yet every stage is the real one, so the same folder is a template for `glr run`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from submissions.files import atomic_write_text

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


def demo(out: str | os.PathLike = "demo", *, seed: int = 0, echo: Callable[[str], None] = print) -> dict:
    """Write the synthetic competition and config into `out`, then `glr run` it; return the run manifest.

    Re-running reuses the competition (same seed and sizes) and skips every finished stage.
    """
    from pipeline.run.stages import run
    from pipeline.acquire.synth import make_competition

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    comp = out / "competition"
    params = {**SYNTH, "seed": int(seed)}
    info = out / "synth-params.json"  # what the competition folder was made with
    try:
        same = comp.is_dir() and json.loads(info.read_text()) == params
    except (OSError, json.JSONDecodeError):
        same = False
    if not same:
        echo(f"[synth] {comp}: {SYNTH['landmarks']} landmarks × {SYNTH['per_landmark']} photos, "
             f"{SYNTH['test']} test queries, {SYNTH['size']} px")
        make_competition(comp, overwrite=True, **params)
        atomic_write_text(info, json.dumps(params, sort_keys=True) + "\n")
    config = out / "glr.toml"
    text = demo_config(seed)
    if not config.exists() or config.read_text() != text:
        atomic_write_text(config, text)
    return run(config, echo=echo)
