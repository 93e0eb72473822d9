"""Every stage option, defined once: the single source of the CLI flags, the config and its docs.

Each `Section` lists a stage's options (`tuning.options.Option`: name, default, type, range,
help). From them come the Click options of the stage's command (`click_options`), the
validation of the `glr run` TOML file (`pipeline.run.config`), `glr config-example`
(`example_config`) and docs/config.md (`config_reference`). Stage functions take their
defaults from here (`TRAIN.default("epochs")`), so a default is written in one place only.
Light on purpose (no numpy, no TensorFlow): `glr --help` imports it.
"""
from __future__ import annotations

from typing import Any, Callable

from submissions.errors import UserError
from tuning.options import TUNE, Option, Section

BACKBONES = ("vgg16", "vgg19", "resnet50")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
EXTRACTORS = ("sift", "orb", "delf")
DELF_HANDLE = "https://tfhub.dev/google/delf/1"

RUN = Section("run", "Where the run folder is: <root>/<name>; re-running reuses it and skips unchanged stages.", (
    Option("name", "glr", "Run folder name (a single folder name: no slashes, not '.' or '..')."),
    Option("root", "runs", "Folder that holds the run folders.", path=True),
    Option("seed", 0, "Default seed of every stage ([localval], [train], [verify], [tune]) that does not set "
           "its own.", type=int),
    Option("cache_dir", None, "Folder of the caches (decoded images, base features, local features), shared by "
           "every model, stage and later run on the same data; list and prune it with `glr cache` "
           "[default: DATA_DIR/.glr-cache].", path=True),
))

DATA = Section("data", "The competition.", (
    Option("data_dir", "data", "A competition folder in Kaggle's layout (train.csv, train/, test/, "
           "sample_submission.csv).", path=True),
    Option("competition", "landmark-recognition-2021", "Kaggle's name of the competition."),
    Option("fetch", False, "Run `glr fetch <competition>` into data_dir first (needs Kaggle credentials).",
           type=bool),
    Option("files", [], "With fetch: only these files of the competition, e.g. [\"train.csv\", "
           "\"train/0/0/0\"].", type=list, item=str),
))

LOCALVAL = Section("localval", "The local validation split built from the training data (tuning uses it).", (
    Option("holdout_frac", 0.2, "Per class, this share of the images become validation queries.",
           type=float, min=0, max=1, min_open=True, max_open=True),
    Option("unseen_class_frac", 0.1, "This share of the classes is left out of training: their images are "
           "non-landmark queries.", type=float, min=0, max=1, max_open=True),
    Option("min_train_per_class", 2, "A class keeps at least this many training images (smaller classes give "
           "no queries).", type=int, min=1),
    Option("max_queries", 100_000, "Cap on validation queries, drawn at random (0 = no cap). The default is about "
           "the size of a real test set (GLDv2: 117,577 queries); GLDv2's full holdout would be ~445k.",
           type=int, min=0),
    Option("seed", 0, "Seed of the split.", type=int),
))

TRAIN = Section("train", "`glr train`: transfer learning, head on the frozen base then fine-tuning. In `glr "
                "run` these are the defaults of every [[models]] entry.", (
    Option("weights", "imagenet", "Base weights: imagenet (downloaded by Keras), none (from scratch), or a "
           "weights file path."),
    Option("image_size", 96, "Input size in pixels.", type=int, min=32, max=2048),
    Option("epochs", 10, "Head epochs on the frozen base.", type=int, min=0),
    Option("fine_tune_epochs", 2, "Epochs fine-tuning the top layers with augmentation (0 = skip).",
           type=int, min=0),
    Option("fine_tune_layers", 4, "Weighted layers at the top of the base made trainable for fine-tuning.",
           type=int, min=0, advanced=True),
    Option("batch_size", 32, "Images per training step (fine-tuning, and the head when bottleneck = false).",
           type=int, min=1),
    Option("head_batch_size", 256, "Cached base features per step when training the head on them (bottleneck): "
           "with tens of thousands of classes a step's cost is the optimizer update of the head, so large batches "
           "are much faster per image.", type=int, min=1, advanced=True),
    Option("lr", 1e-3, "Adam learning rate of the head phase.", type=float, min=0, min_open=True,
           advanced=True),
    Option("fine_tune_lr", 1e-4, "Adam learning rate when fine-tuning.", type=float, min=0, min_open=True,
           advanced=True),
    Option("decay", 0.0, "Learning-rate decay: lr / (1 + decay·step).", type=float, min=0, advanced=True),
    Option("precision", "auto", "Mixed precision; auto = fp16 on GPU, bf16 on CPUs with AMX/AVX512-BF16, "
           "else fp32.", choices=PRECISIONS),
    Option("max_per_class", 3000, "Cap on images per class (random, seeded).", type=int, min=1),
    Option("min_per_class", 1, "Drop classes with fewer images.", type=int, min=1),
    Option("val_frac", 0.1, "Stratified validation share per class.", type=float, min=0, max=1, max_open=True),
    Option("patience", 3, "Early stopping: epochs without a lower validation loss.", type=int, min=1,
           advanced=True),
    Option("augment", True, "The study's augmentation (rotation 30°, shifts 0.2, zoom 0.5, brightness "
           "0.5–1.5).", type=bool, advanced=True),
    Option("flip", False, "Also random horizontal flips.", type=bool, flag="--flip/--no-flip", advanced=True),
    Option("bottleneck", True, "Train the head on cached base features (fast) instead of on images.",
           type=bool, advanced=True),
    Option("head", "softmax", "Classifier head: softmax (the study's Dense + softmax) or arcface (additive angular "
           "margin on L2-normalised embeddings, for retrieval; predicts softmax(scale·cosine) without the margin).",
           choices=("softmax", "arcface")),
    Option("pooling", "auto", "Pooling of the base's feature map: auto = the backbone's own (Flatten for vgg16/"
           "vgg19, average for resnet50), avg, or gem (generalised mean, learnable p, initialised 3).",
           choices=("auto", "avg", "gem")),
    Option("embedding_dim", 0, "Width of a Dense + BatchNorm neck before the head, whose output becomes the "
           "embedding (0 = no neck: the backbone's own embedding).", type=int, min=0),
    Option("arcface_margin", 0.3, "ArcFace additive angular margin m (radians; training only).", type=float,
           min=0, max=1.5, advanced=True),
    Option("arcface_scale", 30.0, "ArcFace scale s of the cosine logits (training and prediction).", type=float,
           min=0, min_open=True, advanced=True),
    Option("arcface_subcentres", 1, "ArcFace centres per class (sub-centre ArcFace; a class's cosine is its "
           "largest).", type=int, min=1, advanced=True),
    Option("seed", 0, "Seed of the split, the sampling and the initial weights.", type=int),
    Option("final_fit", "all", "Models that predict the real test set: all = each model retrained with these "
           "settings on the FULL training set (stages train_all:<model>), so the classes and images held out "
           "for local validation can be predicted too; split = the local-validation models (faster). "
           "Tuning always uses split.", choices=("all", "split"), cli=False),
))

PREDICT = Section("predict", "`glr predict`: top-k landmarks of every image.", (
    Option("top_k", 5, "Predictions kept per image.", type=int, min=1),
    Option("batch_size", 64, "Images per inference step.", type=int, min=1),
    Option("precision", None, "Run inference under this precision instead of the model's training precision.",
           choices=PRECISIONS, advanced=True),
))

KNN = Section("knn", "`glr knn`, and the retrieval members of `glr run` (`[[models]] kind = \"retrieval\"`): `glr embed` "
              "of the training and test images with the member's model, then `glr knn` (cosine kNN; classes scored "
              "from the neighbours).", (
    Option("k", 20, "Neighbours per query.", type=int, min=1),
    Option("score", "sum", "Class score: sum of its neighbours' similarities / k (in [0, 1], averaged with "
           "classifiers' probabilities as is), or its best similarity (negatives count 0).", choices=("sum", "max")),
    Option("search", "exact", "exact (blocked matmul), or an approximate faiss index in RAM (N × D × 4 B; pip install "
           "glr[ann]): ivf (inverted lists) or hnsw (neighbour graph); its recall@k vs exact is printed.",
           choices=("exact", "ivf", "hnsw")),
    Option("float16", False, "Store the embeddings as float16 (half the disk; about 1e-3 per component).",
           type=bool, cli=False),
    Option("nonlandmark_pool", None, "glr run: a folder of non-landmark photos (indoor scenes, people, objects…). "
           "The first retrieval member embeds it (`glr embed --images`) and scores each query's similarity to it "
           "(`glr nonlandmark`, stage nonlandmark); `glr tune` then also searches a demotion by it (identity stays "
           "reachable) and rescoring applies it. Empty: no non-landmark term.", path=True, cli=False),
    Option("nonlandmark_k", 1, "glr run: a query's non-landmark signal is the mean of its k best similarities to the "
           "pool.", type=int, min=1, cli=False, advanced=True),
    Option("nlist", 0, "ivf: lists (k-means centroids); 0 = about 4·sqrt(index rows).", type=int, min=0,
           advanced=True),
    Option("nprobe", 64, "ivf: lists scanned per query (more: higher recall, slower; = nlist: exact).", type=int,
           min=1, advanced=True),
    Option("hnsw_m", 32, "hnsw: links per node.", type=int, min=2, advanced=True),
    Option("ef_search", 64, "hnsw: search breadth (at least k is used; more: higher recall, slower).", type=int,
           min=1, advanced=True),
    Option("recall_sample", 1000, "ivf/hnsw: queries (seeded sample) searched exactly too, to measure recall@k; "
           "0 = skip.", type=int, min=0, advanced=True),
    Option("block_size", 65536, "Rows of the searched file (index or pool) per block (memory ≈ 4 B × query block × "
           "block size, ×3 at most).", type=int, min=1, advanced=True),
    Option("query_block", 1024, "Query rows per block.", type=int, min=1, advanced=True),
    Option("backend", "numpy", "numpy (BLAS on the CPU) or tf (TensorFlow's matmul and top-k; on a GPU when "
           "visible).", choices=("numpy", "tf"), advanced=True),
))
# the exact search's own keys, shared by `glr knn` and `glr nonlandmark`
SEARCH_KEYS = ("block_size", "query_block", "backend")

ENSEMBLE = Section("ensemble", "`glr ensemble`: weighted average of the models' predictions.", (
    Option("weights", [], "One weight per model (per [[models]] entry, in order); empty = equal weights. On the "
           "command line: comma-separated.", type=list, item=float, min=0),
    Option("top_k", 5, "Predictions kept per image.", type=int, min=1),
))

VERIFY = Section("verify", "`glr verify`: RANSAC inliers between each query and reference images of its "
                 "candidate classes.", (
    Option("extractor", "sift", "Local features: sift (RootSIFT, offline), orb (fast), delf (TF-Hub module or a "
           "local copy).", choices=EXTRACTORS),
    Option("candidates", 3, "Verify each query's top-N predicted classes.", type=int, min=1),
    Option("k", 3, "Reference training images per candidate class.", type=int, min=1),
    Option("refs", "random", "Which references: first in train.csv, seeded random, or nearest by the models' "
           "global embeddings.", choices=("first", "random", "nearest")),
    Option("workers", 0, "Processes (0 = one per available core); each uses one BLAS/OpenCV/TensorFlow thread.",
           type=int, min=0),
    Option("seed", 0, "RANSAC seed (and refs = random): same inputs, same counts.", type=int),
    Option("max_side", 512, "Working image size, longest side in pixels.", type=int, min=16, advanced=True),
    Option("n_features", 1000, "At most this many keypoints per image (sift/orb).", type=int, min=1,
           advanced=True),
    Option("delf_handle", DELF_HANDLE, "DELF TF-Hub handle: URL or local copy of the module.", advanced=True),
    Option("ratio", 0.85, "Lowe's ratio test for sift/orb.", type=float, min=0, max=1, min_open=True,
           advanced=True),
    Option("mutual", True, "Keep only mutual nearest neighbours.", type=bool, advanced=True),
    Option("model", "affine", "Geometric model checked by RANSAC.", choices=("affine", "homography", "fundamental"),
           advanced=True),
    Option("method", "prosac", "OpenCV USAC_PROSAC (samples the best matches first), RANSAC or USAC_MAGSAC.",
           choices=("prosac", "ransac", "magsac"), advanced=True),
    Option("threshold", None, "Reprojection threshold in working-image pixels [default: 20 for sift (with "
           "prosac) and delf (its reference matcher's), 12 for orb].", type=float, min=0, min_open=True, advanced=True),
    Option("chunk_size", 64, "Pairs per finished chunk (the unit of resuming).", type=int, min=1, advanced=True),
))

SUBMISSION = Section("submission", "The submission file.", (
    Option("file", "submission.csv", "Submission file name, written in the run folder."),
))

KAGGLE = Section("kaggle", "Upload at the end.", (
    Option("submit", False, "Upload the submission with `glr submit` at the end (with notebook = true: upload "
           "the bundle, push the notebook, wait for it, and submit it: `glr submit --kernel`).", type=bool),
    Option("message", "glr run", "Description shown on Kaggle."),
    Option("notebook", False, "Code competitions (2020, 2021): add the stages `bundle` (`glr bundle`: the run as a "
           "Kaggle dataset, in RUN/bundle) and `notebook` (`glr notebook`: the Kaggle notebook that runs `glr infer` "
           "on it, in RUN/kernel).", type=bool),
    Option("dataset", "", "USER/SLUG of the bundle's Kaggle dataset (needed with notebook = true)."),
    Option("kernel", "", "USER/SLUG of the notebook; empty = USER/glr-COMPETITION.", advanced=True),
))

REPORT = Section("report", "report.html.", (
    Option("examples", 6, "Example queries drawn with their best reference and inlier matches.", type=int, min=0),
))

# the `glr run` config's sections, in file order ([[models]] comes after [train])
SECTIONS: tuple[Section, ...] = (RUN, DATA, LOCALVAL, TRAIN, PREDICT, KNN, ENSEMBLE, VERIFY, TUNE, SUBMISSION,
                                 KAGGLE, REPORT)
BY_NAME = {s.name: s for s in SECTIONS}
# [train] keys about the run, not about one model: never set per [[models]] entry, never passed to `glr train`
RUN_LEVEL_TRAIN_KEYS = tuple(o.name for o in TRAIN.options if not o.cli)
DEFAULT_MODELS = [{"backbone": b} for b in BACKBONES]
# what a [[models]] entry's predictions come from: its classifier head, or kNN over its embeddings ([knn])
MODEL_KINDS = ("classifier", "retrieval")
# `glr features` and `glr match` take the extractor subset of [verify]
EXTRACTOR_KEYS = ("extractor", "max_side", "n_features", "delf_handle")
MATCH_KEYS = ("ratio", "mutual", "model", "method", "threshold", "seed")


# -- Click ---------------------------------------------------------------------------------------

def _click_type(o: Option):
    import click

    if o.choices is not None:
        return click.Choice(o.choices)
    if o.type in (int, float):
        rng = click.IntRange if o.type is int else click.FloatRange
        kw = {"min": o.min, "max": o.max}
        if o.type is float:
            kw.update(min_open=o.min_open, max_open=o.max_open)
        return rng(**kw) if (o.min is not None or o.max is not None) else o.type
    return str


def parse_list(o: Option, text: str, where: str | None = None) -> list:
    """A list option from the command line: comma-separated items, checked like a config list."""
    where = where or o.dashed
    parts = [x for x in text.split(",") if x.strip()]
    if o.item is float:
        try:
            parts = [float(x) for x in parts]
        except ValueError:
            raise UserError(f"{where} {text!r}: expected comma-separated numbers, e.g. 1,1,2") from None
    return o.check(parts, where)


def _list_callback(o: Option) -> Callable:
    def parse(ctx, param, value):
        import click

        if value is None or isinstance(value, list):
            return value
        try:
            return parse_list(o, value)
        except UserError as e:  # Click's usage error: one line, exit status 2
            raise click.BadParameter(str(e)) from None
    return parse


def click_option(o: Option):
    """The Click option of one schema option (flags, type, range, default and help all from `o`)."""
    import click

    if o.type is bool:
        decl = o.flag or (o.dashed if o.default is False else f"{o.dashed}/--no-{o.dashed[2:]}")
        return click.option(decl, o.name, default=o.default, show_default=True, help=o.help,
                            is_flag="/" not in decl or None)
    if o.type is list:
        return click.option(o.dashed, o.name, default=None, metavar="A,B,…", callback=_list_callback(o),
                            help=o.help + (f" [default: {','.join(map(str, o.default)) or 'none'}]"))
    return click.option(o.flag or o.dashed, o.name, type=_click_type(o), default=o.default,
                        show_default=o.default not in (None, ""), help=o.help)


def click_options(section: Section, keys: tuple[str, ...] | None = None):
    """Decorator adding `section`'s command options (or those of `keys`, in `keys`' order) to a command."""
    opts = [section[k] for k in keys] if keys is not None else [o for o in section.options if o.cli]

    def decorate(f):
        for o in reversed(opts):
            f = click_option(o)(f)
        return f
    return decorate


# -- the example config and the reference ---------------------------------------------------------

def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, break_on_hyphens=False) or [""]


def example_config() -> str:
    """`glr config-example`: every config key with its default and help, generated from the schema."""
    lines = ["# glr run configuration. Print this with `glr config-example > glr.toml`, edit, then "
             "`glr run glr.toml`.",
             "# Every key is optional; the values shown are the defaults (commented keys: advanced options, "
             "with their",
             "# defaults). Relative paths are relative to this file. Reference: docs/config.md."]
    for sec in SECTIONS:
        lines += ["", f"[{sec.name}]"] + [f"# {x}" for x in _wrap(sec.help, 100)]
        for o in sec.options:
            if not o.config:
                continue
            if o.default is None:
                lead = f"# {o.name} = "
                value = '"…"' if o.type is str else "…"
            else:
                lead, value = ("# " if o.advanced else "") + f"{o.name} = ", _toml(o.default)
            if o.choices:
                help_ = f"{' | '.join(o.choices)}. {o.help}"
            else:
                help_ = o.help
            first = f"{lead}{value}"
            wrapped = _wrap(help_, 100 - 31)
            lines.append(f"{first:<28} # {wrapped[0]}" if len(first) < 28 else f"{first}  # {wrapped[0]}")
            lines += [f"{'':<28} # {w}" for w in wrapped[1:]]
        if sec is TRAIN:
            lines += ["", "# One [[models]] table per model; any [train] key but final_fit may be overridden per "
                      "model;", "# `name` is the stage and folder name (default: the backbone)."]
            for m in DEFAULT_MODELS:
                lines += ["[[models]]", f"{'backbone = ' + _toml(m['backbone']):<28} # {' | '.join(BACKBONES)}", ""]
            lines += ["# A retrieval member ([knn]): kind = \"retrieval\" predicts by kNN of its embeddings among the",
                      "# training images, usually with a metric-learning head:",
                      "#   [[models]]", "#   name = \"arcface\"", "#   backbone = \"resnet50\"",
                      f"#   {'kind = ' + _toml('retrieval'):<24} # {' | '.join(MODEL_KINDS)}",
                      "#   head = \"arcface\"", "#   pooling = \"gem\"", "#   embedding_dim = 512"]
    return "\n".join(lines) + "\n"


def config_reference() -> str:
    """docs/config.md: the reference of every config key, generated from the schema."""
    out = ["# `glr run` configuration reference", "",
           "Generated from `pipeline/options.py` (the single definition of every option); a test keeps this",
           "file equal to `pipeline.options.config_reference()`. Start from `glr config-example > glr.toml`.",
           "The options of a stage section are also the flags of its command (`glr train --help` …), spelled",
           "with dashes there. Relative paths are resolved against the config file's folder.", ""]
    for sec in SECTIONS:
        out += [f"## [{sec.name}]", "", sec.help, "", "| key | default | allowed | meaning |", "|---|---|---|---|"]
        for o in sec.options:
            if not o.config:
                continue
            allowed = (" \\| ".join(o.choices) if o.choices else
                       {bool: "true/false", list: f"list of {getattr(o.item, '__name__', '')}s"}.get(
                           o.type, o.type.__name__ + ("" if o.min is None and o.max is None
                                                      else ", " + o.range_text())))
            default = "(not set)" if o.default is None else f"`{_toml(o.default)}`"
            out.append(f"| `{o.name}` | {default} | {allowed} | {o.help.replace('|', '/')} |")
        out.append("")
        if sec is TRAIN:
            out += ["## [[models]]", "", "One table per model, in order: `backbone` (" + ", ".join(BACKBONES)
                    + "), optional `name` (stage and folder name; default: the backbone), optional `kind` ("
                    + " \\| ".join(MODEL_KINDS) + "; default classifier: the head's predictions; retrieval: kNN of "
                    "the model's embeddings among the training images, see [knn], usually with head = \"arcface\" "
                    "and pooling = \"gem\"), and any [train] key "
                    "but " + ", ".join(RUN_LEVEL_TRAIN_KEYS) + ". Default: one model per backbone.", ""]
    return "\n".join(out)
