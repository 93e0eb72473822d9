"""What a `glr run` will cost before it starts: images, time, disk and peak memory per stage.

`glr run CONFIG --dry-run` prints the engine's plan (which stages run and why) with, for each
stage that will run, the images it processes, its projected wall time, the disk it writes (run
folder and shared cache) and its peak RAM; then totals against the free disk and the RAM of
this machine, and a `warning:` line naming the option that makes a stage fit when one does not.

The image counts are exact: they come from train.csv's class sizes with the same arithmetic as
the local-validation split (`pipeline.run.localval.split_ids`, same seeded draw of the unseen
classes) and the training selection (`pipeline.model.data.select_rows` / `stratified_split`),
computed with numpy on per-class counts only — no image file is touched, so planning GLDv2
(1.58M rows, 81,313 classes) takes about a second. A capped query set is a random draw: its
landmark / non-landmark split is the expected one.

Time comes from per-image rates (`RATES`, measured on the machine it names; `--measure` times a
few images of this competition instead), scaled by the cores available. Disk and memory come
from the formats the stages write (constants below, each with what it stands for). The model is
deliberately simple and documented: a projection to decide whether a run fits, not a promise.
Caches are assumed cold (a stage that runs builds the cache entries it needs); the decoded
images and base features are one cache entry per (image set, size[, backbone]), shared by the
models of a fit.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.caches import existing_parent, human_bytes
from pipeline.parallel import available_cores, memory
from pipeline.run.config import is_retrieval, pool_member

KB, MB, GB = 1e3, 1e6, 1e9

# -- rates, measured ---------------------------------------------------------------------------------
# Measured with `measure_rates()` (`python -m pipeline.run.costs`) on synthetic 640 px JPEG photos
# (~80 KB each; GLDv2's are ~800×600, ~65 KB), on a 2-core machine shared with other jobs: two runs
# differed by up to 1.7×; these are the less loaded run's. Per-machine rates are for `cores` cores and
# are scaled by the cores available; per-core rates are multiplied by the workers used.
RATES: dict[str, Any] = {
    "machine": "Intel(R) Xeon(R) Processor (AMX, bf16), 2 cores",
    "cores": 2,
    "measured": "2026-12-02",
    # images/s per core: JPEG → S×S uint8 (draft mode, resize), at 96 and 224 px
    "decode_per_core": {"96": 150.0, "224": 80.0},
    # images/s, whole machine: frozen base forward at 96 px, batch 32, bf16 (precision auto on this CPU)
    "forward_96": {"vgg16": 142.0, "vgg19": 106.0, "resnet50": 109.0},
    # images/s, whole machine: fine-tuning the top 4 weighted layers at 96 px, batch 32, small head
    "fine_tune_96": {"vgg16": 51.0, "vgg19": 32.0, "resnet50": 100.0},
    # head training step on cached features: seconds = c0 + per_param·P + per_param_image·P·batch (Adam,
    # softmax); 167M parameters at batch 32 → 1.3 s, as measured for the ResNet50 81k-class head
    "head_step": {"c0": 0.0, "per_param": 7.16e-9, "per_param_image": 1.89e-11},
    # per core: local features of one image at [verify] max_side 512, n_features 1000
    "extract_per_core": {"sift": 11.0, "orb": 40.0, "delf": 0.5},
    # per core, one BLAS thread: matching + RANSAC of one pair, scaled to 1000 keypoints per image
    "match_per_core": {"sift": 195.0, "orb": 250.0, "delf": 150.0},
    "table_rows_per_s": 1.6e6,  # predictions rows written + read back (parquet)
    # exact kNN (retrieval members): GFLOP/s of the blocked float32 search, whole machine (benchmarks/knn.py)
    "knn_gflops": 48.0,
    "tune_row_trials_per_s": 5.0e6,  # GAP evaluations: rows × trials per second (not measured)
    "tune_trial_s": 0.05,  # Optuna's own work per trial (sampler, storage; not measured)
    "stat_per_s": 590_000.0,  # file existence checks, warm (localval checks every training image)
    "link_per_s": 99_000.0,  # hard links (the local-validation folder)
    "hash_mb_per_s": 1150.0,  # sha256 of the competition's CSVs
}
# not measured (kept as assumptions): DELF (no module offline), ORB, the tuning rates


# -- sizes and memory, from the formats ------------------------------------------------------------
PRED_ROW_BYTES = 20  # a predictions row in parquet (id, landmark_id, score, rank): 16 B measured at 100k ids
INLIER_ROW_BYTES = 28  # an inliers row in parquet (id, landmark_id, ref_id, inliers): 28 B with random ref ids
PARQUET_FILE_BYTES = 3000  # a parquet file's schema, metadata and page headers
SUBMISSION_ROW_BYTES = 40  # "16-hex-id,landmark score\n"
CSV_ROW_BYTES = 28  # a row of train.csv / solution.csv written by localval
TABLE_ROW_RAM = 150  # a pandas row with a str id and a few numbers
PAIR_ROW_RAM = 250  # a planned (query, class, reference) pair in pandas, with its lookups
TRAIN_ROW_RAM = 200  # train.csv rows in pandas while selecting and splitting
TF_BASE_RAM = 1.5 * GB  # a Python process with TensorFlow, Keras and one compiled graph
PY_BASE_RAM = 0.3 * GB  # a Python process with numpy, pandas, pyarrow
VERIFY_WORKER_RAM = {"sift": 0.3 * GB, "orb": 0.25 * GB, "delf": 2.5 * GB}  # one verify worker process
# per keypoint in the local-feature cache (pipeline.verify.cache): quantised descriptor + uint16 location,
# deflated (SIFT, 64-D projected RootSIFT as int8: ~51 KB per ~970 keypoints, benchmarks/RESULTS.md
# real_pairs); plus half a 4 KB block per entry file
LOCAL_FEATURE_BYTES = {"sift": 53, "orb": 32 + 4, "delf": 40 + 4}
FEATURE_FILE_BYTES = 2048
DELF_FEATURES = 1000  # DELF keeps its own top 1000 keypoints
PREDICT_FACTOR = 4  # copies of a batch's class scores alive in a predict step (logits, softmax, top-k, cast)
LOSS_FACTOR = 3  # copies of a batch's class scores alive in a training step (scores, softmax grad, loss)
# training activations (forward + backward, float32) per input pixel of one image; rough, from the
# architectures' feature-map sizes (VGG16 ≈ 15M activations at 224², ResNet50 ≈ 11M)
ACTIVATION_BYTES_PER_PIXEL = {"vgg16": 2400, "vgg19": 2600, "resnet50": 2000}
INFERENCE_ACTIVATION_SHARE = 0.25  # inference keeps a fraction of the training activations alive
# base (no top) parameters, embedding width, and the weights the top 4 weighted layers hold (BatchNorm frozen)
BASE_PARAMS = {"vgg16": 14_714_688, "vgg19": 20_024_384, "resnet50": 23_587_712}
EMBEDDING_DIM = {"vgg16": 256, "vgg19": 1024, "resnet50": 2048}
# [knn] search = ivf/hnsw against exact, build included (IVF nprobe 64 on 1M clustered rows extrapolated to
# GLDv2: ~13 vs ~52 min; benchmarks/RESULTS.md, knn-ann-1m), and the index's RAM per row byte (IVF: 1.2)
ANN_SPEEDUP = 4.0
ANN_RAM_FACTOR = 1.2
TOP4_PARAMS = {"vgg16": 9_439_232, "vgg19": 9_439_232, "resnet50": 3_411_968}


def checkpoint_bytes(full: float, head: float, top: float, bottleneck: bool, fine_tune: bool) -> float:
    """A training run folder's model files (pipeline.model.train), float32 weights, Adam state = 2 × weights.

    Always init.keras and model.keras (the full model); the head phase keeps head_last.keras and
    head_best.weights.h5 (the head with its optimizer state when on cached features, else the full
    model); fine-tuning keeps last.keras (with the optimizer state of head + top layers) and best.weights.h5.
    """
    out = 2 * full * 4
    out += 2 * head * 4 * 3 if bottleneck else 2 * full * 4 + head * 4 * 2
    if fine_tune:
        out += 2 * full * 4 + (head + top) * 4 * 2
    return out


def feature_shape(backbone: str, size: int) -> tuple[int, int, int]:
    """The base's output at `size` px (pipeline.model.backbones: five stride-2 stages, floor division)."""
    side = size // 32
    return (side, side, 2048 if backbone == "resnet50" else 512)


def head_params(backbone: str, classes: int, size: int) -> int:
    """Weights of the backbone's head (pipeline.model.backbones._head) for `classes` classes."""
    if backbone == "resnet50":
        return 2048 * classes + classes
    width = 256 if backbone == "vgg16" else 1024
    flat = int(np.prod(feature_shape(backbone, size)))
    return flat * width + width + width * width + width + width * classes + classes


# -- the competition's counts ------------------------------------------------------------------------

@dataclass(frozen=True)
class Counts:
    """train.csv as class sizes (classes sorted by id) plus the number of test images."""

    class_ids: np.ndarray
    class_sizes: np.ndarray
    test_images: int

    @property
    def rows(self) -> int:
        return int(self.class_sizes.sum())

    @property
    def classes(self) -> int:
        return int(len(self.class_sizes))

    def summary(self) -> dict:
        s = self.class_sizes
        return {"train_images": self.rows, "classes": self.classes, "test_images": int(self.test_images),
                "median_class_size": float(np.median(s)) if len(s) else 0.0,
                "max_class_size": int(s.max()) if len(s) else 0}


def read_counts(data_dir: str | os.PathLike) -> Counts | None:
    """The competition's counts from its CSVs only (no image is opened); None when there is no train.csv.

    train.csv is read as its landmark_id column alone (pyarrow engine), so 1.58M rows take about a second.
    """
    import pandas as pd

    from pipeline.acquire.competition import Competition

    root = Path(data_dir)
    if not (root / "train.csv").is_file():
        return None
    try:
        lid = pd.read_csv(root / "train.csv", usecols=["landmark_id"], engine="pyarrow")["landmark_id"]
    except Exception:  # a file the checked reader will name the problem of when the data stage runs
        lid = Competition(root).train["landmark_id"]
    ids, sizes = np.unique(lid.to_numpy(dtype=np.int64), return_counts=True)
    try:
        test = len(Competition(root).test_ids)
    except Exception:  # no test list yet: the data stage will say so
        test = 0
    return Counts(ids, sizes.astype(np.int64), int(test))


# -- image counts, exact ---------------------------------------------------------------------------------

def localval_counts(counts: Counts, lv: dict) -> dict:
    """The local-validation split's sizes, by the arithmetic of `split_ids` on class sizes alone.

    Returns per-class training sizes (`train_sizes`, aligned with counts.class_ids) and the query counts.
    """
    ids, sizes = counts.class_ids, counts.class_sizes
    rng = np.random.default_rng(lv["seed"])  # the same first draw as split_ids: the unseen classes
    n_unseen = int(round(lv["unseen_class_frac"] * len(ids)))
    if lv["unseen_class_frac"] > 0 and len(ids) >= 3:
        n_unseen = max(1, n_unseen)
    n_unseen = min(n_unseen, max(0, len(ids) - 2))
    unseen = np.isin(ids, rng.choice(ids, size=n_unseen, replace=False)) if n_unseen else np.zeros(len(ids), bool)
    n_hold = np.minimum(np.rint(lv["holdout_frac"] * sizes), sizes - lv["min_train_per_class"]).clip(min=0)
    n_hold = np.where(unseen, 0, n_hold).astype(np.int64)
    landmark, non_landmark = int(n_hold.sum()), int(sizes[unseen].sum())
    queries = landmark + non_landmark
    if lv["max_queries"] and queries > lv["max_queries"]:  # a uniform draw: the expected split
        landmark = int(round(landmark * lv["max_queries"] / queries))
        queries = int(lv["max_queries"])
        non_landmark = queries - landmark
    train_sizes = np.where(unseen, 0, sizes - n_hold)
    return {"train_sizes": train_sizes, "train_images": int(train_sizes.sum()),
            "train_classes": int((train_sizes > 0).sum()), "queries": queries, "landmark_queries": landmark,
            "non_landmark_queries": non_landmark}


def selection_counts(sizes: np.ndarray, model: dict) -> dict:
    """A training fit's images (`select_rows` then `stratified_split`) from per-class sizes."""
    sizes = np.asarray(sizes, dtype=np.int64)
    kept = sizes[sizes >= max(1, model["min_per_class"])]
    sel = np.minimum(kept, model["max_per_class"])
    val_frac = model["val_frac"]
    n_val = np.minimum(np.rint(val_frac * sel), sel - 1)
    if val_frac > 0:
        n_val = np.where(sel >= 2, np.maximum(n_val, 1), 0)
    selected, val = int(sel.sum()), int(n_val.sum())
    return {"selected": selected, "train": selected - val, "val": val, "classes": int(len(kept)), "sizes": sel}


def distinct_references(sizes: np.ndarray, queries: int, candidates: int, k: int, refs: str) -> tuple[int, float]:
    """(distinct reference images, pairs per query) for `queries` × `candidates` classes × `k` references.

    Candidates are taken to fall on classes in proportion to their size. first/random: each class has
    one fixed set of min(k, n) references, extracted when the class is a candidate at least once;
    nearest: each (query, class) picks its own min(k, n) of the class's n images.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    sizes = sizes[sizes > 0]
    if not len(sizes) or not queries:
        return 0, 0.0
    p = sizes / sizes.sum()
    per = np.minimum(k, sizes)
    draws = queries * min(candidates, len(sizes))
    pairs_per_query = min(candidates, len(sizes)) * float((p * per).sum())
    if refs == "nearest":
        distinct = sizes * -np.expm1(draws * p * np.log1p(-np.minimum(per / sizes, 1 - 1e-12)))
    else:
        distinct = per * -np.expm1(draws * np.log1p(-np.minimum(p, 1 - 1e-12)))
    return int(round(distinct.sum())), pairs_per_query


# -- per-stage costs --------------------------------------------------------------------------------------

@dataclass
class Cost:
    """One stage's projection: images, seconds, bytes written (run folder / shared cache), peak RAM bytes.

    `parts` names what the disk holds (e.g. {"decoded images": bytes}); `fixes` the options that shrink it.
    """

    images: int = 0
    pairs: float = 0.0  # verification pairs (verify stages)
    seconds: float = 0.0
    disk_run: float = 0.0
    disk_cache: float = 0.0
    ram: float = 0.0
    parts: dict = field(default_factory=dict)
    ram_fixes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"images": int(self.images), "pairs": int(self.pairs), "seconds": round(self.seconds, 1), "disk_run_bytes": int(self.disk_run),
                "disk_cache_bytes": int(self.disk_cache), "ram_bytes": int(self.ram),
                "disk_parts": {k: int(v) for k, v in self.parts.items()}}


CACHE_PARTS = ("decoded images", "base features", "local features")  # under the cache root; the rest: run folder
# disk parts → the options that make them smaller
DISK_FIXES = {
    "decoded images": ["[train] image_size", "[train] max_per_class", "[run] cache_dir on a bigger disk"],
    "base features": ["[train] bottleneck = false", "[train] image_size", "[run] cache_dir on a bigger disk"],
    "local features": ["[verify] n_features", "[localval] max_queries", "[run] cache_dir on a bigger disk"],
    "model checkpoints": ["[train] final_fit = \"split\"", "fewer [[models]]", "[run] root on a bigger disk"],
    "embeddings": ["[verify] refs = \"random\"", "[run] root on a bigger disk"],
}


class _Rates:
    """RATES scaled to this machine's cores and the run's settings."""

    def __init__(self, rates: dict, cores: int):
        self.r, self.cores = rates, max(1, cores)
        self.machine_scale = self.cores / max(1, rates["cores"])

    def decode(self, size: int) -> float:
        """Images/s decoding to size×size with a thread per core (interpolated on S² between 96 and 224)."""
        d = self.r["decode_per_core"]
        t96, t224 = 1 / d["96"], 1 / d["224"]
        t = t96 + (t224 - t96) * (size * size - 96 * 96) / (224 * 224 - 96 * 96)
        return self.cores / max(t, t96 * 0.5)

    def forward(self, backbone: str, size: int) -> float:
        return self.r["forward_96"][backbone] * self.machine_scale * (96 / size) ** 2

    def fine_tune(self, backbone: str, size: int) -> float:
        return self.r["fine_tune_96"][backbone] * self.machine_scale * (96 / size) ** 2

    def head_step(self, params: float, batch: int) -> float:
        h = self.r["head_step"]
        return (h["c0"] + h["per_param"] * params + h["per_param_image"] * params * batch) / self.machine_scale

    def head_forward(self, params: float) -> float:
        """Seconds per image of the head's forward pass (a third of a training step's matmuls)."""
        return self.r["head_step"]["per_param_image"] * params / 3 / self.machine_scale

    def extract(self, extractor: str, max_side: int, workers: int) -> float:
        return self.r["extract_per_core"][extractor] * workers * (512 / max_side) ** 2

    def match(self, extractor: str, n_features: int, workers: int) -> float:
        n = DELF_FEATURES if extractor == "delf" else n_features
        return self.r["match_per_core"][extractor] * workers / (0.3 + 0.7 * (n / 1000) ** 2)


def _verify_workers(v: dict, cores: int) -> int:
    """The processes verify will use (pipeline.parallel.resolve_workers), for a machine of `cores`."""
    return max(1, min(v["workers"] or cores, cores))


@dataclass
class _Plan:
    """What the stage costs depend on, computed once per config: the counts of every image set."""

    cfg: dict
    counts: Counts
    rates: _Rates
    lv: dict = field(init=False)

    def __post_init__(self):
        self.lv = localval_counts(self.counts, self.cfg["localval"])
        self.final_all = self.cfg["train"]["final_fit"] == "all"
        self.missing: dict = {}  # cache entry → P(an image is not in it yet), for subset / held-out images
        self.added: dict = {}  # cache entry → the selections already in it

    def fit(self, model: dict, full: bool) -> dict:
        return selection_counts(self.counts.class_sizes if full else self.lv["train_sizes"], model)

    def test_fit(self, model: dict) -> dict:
        return self.fit(model, self.final_all)

    def add_rows(self, entry: tuple, model: dict, full: bool) -> float:
        """Expected new rows of a per-image cache (decoded images, base features) when a fit adds its selection.

        The caches are keyed by image file, so the local-validation fit and the full fit share the
        images both select. A class's selection is a seeded random draw: two different selections
        overlap as independent draws do; the same selection adds nothing.
        """
        selection = (full, model["max_per_class"], model["min_per_class"], model["seed"])
        if selection in self.added.setdefault(entry, set()):
            return 0.0
        self.added[entry].add(selection)
        n, sub = self.counts.class_sizes.astype(np.float64), self.lv["train_sizes"].astype(np.float64)
        miss_in, miss_out = self.missing.get(entry, (np.ones_like(n), np.ones_like(n)))
        pool = n if full else sub
        sel = np.where(pool >= max(1, model["min_per_class"]), np.minimum(pool, model["max_per_class"]), 0)
        p_in = sel / np.maximum(pool, 1)
        p_out = p_in if full else np.zeros_like(n)
        new = float((sub * miss_in * p_in).sum() + ((n - sub) * miss_out * p_out).sum())
        self.missing[entry] = (miss_in * (1 - p_in), miss_out * (1 - p_out))
        return new


def _train_cost(p: _Plan, model: dict, full: bool) -> Cost:
    b, size = model["backbone"], model["image_size"]
    sel = p.fit(model, full)
    r, c = p.rates, Cost(images=sel["selected"])
    classes = sel["classes"]
    new = p.add_rows(("images", size), model, full)  # decoded once per image file and size
    if new:
        c.seconds += new / r.decode(size)
        c.parts["decoded images"] = new * size * size * 3
    ph, top = head_params(b, classes, size), TOP4_PARAMS[b] * model["fine_tune_layers"] / 4
    full_params = BASE_PARAMS[b] + ph
    fwd, hf = r.forward(b, size), r.head_forward(ph)
    bneck = model["bottleneck"] and model["epochs"] > 0
    new = p.add_rows(("bottleneck", b, size, model["weights"]), model, full) if bneck else 0
    if new:  # float16 features of the frozen base, per image file, backbone, weights and size
        c.seconds += new / fwd
        c.parts["base features"] = new * int(np.prod(feature_shape(b, size))) * 2
    tr, va, bs, hb = sel["train"], sel["val"], model["batch_size"], model["head_batch_size"]
    if bneck:
        c.seconds += model["epochs"] * (math.ceil(tr / hb) * r.head_step(ph, hb) + va * hf)
    else:
        c.seconds += model["epochs"] * (tr / fwd + math.ceil(tr / bs) * r.head_step(ph, bs) + va * (1 / fwd + hf))
    ft = model["fine_tune_epochs"] > 0 and model["fine_tune_layers"] > 0
    if ft:
        c.seconds += model["fine_tune_epochs"] * (tr / r.fine_tune(b, size) + math.ceil(tr / bs) * r.head_step(ph, bs)
                                                  + va * (1 / fwd + hf))
    c.parts["model checkpoints"] = checkpoint_bytes(full_params, ph, top, bneck, ft)
    scores = classes * 4 * LOSS_FACTOR
    act = ACTIVATION_BYTES_PER_PIXEL[b] * size * size
    phases = [full_params * 4 + ph * 4 * 3 + hb * scores if bneck else
              full_params * 4 * 2 + ph * 4 * 2 + bs * (act + scores)]
    if ft:
        phases.append(full_params * 4 * 2 + (ph + top) * 4 * 2 + bs * (act + scores))
    c.ram = TF_BASE_RAM + p.counts.rows * TRAIN_ROW_RAM + max(phases)
    c.ram_fixes = ["[train] head_batch_size" if bneck else "[train] batch_size", "[train] min_per_class"]
    return _split_disk(c)


def _split_disk(c: Cost) -> Cost:
    """Sum `parts` into the run folder (checkpoints, tables, embeddings) and the cache (the rest)."""
    c.disk_cache = sum(v for k, v in c.parts.items() if k in CACHE_PARTS)
    c.disk_run = sum(v for k, v in c.parts.items() if k not in CACHE_PARTS)
    return c


def _predict_cost(p: _Plan, model: dict, embeddings: bool) -> Cost:
    b, size, r = model["backbone"], model["image_size"], p.rates
    pr = p.cfg["predict"]
    retrieval = is_retrieval(model)
    embeddings = embeddings or retrieval
    val_fit, test_fit = p.fit(model, False), p.test_fit(model)
    parts = [(p.lv["queries"], val_fit), (p.counts.test_images, test_fit)]
    if embeddings:  # the training images of each part: references for refs = nearest, a retrieval member's index
        parts += [(p.lv["train_images"], val_fit), (p.counts.rows, test_fit)]
    dim = _embedding_dim(model)
    c = Cost(images=sum(n for n, _ in parts))
    for n, fit in parts:
        ph = head_params(b, fit["classes"], size)
        c.seconds += n * (1 / r.decode(size) + 1 / r.forward(b, size) + r.head_forward(ph))
        c.parts["predictions"] = c.parts.get("predictions", 0) + n * pr["top_k"] * PRED_ROW_BYTES + PARQUET_FILE_BYTES
        if embeddings:
            width = _row_width(p.cfg) if retrieval else 4  # glr predict --embeddings writes float32
            c.parts["embeddings"] = c.parts.get("embeddings", 0) + n * dim * width
    search_ram = 0
    if retrieval:  # every query against every training image of its part
        kn = p.cfg["knn"]
        flops = 2.0 * dim * (p.lv["queries"] * p.lv["train_images"] + p.counts.test_images * p.counts.rows)
        c.seconds += flops / (r.r.get("knn_gflops", RATES["knn_gflops"]) * 1e9) / (
            1 if kn["search"] == "exact" else ANN_SPEEDUP)
        search_ram = (3 * 4 * kn["query_block"] * kn["block_size"] if kn["search"] == "exact"
                      else int(p.counts.rows * dim * 4 * ANN_RAM_FACTOR))
    classes = max(fit["classes"] for _, fit in parts)
    full_params = BASE_PARAMS[b] + head_params(b, classes, size)
    act = ACTIVATION_BYTES_PER_PIXEL[b] * size * size * INFERENCE_ACTIVATION_SHARE
    c.ram = (TF_BASE_RAM + full_params * 4 + pr["batch_size"] * (classes * 4 * PREDICT_FACTOR + act)
             + max(n for n, _ in parts) * pr["top_k"] * TABLE_ROW_RAM  # the N×k table, written at the end
             + search_ram)
    c.ram_fixes = ["[predict] batch_size"] + (["[knn] block_size"] if retrieval else [])
    return _split_disk(c)


def _embedding_dim(model: dict) -> int:
    """A model's embedding width: its neck's, else its backbone's pooled features."""
    return model.get("embedding_dim") or EMBEDDING_DIM[model["backbone"]]


def _row_width(cfg: dict) -> int:
    """Bytes per component of what `glr embed` writes in a run ([knn] float16)."""
    return 2 if cfg["knn"]["float16"] else 4


def _pool_cost(p: _Plan) -> Cost | None:
    """[knn] nonlandmark_pool embedded by both models of the first retrieval member (its files counted)."""
    from pipeline.images import image_files

    member = pool_member(p.cfg)
    if member is None:
        return None
    pool = p.cfg["knn"]["nonlandmark_pool"]
    n = 2 * sum(1 for _ in image_files(pool)) if Path(pool).is_dir() else 0
    b, size, r = member["backbone"], member["image_size"], p.rates
    c = Cost(images=n, seconds=n * (1 / r.decode(size) + 1 / r.forward(b, size)),
             ram=TF_BASE_RAM + BASE_PARAMS[b] * 4, parts={"embeddings": n * _embedding_dim(member) * _row_width(p.cfg)})
    return _split_disk(c)


def _table_cost(rows: float, rates: _Rates, disk: dict | None = None, passes: float = 1) -> Cost:
    c = Cost(seconds=passes * rows / rates.r["table_rows_per_s"], ram=PY_BASE_RAM + rows * TABLE_ROW_RAM * 2,
             parts=dict(disk or {}))
    return _split_disk(c)


def _verify_cost(p: _Plan, part: str) -> Cost:
    v, r = p.cfg["verify"], p.rates
    first = p.cfg["models"][0]
    if part == "val":
        queries, sizes = p.lv["queries"], p.fit(first, False)["sizes"]
    else:
        queries, sizes = p.counts.test_images, p.test_fit(first)["sizes"]
    refs, per_query = distinct_references(sizes, queries, v["candidates"], v["k"], v["refs"])
    pairs = queries * per_query
    workers = _verify_workers(v, r.cores)
    n = DELF_FEATURES if v["extractor"] == "delf" else v["n_features"]
    c = Cost(images=queries + refs, pairs=pairs)
    c.seconds = (c.images / r.extract(v["extractor"], v["max_side"], workers)
                 + pairs / r.match(v["extractor"], v["n_features"], workers))
    c.parts = {"local features": c.images * (n * LOCAL_FEATURE_BYTES[v["extractor"]] + FEATURE_FILE_BYTES),
               "inliers": pairs * INLIER_ROW_BYTES + PARQUET_FILE_BYTES}
    c.ram = (PY_BASE_RAM + pairs * PAIR_ROW_RAM + p.counts.rows * TRAIN_ROW_RAM
             + workers * VERIFY_WORKER_RAM[v["extractor"]])
    c.ram_fixes = ["[verify] workers", "[verify] candidates"]
    return _split_disk(c)


def stage_costs(cfg: dict, counts: Counts, rates: dict | None = None, cores: int | None = None) -> dict[str, Cost]:
    """The projection of every stage of `plan(cfg)` (by stage name) for a competition of `counts`."""
    r = _Rates(rates or RATES, cores or available_cores())
    p = _Plan(cfg, counts, r)
    k = cfg["predict"]["top_k"]
    n_models = len(cfg["models"])
    q, t = p.lv["queries"], counts.test_images
    csv_bytes = counts.rows * CSV_ROW_BYTES
    out: dict[str, Cost] = {
        "data": Cost(images=0, seconds=csv_bytes / (r.r["hash_mb_per_s"] * MB) + counts.rows / 1e6,
                     ram=PY_BASE_RAM + counts.rows * TRAIN_ROW_RAM),
        "localval": _split_disk(Cost(images=p.lv["train_images"] + q,
                                     seconds=counts.rows / r.r["stat_per_s"] + (p.lv["train_images"] + q)
                                     / r.r["link_per_s"] + counts.rows / r.r["table_rows_per_s"],
                                     ram=PY_BASE_RAM + counts.rows * TRAIN_ROW_RAM * 3,
                                     parts={"tables": (p.lv["train_images"] + 2 * q) * CSV_ROW_BYTES})),
    }
    for kind, full in [("train", False)] + ([("train_all", True)] if p.final_all else []):
        for m in cfg["models"]:
            out[f"{kind}:{m['name']}"] = _train_cost(p, m, full)
    nearest = cfg["verify"]["refs"] == "nearest"
    for i, m in enumerate(cfg["models"]):
        out[f"predict:{m['name']}"] = _predict_cost(p, m, nearest and i == 0)
    pool = _pool_cost(p)
    if pool is not None:
        out["nonlandmark"] = pool
    ek = cfg["ensemble"]["top_k"]
    tables = (q + t) * ek * PRED_ROW_BYTES + 2 * PARQUET_FILE_BYTES  # a predictions table per part
    out["ensemble"] = _table_cost((q + t) * k * (n_models + 1), r, {"predictions": tables})
    for part in ("val", "test"):
        out[f"verify:{part}"] = _verify_cost(p, part)
    pairs_val = out["verify:val"].pairs
    tn = cfg["tune"]
    trials = tn["trials"] or 100
    tune = _table_cost(q * ek + pairs_val, r, {"policy and study": trials * 2 * KB})
    tune.seconds += trials * ((q * ek + pairs_val) / r.r["tune_row_trials_per_s"] + r.r["tune_trial_s"])
    out["tune"] = tune
    all_pairs = pairs_val + out["verify:test"].pairs
    out["rescore"] = _table_cost((q + t) * ek + all_pairs, r, {"predictions": tables})
    out["submission"] = _table_cost(t * ek, r, {"submission": t * SUBMISSION_ROW_BYTES}, passes=2)
    out["upload"] = _table_cost(t, r, {})
    out["report"] = _table_cost((q + t) * ek, r, {"report": 0.2 * MB * (1 + cfg["report"]["examples"])})
    return out


# -- the machine ---------------------------------------------------------------------------------------

def disk(path: str | os.PathLike) -> dict:
    """{"path", "free", "device"} of the filesystem that holds (or will hold) `path`."""
    p = existing_parent(path)
    return {"path": str(path), "free": shutil.disk_usage(p).free, "device": os.stat(p).st_dev}


@dataclass
class Limits:
    """What the run must fit in; injectable (tests, planning another machine)."""

    ram: float
    ram_available: float
    run_free: float
    cache_free: float
    same_disk: bool

    @classmethod
    def here(cls, run_dir: Path, cache_dir: Path) -> "Limits":
        mem, a, b = memory(), disk(run_dir), disk(cache_dir)
        return cls(mem["total"], mem["available"], a["free"], b["free"], a["device"] == b["device"])


# -- the plan ------------------------------------------------------------------------------------------

def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def check_fit(rows: list[dict], limits: Limits) -> list[dict]:
    """The problems of a costed plan: stages over the RAM, and the first stage whose writes overflow a disk."""
    problems = []
    for r in rows:
        if r["cost"] and r["cost"]["ram_bytes"] > limits.ram:
            problems.append({"kind": "ram", "stage": r["stage"], "need": r["cost"]["ram_bytes"], "have": limits.ram,
                             "options": r["ram_fixes"]})
    run_total = cache_total = 0.0
    parts: dict[str, float] = {}
    seen = set()
    for r in rows:
        if not r["cost"]:
            continue
        run_total += r["cost"]["disk_run_bytes"]
        cache_total += r["cost"]["disk_cache_bytes"]
        for k, v in r["cost"]["disk_parts"].items():
            parts[k] = parts.get(k, 0) + v
        checks = ([("run folder and cache", run_total + cache_total, limits.run_free, set(parts))]
                  if limits.same_disk else
                  [("run folder", run_total, limits.run_free, set(parts) - set(CACHE_PARTS)),
                   ("cache", cache_total, limits.cache_free, set(CACHE_PARTS))])
        for where, need, have, kinds in checks:
            if need > have and where not in seen:
                seen.add(where)
                biggest = max((k for k in parts if k in DISK_FIXES and k in kinds), key=parts.get, default=None)
                problems.append({"kind": "disk", "stage": r["stage"], "where": where, "need": need, "have": have,
                                 "biggest": biggest, "biggest_bytes": parts.get(biggest, 0),
                                 "options": DISK_FIXES.get(biggest, ["[run] root on a bigger disk"])})
    return problems


# candidate single changes tried when a plan does not fit: (label, section, key, value)
FIX_CANDIDATES = [
    ("[train] bottleneck = false", "train", "bottleneck", False),
    ("[train] image_size = 64", "train", "image_size", 64),
    ("[train] max_per_class = 1000", "train", "max_per_class", 1000),
    ("[train] max_per_class = 300", "train", "max_per_class", 300),
    ("[localval] max_queries = 50000", "localval", "max_queries", 50_000),
    ("[verify] n_features = 500", "verify", "n_features", 500),
    ("[train] final_fit = \"split\"", "train", "final_fit", "split"),
    ("[predict] batch_size = 16", "predict", "batch_size", 16),
    ("[train] head_batch_size = 64", "train", "head_batch_size", 64),
    ("[verify] workers = 1", "verify", "workers", 1),
    ("[train] min_per_class = 5", "train", "min_per_class", 5),
]


def with_option(cfg: dict, section: str, key: str, value: Any) -> dict:
    """A copy of a validated config with one option changed (in [[models]] too for [train] keys)."""
    import copy

    new = copy.deepcopy(cfg)
    new[section][key] = value
    if section == "train":
        for m in new["models"]:
            if key in m:
                m[key] = value
    return new


def cost_rows(cfg: dict, counts: Counts | None, actions: list[dict], rates: dict | None = None,
              cores: int | None = None) -> list[dict]:
    """The engine's plan rows ({stage, action, why}) with each running stage's cost (None when skipped)."""
    costs = stage_costs(cfg, counts, rates, cores) if counts is not None else {}
    rows = []
    for a in actions:
        c = costs.get(a["stage"]) if a["action"] == "run" else None
        rows.append({**a, "cost": c.as_dict() if c else None, "ram_fixes": c.ram_fixes if c else []})
    return rows


def fixes(cfg: dict, counts: Counts, actions: list[dict], limits: Limits, rates: dict | None = None,
          cores: int | None = None) -> list[str]:
    """The single option changes (of FIX_CANDIDATES) after which the whole plan fits."""
    out = []
    for label, section, key, value in FIX_CANDIDATES:
        if cfg[section].get(key) == value:
            continue
        alt = with_option(cfg, section, key, value)
        if not check_fit(cost_rows(alt, counts, actions, rates, cores), limits):
            out.append(label)
    return out


def costed_plan(cfg: dict, actions: list[dict], *, run_dir: str | os.PathLike, counts: Counts | None = None,
                rates: dict | None = None, limits: Limits | None = None, cores: int | None = None,
                rates_source: str = "stored") -> dict:
    """The plan as data: rows with costs, totals, limits, problems, and the options that make it fit."""
    from pipeline.caches import cache_root

    cache = cache_root(cfg["data"]["data_dir"], cfg["run"]["cache_dir"])
    limits = limits or Limits.here(Path(run_dir), cache)
    rows = cost_rows(cfg, counts, actions, rates, cores)
    costed = [r["cost"] for r in rows if r["cost"]]
    totals = {"seconds": sum(c["seconds"] for c in costed),
              "disk_run_bytes": sum(c["disk_run_bytes"] for c in costed),
              "disk_cache_bytes": sum(c["disk_cache_bytes"] for c in costed),
              "ram_bytes": max((c["ram_bytes"] for c in costed), default=0),
              "ram_stage": max((r for r in rows if r["cost"]), key=lambda r: r["cost"]["ram_bytes"],
                               default={"stage": None})["stage"]}
    problems = check_fit(rows, limits) if counts is not None else []
    r = rates or RATES
    return {"run_dir": str(run_dir), "cache_dir": str(cache), "counts": counts.summary() if counts else None,
            "stages": [{k: v for k, v in row.items() if k != "ram_fixes"} for row in rows], "totals": totals,
            "limits": {"ram_bytes": int(limits.ram), "ram_available_bytes": int(limits.ram_available),
                       "run_free_bytes": int(limits.run_free), "cache_free_bytes": int(limits.cache_free),
                       "same_disk": limits.same_disk},
            "problems": problems,
            "fits": not problems,
            "fixes": fixes(cfg, counts, actions, limits, rates, cores) if problems else [],
            "rates": {"source": rates_source, "machine": r.get("machine"), "measured": r.get("measured"),
                      "cores_measured": r.get("cores"), "cores_here": cores or available_cores()}}


def warnings_of(plan: dict) -> list[str]:
    """One `warning:` line per problem, naming the option(s) that make it fit."""
    lines = []
    for pr in plan["problems"]:
        if pr["kind"] == "ram":
            lines.append(f"warning: {pr['stage']} needs ~{human_bytes(pr['need'])} RAM, the machine has "
                         f"{human_bytes(pr['have'])}: lower {' or '.join(pr['options'])}")
        else:
            what = f" (the largest part: {pr['biggest']}, {human_bytes(pr['biggest_bytes'])})" if pr["biggest"] else ""
            lines.append(f"warning: disk: by the end of {pr['stage']} the {pr['where']} will hold "
                         f"{human_bytes(pr['need'])}, {human_bytes(pr['have'])} free{what}: set "
                         f"{' or '.join(pr['options'])}")
    if plan["fixes"]:
        lines.append(f"warning: the whole run fits with any one of: {'; '.join(plan['fixes'])}")
    return lines


def format_plan(plan: dict) -> list[str]:
    """The plan as text: the engine's columns (stage, run/skip/keep, why) then the costs, totals, warnings."""
    from pipeline.run.engine import plan_lines

    def cells(c: dict | None) -> tuple[str, ...]:
        if c is None:
            return ("-", "-", "-", "-")
        return (f"{c['images']:,}", fmt_seconds(c["seconds"]), human_bytes(c["disk_run_bytes"] + c["disk_cache_bytes"]),
                human_bytes(c["ram_bytes"]))

    known = plan["counts"] is not None
    extra = [cells(s["cost"]) if known else ("?",) * 4 for s in plan["stages"]]
    rows = [(s["stage"], s["action"], s["why"]) for s in plan["stages"]]
    lines = plan_lines(Path(plan["run_dir"]), rows, headers=("images", "time", "disk", "peak RAM"), extra=extra)
    lim, tot = plan["limits"], plan["totals"]
    if not known:
        return lines + ["costs: unknown until the competition's train.csv is in [data] data_dir "
                        "(fetch = true downloads it in the data stage)"]
    c = plan["counts"]
    lines += [
        f"total of the stages to run: {fmt_seconds(tot['seconds'])}, disk {human_bytes(tot['disk_run_bytes'])} in the "
        f"run folder + {human_bytes(tot['disk_cache_bytes'])} in the cache, peak RAM {human_bytes(tot['ram_bytes'])}"
        + (f" ({tot['ram_stage']})" if tot["ram_stage"] else ""),
        f"this machine: {human_bytes(lim['ram_bytes'])} RAM ({human_bytes(lim['ram_available_bytes'])} available); "
        f"free disk {human_bytes(lim['run_free_bytes'])} at {plan['run_dir']}"
        + ("" if lim["same_disk"] else f", {human_bytes(lim['cache_free_bytes'])} at {plan['cache_dir']}")
        + (f" (cache {plan['cache_dir']} on the same disk)" if lim["same_disk"] else ""),
        f"competition: {c['train_images']:,} training images, {c['classes']:,} classes, {c['test_images']:,} test "
        f"images; rates: {plan['rates']['source']} ({plan['rates']['machine']}, {plan['rates']['cores_here']} "
        f"core(s) here); caches assumed empty",
    ]
    return lines + warnings_of(plan)


def dry_run(config: str | os.PathLike | dict, *, from_stage: str | None = None, only: str | None = None,
            measure: bool = False, limits: Limits | None = None, echo: Callable[[str], None] = print) -> dict:
    """`glr run --dry-run`: the engine's plan with costs; returns the plan as data (see costed_plan)."""
    from pipeline.run.config import load_config, validate
    from pipeline.run.engine import execute
    from pipeline.run.layout import layout_of
    from pipeline.run.stages import plan

    t0 = time.perf_counter()
    cfg = load_config(config) if not isinstance(config, dict) else validate(config)
    run_dir = layout_of(cfg).root
    manifest = execute(plan(cfg), run_dir, cfg, from_stage=from_stage, only=only, dry_run=True, echo=lambda s: None)
    counts = read_counts(cfg["data"]["data_dir"])
    rates, source = RATES, f"stored, measured {RATES['measured']}"
    if measure and counts is not None:
        rates = measure_rates(cfg["data"]["data_dir"], backbones=sorted({m["backbone"] for m in cfg["models"]}),
                              extractor=cfg["verify"]["extractor"], echo=echo)
        source = "measured now on this competition's images"
    result = costed_plan(cfg, manifest["last_plan"], run_dir=run_dir, counts=counts, rates=rates, limits=limits,
                         rates_source=source)
    result["plan_seconds"] = round(time.perf_counter() - t0, 2)
    for line in format_plan(result):
        echo(line)
    return result


# -- measuring the rates --------------------------------------------------------------------------------

def _timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _sample_images(data_dir: str | os.PathLike | None, n: int, tmp: Path) -> list[Path]:
    """Up to `n` training images of the competition, else synthetic 640 px photos written to `tmp`."""
    if data_dir is not None:
        from pipeline.acquire.competition import Competition

        comp = Competition(data_dir)
        ids = comp.train["id"].tolist()
        step = max(1, len(ids) // n)
        paths = [p for p in comp.image_paths(ids[::step][: n * 2], "train") if p.exists()][:n]
        if paths:
            return paths
    from pipeline.acquire.synth import make_competition

    make_competition(tmp / "comp", landmarks=2, per_landmark=max(2, n // 2), test=2, size=640, seed=0)
    return sorted((tmp / "comp" / "train").rglob("*.jpg"))[:n]


def measure_decode(paths: list[Path], size: int) -> float:
    """Images/s on one core: decode to size×size (pipeline.model.data.load_square)."""
    from pipeline.model.data import load_square

    load_square(paths[0], size)
    return len(paths) / _timed(lambda: [load_square(p, size) for p in paths])


def measure_forward(backbone: str, size: int = 96, batch: int = 32, steps: int = 3) -> tuple[float, float]:
    """(forward images/s, fine-tune images/s) of `backbone` at `size` px on random images, whole machine."""
    from pipeline.model import backbones as M

    M.quiet_tf()
    import keras

    M.set_precision(M.resolve_precision("auto"))
    model = M.build_model(backbone, 16, size, weights=None)
    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = np.arange(batch) % 16
    extractor = M.feature_extractor(model)
    infer = __import__("tensorflow").function(lambda t: extractor(t, training=False))
    infer(x)
    fwd = batch * steps / _timed(lambda: [infer(x) for _ in range(steps)])
    M.unfreeze_top(model, 4)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    ft = batch * steps / _timed(lambda: [model.train_on_batch(x, y) for _ in range(steps)])
    keras.backend.clear_session()
    return fwd, ft


def measure_head_step(points: tuple = ((2048, 2000, 32), (2048, 2000, 256), (2048, 10000, 32),
                                       (2048, 10000, 256)), steps: int = 3) -> dict:
    """Least-squares fit of a head step's seconds = c0 + per_param·P + per_param_image·P·batch (Adam, softmax)."""
    from pipeline.model import backbones as M

    M.quiet_tf()
    import keras

    rows, times = [], []
    for features, classes, batch in points:
        inp = keras.Input((features,))
        model = keras.Model(inp, keras.layers.Dense(classes, activation="softmax", dtype="float32")(inp))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        x = np.random.default_rng(0).normal(size=(batch, features)).astype(np.float32)
        y = np.arange(batch) % classes
        model.train_on_batch(x, y)
        params = features * classes + classes
        rows.append([1.0, params, params * batch])
        times.append(_timed(lambda: [model.train_on_batch(x, y) for _ in range(steps)]) / steps)
        keras.backend.clear_session()
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    c0, per_param, per_image = (max(float(v), 0.0) for v in coef)
    return {"c0": c0, "per_param": per_param, "per_param_image": per_image}


def measure_verify(paths: list[Path], extractor: str = "sift") -> tuple[float, float]:
    """(images/s, pairs/s) on one core: local features at the defaults, then matching + RANSAC of pairs."""
    import cv2

    from pipeline.verify.features import make_config, make_extractor
    from pipeline.verify.matching import match_config, match_features

    cv2.setNumThreads(1)
    config = match_config(extractor)  # the extractor's default threshold, as glr verify uses it
    ex = make_extractor(make_config(extractor))
    feats = []
    secs = _timed(lambda: feats.extend(ex.extract_path(p) for p in paths))
    pairs = [(a, b) for i, a in enumerate(feats) for b in feats[i + 1:]][:30]
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        match_s = _timed(lambda: [match_features(a, b, config) for a, b in pairs])
    found = float(np.mean([f.n for f in feats])) if feats else 1000.0
    # matching cost grows with the keypoints found: stored as if each image had n_features = 1000
    scale = (0.3 + 0.7 * (min(found, 1000) / 1000) ** 2)
    return len(paths) / secs, len(pairs) / match_s * scale


def measure_io(tmp: Path, n: int = 2000) -> dict:
    """Files checked, hard links made, MB hashed and prediction rows written + read, per second."""
    import hashlib

    import pandas as pd

    from submissions.tables import read_predictions, write_predictions

    files = [tmp / f"f{i}" for i in range(n)]
    for f in files:
        f.write_bytes(b"x")
    stat = n / _timed(lambda: [f.exists() for f in files])
    (tmp / "links").mkdir()
    link = n / _timed(lambda: [os.link(f, tmp / "links" / f.name) for f in files])
    blob = os.urandom(64 * 1024 * 1024)
    hash_mb = 64 / _timed(lambda: hashlib.sha256(blob).digest())
    rows, k = 40_000, 5
    ids = np.char.mod("%016x", np.arange(rows) * 7919).astype(str)
    table = pd.DataFrame({"id": np.repeat(ids, k), "landmark_id": np.tile(np.arange(k), rows),
                          "score": np.ones(rows * k, np.float32), "rank": np.tile(np.arange(k, dtype=np.int16), rows)})
    io = rows * k / _timed(lambda: read_predictions(write_predictions(table, tmp / "p.parquet") or tmp / "p.parquet"))
    return {"stat_per_s": round(stat, -2), "link_per_s": round(link, -2), "hash_mb_per_s": round(hash_mb),
            "table_rows_per_s": float(f"{io:.2g}")}


def measure_rates(data_dir: str | os.PathLike | None = None, *, backbones: list[str] | tuple = ("vgg16", "vgg19",
                  "resnet50"), extractor: str = "sift", images: int = 12, head: bool = True,
                  echo: Callable[[str], None] = lambda s: None) -> dict:
    """RATES measured now: a few images of `data_dir` (or synthetic photos), each backbone, the head step.

    Keys not measured (another extractor's, DELF's) keep their stored values.
    """
    import platform
    import tempfile

    rates = {**RATES, "decode_per_core": dict(RATES["decode_per_core"]), "forward_96": dict(RATES["forward_96"]),
             "fine_tune_96": dict(RATES["fine_tune_96"]), "extract_per_core": dict(RATES["extract_per_core"]),
             "match_per_core": dict(RATES["match_per_core"])}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _sample_images(data_dir, images, Path(tmp))
        echo(f"measuring on {len(paths)} image(s): decode, {extractor}, {', '.join(backbones)}")
        for size in (96, 224):
            rates["decode_per_core"][str(size)] = round(measure_decode(paths, size), 1)
        if extractor != "delf":
            e, m = measure_verify(paths, extractor)
            rates["extract_per_core"][extractor], rates["match_per_core"][extractor] = round(e, 2), round(m, 1)
        rates.update(measure_io(Path(tmp)))
    for b in backbones:
        fwd, ft = measure_forward(b)
        rates["forward_96"][b], rates["fine_tune_96"][b] = round(fwd, 1), round(ft, 1)
    if head:
        rates["head_step"] = {k: float(f"{v:.3g}") for k, v in measure_head_step().items()}
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    rates.update(machine=f"{cpu}, {available_cores()} cores", cores=available_cores(),
                 measured=time.strftime("%Y-%m-%d"))
    return rates


if __name__ == "__main__":  # python -m pipeline.run.costs: measure this machine's rates (for RATES)
    import json
    import sys

    print(json.dumps(measure_rates(sys.argv[1] if len(sys.argv) > 1 else None, echo=print), indent=1))
