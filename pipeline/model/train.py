"""`glr train`: transfer learning from an ImageNet backbone, in two phases, resumable.

Phase "head": the base is frozen; by default its features (the bottleneck) are computed once
into the shared bottleneck cache and the head is trained on them, `head_batch_size` (256)
features per step. A head epoch then skips the base, but it is not free: with few classes it
takes seconds, with GLDv2's 81,313 classes the head holds ~10⁸ weights (ResNet50: 167M) and each
step's Adam update over all of them dominates (~1.3 s per step on a CPU), so large head batches
are several times faster per image than the image batch size (32). Phase "fine_tune": the top N
weighted layers of the base are unfrozen (BatchNorm layers stay frozen: `trainable = False`, see
pipeline.model.backbones) and the whole model is trained on augmented images at a lower
learning rate.

The head (`--head softmax|arcface`, `--pooling`, `--embedding-dim`; pipeline.model.backbones) is
fitted through a *training view* (pipeline.model.heads): the model itself for softmax, the model
up to its ArcFace cosines with the margin loss for arcface. Checkpoints hold the view; the full
model (probabilities out) is rebuilt over it, so both phases, the bottleneck path and --resume
are the same for every head. The bottleneck cache is keyed by the base alone.

Images are decoded once into the competition's shared cache (`pipeline.caches`, under
`--cache-dir`, default DATA_DIR/.glr-cache): every model and both fits of `glr run` read the
same rows, and only images the cache lacks are decoded (their count and size are printed first).

Every epoch writes a checkpoint (model + optimizer state) and `state.json`; `--resume` after an
interruption (even kill -9) continues from the last finished epoch. Early stopping watches the
validation loss; the best weights over both phases become `model.keras`.

Run directory:
    model.keras          the best model (see pipeline.model.backbones)
    labels.json          class index → landmark_id
    split.csv            id, landmark_id, split (train/val) — the stratified split used
    history.json         per-epoch metrics of both phases
    manifest.json        command, config, versions, data fingerprint, metrics, timings, skipped images
    training_curve.png   accuracy and loss, train vs validation
    state.json, checkpoints/             resume state and checkpoints (caches live under the cache root)
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import package_versions
from pipeline.options import TRAIN
from submissions.errors import UserError
from submissions.files import atomic_path, atomic_write_json, sha256_file

_T = TRAIN.default  # every option's default is the schema's

# options that may differ on --resume (everything else must match the interrupted run)
# (data_dir may move: the rows used are fixed by split.csv in the run directory)
RESUMABLE_CHANGES = {"epochs", "fine_tune_epochs", "patience", "resume", "batch_size", "head_batch_size",
                     "data_dir", "out", "cache_dir"}


OWN_FILES = {"split.csv", "labels.json", "cache", "checkpoints", "state.json"}  # cache/: runs of older glr


def _versions() -> dict:
    return package_versions("glr", "tensorflow", "keras", "numpy", "pandas", "pillow")


def _fingerprint(comp, rows: pd.DataFrame) -> dict:
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(rows[["id", "landmark_id", "split"]], index=False).to_numpy().tobytes())
    return {
        "data_dir": str(comp.root),
        "train_csv_sha256": sha256_file(comp.root / "train.csv"),
        "rows_sha256": h.hexdigest(),
    }


def read_labels(run_dir: str | os.PathLike) -> np.ndarray:
    """The run's label map as an array: class index → landmark_id."""
    path = Path(run_dir) / "labels.json"
    if not path.exists():
        raise UserError(f"{path}: no label map — is {run_dir} a `glr train` run directory?")
    m = json.loads(path.read_text())
    return np.array([int(m[str(i)]) for i in range(len(m))], dtype=np.int64)


def read_split(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The run's stratified split (split.csv): id, landmark_id, split (train/val)."""
    path = Path(run_dir) / "split.csv"
    if not path.exists():
        raise UserError(f"{path}: no stored split — is {run_dir} a `glr train` run directory?")
    return pd.read_csv(path, dtype={"id": str})


def plot_history(history: list[dict], path: Path) -> None:
    """Accuracy and loss, train vs validation, over both phases (a line marks fine-tuning)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(1, len(history) + 1)
    for ax, key in zip(axes, ("accuracy", "loss")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            y = [h.get(prefix + key, np.nan) for h in history]
            if not all(v is None or np.isnan(v) for v in y):
                ax.plot(x, [np.nan if v is None else v for v in y], marker="o", label=label)
        starts = [i + 1 for i, h in enumerate(history) if h["phase"] == "fine_tune"]
        if starts:
            ax.axvline(starts[0] - 0.5, color="grey", ls="--", lw=1, label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


class _Run:
    """Paths and persistent state of one run directory."""

    def __init__(self, out: Path):
        self.out = out
        self.ckpt = out / "checkpoints"
        self.cache = out / "cache"
        self.state_path = out / "state.json"

    def load_state(self) -> dict | None:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else None

    def save_state(self, state: dict) -> None:
        atomic_write_json(self.state_path, state)


def _save_keras(model, path: Path) -> None:
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def _save_weights(model, path: Path) -> None:
    with atomic_path(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)


def _make_callback(run: _Run, state: dict, phase: str, model, *, monitor: str, patience: int, n_images: int,
                   last: Path, best: Path):
    """A Keras callback: per-epoch history, best weights, last checkpoint, state.json, early stop."""
    import keras

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            secs = time.perf_counter() - self.t0
            rec = {"phase": phase, "epoch": epoch + 1,
                   **{k: float(v) for k, v in (logs or {}).items() if k in
                      ("loss", "accuracy", "val_loss", "val_accuracy")},
                   "seconds": round(secs, 3), "images_per_s": round(n_images / max(secs, 1e-9), 1)}
            state["history"].append(rec)
            value = rec.get(monitor, np.inf)
            if value < state["best"]["value"] - 1e-7:
                state["best"] = {"value": value, "phase": phase, "epoch": epoch + 1}
                state["wait"] = 0
                _save_weights(model, best)
            else:
                state["wait"] += 1
            _save_keras(model, last)
            state["epoch"] = epoch + 1
            state["timings"][f"{phase}_s"] = state["timings"].get(f"{phase}_s", 0.0) + secs
            if state["wait"] >= patience:
                self.model.stop_training = True
                state["stopped_early"] = True
            run.save_state(state)

    return Checkpoint()


def _optimizer(lr: float, decay: float):
    """Adam with the classic Keras `decay`: lr / (1 + decay · step)."""
    import keras

    schedule = lr if not decay else keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=1, decay_rate=decay)
    return keras.optimizers.Adam(learning_rate=schedule)


def _compile(model, lr: float, decay: float, cfg: dict) -> None:
    """Compile a training view (pipeline.model.heads) with its head's loss: softmax cross-entropy, or
    ArcFace's margin loss on the cosines."""
    from pipeline.model.heads import compile_for

    compile_for(model, _optimizer(lr, decay), head=cfg.get("head", "softmax"),
                margin=cfg.get("arcface_margin", _T("arcface_margin")),
                scale=cfg.get("arcface_scale", _T("arcface_scale")))


def _load_view(path: Path):
    """A training view saved by a checkpoint, with its optimizer state; and the full model over it."""
    from pipeline.model import backbones as M
    from pipeline.model.heads import with_predictions

    view = M.load_model(path, compile=True)
    return view, with_predictions(view)


def _apply_head_best(model, head_best: Path, backbone: str, n_classes: int, fshape, bottleneck: bool,
                     spec: dict) -> None:
    """Put the best weights of the head phase (saved from a training view) into the full model."""
    from pipeline.model.heads import training_view

    if not head_best.exists():
        return
    if bottleneck:
        from pipeline.model import backbones as M

        head = training_view(M.build_head(backbone, n_classes, fshape, **spec))
        head.load_weights(head_best)
        M.copy_head(head, model)
    else:
        training_view(model).load_weights(head_best)


def _best_record(state: dict) -> dict:
    best = state["best"]
    for rec in state["history"]:
        if rec["phase"] == best.get("phase") and rec["epoch"] == best.get("epoch"):
            return rec
    return {}


def _check_resume(saved: dict, config: dict, out: Path) -> None:
    for key, value in config.items():
        if key in RESUMABLE_CHANGES or key not in saved:
            continue
        if saved[key] != value:
            raise UserError(f"{out}: --resume with {key.replace('_', '-')}={value!r}, but the interrupted run "
                            f"used {saved[key]!r}; resume with the same options (only epochs, fine-tune-epochs, "
                            "patience, batch-size, head-batch-size and cache-dir may change) or train into a new "
                            "--out")


def train(data_dir: str | os.PathLike, *, backbone: str, out: str | os.PathLike, weights: str = _T("weights"),
          image_size: int = _T("image_size"), epochs: int = _T("epochs"),
          fine_tune_epochs: int = _T("fine_tune_epochs"), fine_tune_layers: int = _T("fine_tune_layers"),
          batch_size: int = _T("batch_size"), head_batch_size: int = _T("head_batch_size"),
          lr: float = _T("lr"), fine_tune_lr: float = _T("fine_tune_lr"),
          decay: float = _T("decay"), precision: str = _T("precision"), max_per_class: int = _T("max_per_class"),
          min_per_class: int = _T("min_per_class"), val_frac: float = _T("val_frac"), seed: int = _T("seed"),
          resume: bool = False, augment: bool = _T("augment"), flip: bool = _T("flip"),
          bottleneck: bool = _T("bottleneck"), patience: int = _T("patience"),
          head: str = _T("head"), pooling: str = _T("pooling"), embedding_dim: int = _T("embedding_dim"),
          arcface_margin: float = _T("arcface_margin"), arcface_scale: float = _T("arcface_scale"),
          arcface_subcentres: int = _T("arcface_subcentres"),
          cache_dir: str | os.PathLike | None = None) -> dict:
    """Train `backbone` on the competition in `data_dir` into the run directory `out`; return
    the manifest. `cache_dir`: the cache root (default DATA_DIR/.glr-cache; `glr run` passes the
    competition's, so the local-validation fit shares it). `head`, `pooling`, `embedding_dim`,
    `arcface_*`: the head (pipeline.model.backbones, pipeline.model.heads). See the module docstring
    for the phases and the files written."""
    config = dict(locals())  # the options: taken before any other local name exists
    t_start = time.perf_counter()
    from pipeline.acquire.competition import Competition
    from pipeline.caches import cache_root
    from pipeline.model.data import decode_images, stratified_split, select_rows
    from pipeline.model import backbones as M
    from pipeline.model.heads import training_view

    config["data_dir"], config["out"] = str(data_dir), str(out)
    config["cache_dir"] = None if cache_dir is None else str(cache_dir)
    for key in ("epochs", "fine_tune_epochs", "fine_tune_layers", "patience"):
        if config[key] < 0:
            raise UserError(f"--{key.replace('_', '-')} {config[key]}: must be 0 or more")
    for key in ("batch_size", "head_batch_size", "arcface_subcentres"):
        if config[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} {config[key]}: must be at least 1")
    for key in ("head", "pooling"):
        if config[key] not in TRAIN[key].choices:
            raise UserError(f"--{key} {config[key]!r}: choose one of {', '.join(TRAIN[key].choices)}")
    if embedding_dim < 0 or arcface_margin < 0 or arcface_scale <= 0:
        raise UserError(f"--embedding-dim {embedding_dim}, --arcface-margin {arcface_margin}, --arcface-scale "
                        f"{arcface_scale}: the first two must be 0 or more, the scale above 0")
    M._check(backbone, image_size)
    M.check_single_machine()  # before hours of decoding, not after
    M.resolve_precision(precision)
    comp = Competition(data_dir)
    out = Path(out)
    run = _Run(out)
    state = run.load_state()
    if state is not None and not resume:
        raise UserError(f"{out}: already holds a training run; pass --resume to continue it or choose another --out")
    if state is None and out.exists():
        # files of a start that failed before its first checkpoint (e.g. no ImageNet weights) are redone
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise UserError(f"{out}: exists and holds other files ({', '.join(foreign[:3])}); choose another --out")
    if state is not None:
        _check_resume(state["config"], config, out)
        if state["phase"] == "done" and (out / "manifest.json").exists():
            return json.loads((out / "manifest.json").read_text())
        state["config"].update({k: config[k] for k in RESUMABLE_CHANGES if k in config})
        state["resumed"].append({"phase": state["phase"], "epoch": state["epoch"],
                                 "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    out.mkdir(parents=True, exist_ok=True)

    # -- data: selection, split, label map (fixed at the first start) -----------------------
    split_path = out / "split.csv"
    if state is None:
        import shutil

        for leftover in (run.ckpt, run.cache):  # from a start that never reached its first state.json
            if leftover.exists():
                shutil.rmtree(leftover)
        rows = stratified_split(select_rows(comp.train, max_per_class=max_per_class, min_per_class=min_per_class,
                                            seed=seed), val_frac=val_frac, seed=seed)
        classes = np.sort(rows["landmark_id"].unique())
        with atomic_path(split_path, suffix=".csv") as tmp:
            rows.to_csv(tmp, index=False)
        atomic_write_json(out / "labels.json", {str(i): int(c) for i, c in enumerate(classes)})
        state = {"config": config, "phase": "head", "epoch": 0, "best": {"value": float("inf")}, "wait": 0,
                 "history": [], "timings": {}, "resumed": [], "stopped_early": False}
    else:
        rows = read_split(out)
        classes = read_labels(out)
    cfg = state["config"]
    spec = M.head_spec(cfg)  # a run of older glr has no head keys: the softmax head it was trained with
    loss_cfg = {"head": spec["head"], "arcface_margin": cfg.get("arcface_margin", _T("arcface_margin")),
                "arcface_scale": spec["arcface_scale"]}
    class_index = {int(c): i for i, c in enumerate(classes)}
    labels = rows["landmark_id"].map(class_index).to_numpy(dtype=np.int32)

    root = cache_root(comp.root, cache_dir)
    paths = comp.image_paths(rows["id"].tolist(), "train")
    t0 = time.perf_counter()
    images, img_rows, img_keys, skipped, img_stats = decode_images(rows["id"].tolist(), paths, image_size, root)
    decode_s = time.perf_counter() - t0
    state["timings"].setdefault("decode_s", decode_s)
    caches = {"root": str(root), "images": {**img_stats, "seconds": round(decode_s, 3)}}
    ok = img_rows >= 0
    is_val = (rows["split"] == "val").to_numpy()
    tr_idx, va_idx = np.flatnonzero(ok & ~is_val), np.flatnonzero(ok & is_val)
    if len(tr_idx) == 0:
        raise UserError(f"{comp.root}: none of the {len(rows)} selected training images could be read")
    has_val = len(va_idx) > 0
    monitor = "val_loss" if has_val else "loss"

    # -- model -------------------------------------------------------------------------------
    M.quiet_tf()
    import keras

    keras.utils.set_random_seed(seed)
    resolved = M.set_precision(cfg["precision"])
    strategy = M.get_strategy()
    run.ckpt.mkdir(parents=True, exist_ok=True)
    init_path = run.ckpt / "init.keras"
    with strategy.scope():
        if init_path.exists():
            model = M.load_model(init_path)
        else:
            model = M.build_model(backbone, len(classes), image_size, weights, **spec)
            _save_keras(model, init_path)
    run.save_state(state)
    fshape = M.feature_shape(model)

    # -- phase a: head on frozen base ---------------------------------------------------------
    head_best, head_last = run.ckpt / "head_best.weights.h5", run.ckpt / "head_last.keras"
    if state["phase"] == "head":
        ep_target = cfg["epochs"]
        if bottleneck:
            from pipeline.model.data import bottleneck_features, bottleneck_store, image_dataset, weights_digest

            t0 = time.perf_counter()
            store = bottleneck_store(root, backbone=backbone, base_digest=weights_digest(M.find_base(model)),
                                     image_size=image_size, precision=resolved, feature_shape=fshape)
            used = np.flatnonzero(ok)
            feats, frows_used, computed = bottleneck_features(M.feature_extractor(model), store, images,
                                                              img_rows[used], img_keys[used],
                                                              batch_size=max(batch_size, 64))
            frows = np.full(len(rows), -1, np.int64)
            frows[used] = frows_used
            secs = time.perf_counter() - t0
            caches["bottleneck"] = {"store": str(store.folder), "computed": int(computed),
                                    "cached": int(len(used) - computed), "row_bytes": store.row_bytes,
                                    "seconds": round(secs, 3)}
            if computed:
                state["timings"]["features_s"] = secs
                state["timings"]["features_images_per_s"] = round(computed / max(secs, 1e-9), 1)
            with strategy.scope():
                if head_last.exists():
                    head = M.load_model(head_last, compile=True)
                else:
                    head = training_view(M.build_head(backbone, len(classes), fshape, **spec))
                    _compile(head, cfg["lr"], cfg["decay"], loss_cfg)
            cb = _make_callback(run, state, "head", head, monitor=monitor, patience=max(1, cfg["patience"]),
                                n_images=len(tr_idx), last=head_last, best=head_best)
            if state["epoch"] < ep_target and not state["stopped_early"]:
                hb = cfg["head_batch_size"]
                fds = image_dataset(feats, labels[tr_idx], frows[tr_idx], batch_size=hb, shuffle=True, seed=seed)
                fvds = image_dataset(feats, labels[va_idx], frows[va_idx], batch_size=hb) if has_val else None
                head.fit(fds, validation_data=fvds, epochs=ep_target, initial_epoch=state["epoch"], verbose=0,
                         shuffle=False, callbacks=[cb])
            if head_best.exists():
                head.load_weights(head_best)
            M.copy_head(head, model)
        else:
            from pipeline.model.data import augmenter, image_dataset

            with strategy.scope():
                if head_last.exists():
                    view, model = _load_view(head_last)
                else:
                    view = training_view(model)
                    _compile(view, cfg["lr"], cfg["decay"], loss_cfg)
            aug = augmenter(seed, flip=flip) if augment else None
            ds = image_dataset(images, labels[tr_idx], img_rows[tr_idx], batch_size=cfg["batch_size"], shuffle=True,
                               augment=aug, seed=seed)
            vds = image_dataset(images, labels[va_idx], img_rows[va_idx], batch_size=cfg["batch_size"]) \
                if has_val else None
            cb = _make_callback(run, state, "head", view, monitor=monitor, patience=max(1, cfg["patience"]),
                                n_images=len(tr_idx), last=head_last, best=head_best)
            if state["epoch"] < ep_target and not state["stopped_early"]:
                view.fit(ds, validation_data=vds, epochs=ep_target, initial_epoch=state["epoch"], verbose=0,
                         shuffle=False, callbacks=[cb])
            if head_best.exists():
                view.load_weights(head_best)
        state.update(phase="fine_tune", epoch=0, wait=0, stopped_early=False)
        run.save_state(state)

    # -- phase b: fine-tune the top layers with augmentation -----------------------------------
    ft_best, ft_last = run.ckpt / "best.weights.h5", run.ckpt / "last.keras"
    if state["phase"] == "fine_tune":
        from pipeline.model.data import augmenter, image_dataset

        if cfg["fine_tune_epochs"] > 0 and cfg["fine_tune_layers"] > 0:
            with strategy.scope():
                if ft_last.exists():
                    view, model = _load_view(ft_last)
                else:
                    _apply_head_best(model, head_best, backbone, len(classes), fshape, bottleneck, spec)
                    M.unfreeze_top(model, cfg["fine_tune_layers"])
                    view = training_view(model)
                    _compile(view, cfg["fine_tune_lr"], cfg["decay"], loss_cfg)
            aug = augmenter(seed + 10, flip=flip) if augment else None
            ds = image_dataset(images, labels[tr_idx], img_rows[tr_idx], batch_size=cfg["batch_size"], shuffle=True,
                               augment=aug, seed=seed + 10)
            vds = image_dataset(images, labels[va_idx], img_rows[va_idx], batch_size=cfg["batch_size"]) \
                if has_val else None
            cb = _make_callback(run, state, "fine_tune", view, monitor=monitor,
                                patience=max(1, cfg["patience"]), n_images=len(tr_idx), last=ft_last, best=ft_best)
            if state["epoch"] < cfg["fine_tune_epochs"] and not state["stopped_early"]:
                view.fit(ds, validation_data=vds, epochs=cfg["fine_tune_epochs"], initial_epoch=state["epoch"],
                          verbose=0, shuffle=False, callbacks=[cb])
        state.update(phase="finish")
        run.save_state(state)

    # -- the best model, history, curve, manifest ---------------------------------------------
    if state["best"].get("phase") == "fine_tune" and ft_best.exists():
        training_view(model).load_weights(ft_best)
    elif state["best"].get("phase") == "head" and head_best.exists():
        if bottleneck:  # the base may have been fine-tuned since: start again from its initial weights
            with strategy.scope():
                model = M.load_model(init_path)
        _apply_head_best(model, head_best, backbone, len(classes), fshape, bottleneck, spec)
    with strategy.scope():  # saved without the optimizer's state: a clean model for inference
        final = M.load_model(init_path)
    final.set_weights(model.get_weights())
    _save_keras(final, out / "model.keras")
    atomic_write_json(out / "history.json", state["history"])
    plot_history(state["history"], out / "training_curve.png")

    timings = dict(state["timings"])
    timings["decode_images_per_s"] = round(len(rows) / max(timings["decode_s"], 1e-9), 1)
    for phase in ("head", "fine_tune"):
        recs = [h for h in state["history"] if h["phase"] == phase]
        if recs:
            timings[f"{phase}_images_per_s"] = round(len(tr_idx) * len(recs) / max(sum(h["seconds"] for h in recs),
                                                                                   1e-9), 1)
    timings["total_s_this_start"] = round(time.perf_counter() - t_start, 3)
    last = state["history"][-1] if state["history"] else {}
    manifest = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": cfg,
        "backbone": backbone,
        "image_size": image_size,
        "n_classes": int(len(classes)),
        "head": spec,
        "precision": resolved,
        "strategy": type(strategy).__name__,
        "replicas": int(strategy.num_replicas_in_sync),
        "cpu_bf16": sorted({"amx_bf16", "avx512_bf16"} & M.cpu_flags()),
        "versions": _versions(),
        "data": {**_fingerprint(comp, rows), "selected_images": int(len(rows)), "train_images": int(len(tr_idx)),
                 "val_images": int(len(va_idx)), "skipped_images": len(skipped), "skipped": skipped[:1000]},
        "history": state["history"],
        "best": state["best"],
        "final": {k: last.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
        "metrics": {k: v for k, v in _best_record(state).items() if k in ("loss", "accuracy", "val_loss",
                                                                          "val_accuracy")},
        "timings": timings,
        "caches": caches,
        "resumed": state["resumed"],
        "files": ["model.keras", "labels.json", "split.csv", "history.json", "training_curve.png"],
    }
    atomic_write_json(out / "manifest.json", manifest)
    state["phase"] = "done"
    run.save_state(state)
    return manifest
