"""The run folder: the one place that names its artefacts.

Every stage, the summary and the report ask a `Layout` for a path instead of spelling it,
so renaming an artefact is a one-line change here. Methods return absolute paths; `rel`
turns one into the run-folder-relative name that stage records store.
"""
from __future__ import annotations

import inspect
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from submissions.errors import UserError

PARTS = ("val", "test")  # val = the local validation queries, test = the competition's test set


@dataclass(frozen=True)
class Layout:
    root: Path
    submission_file: str = "submission.csv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def rel(self, path: str | os.PathLike) -> str:
        return Path(path).relative_to(self.root).as_posix()

    # -- the engine's own files --
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".glr-run.lock"

    # -- stage artefacts, in stage order --
    @property
    def data_summary(self) -> Path:
        return self.root / "data.json"

    @property
    def localval(self) -> Path:
        """A competition folder (train.csv, test/, sample_submission.csv, solution.csv, localval.json)."""
        return self.root / "localval"

    @property
    def localval_solution(self) -> Path:
        return self.localval / "solution.csv"

    @property
    def localval_digest_files(self) -> list[Path]:
        # with the data summary: its images' sizes and mtimes, which the hard links here follow
        return [self.localval / "train.csv", self.localval_solution, self.localval / "localval.json",
                self.data_summary]

    def model_dir(self, model: str, full: bool = False) -> Path:
        """A `glr train` run folder: split models learn localval/, full ones (final_fit = all) all of train."""
        return self.root / ("models_all" if full else "models") / model

    def model_files(self, model: str, full: bool = False) -> dict[str, Path]:
        d = self.model_dir(model, full)
        return {"model": d / "model.keras", "manifest": d / "manifest.json", "labels": d / "labels.json"}

    def predictions(self, model: str, part: str) -> Path:
        return self.root / "preds" / f"{model}.{part}.parquet"

    def embeddings(self, model: str, part: str, train: bool = False) -> Path:
        """Global descriptors of a part's queries, or (`train`) of the training images that go with it."""
        return self.root / "preds" / f"{model}.{part}{'.train' if train else ''}.emb.npy"

    def train_predictions(self, model: str, part: str) -> Path:
        """Predictions of the training images (written with their embeddings, for refs = nearest)."""
        return self.root / "preds" / f"{model}.{part}.train.parquet"

    def ensemble(self, part: str) -> Path:
        return self.root / f"ens.{part}.parquet"

    @property
    def features(self) -> Path:
        """The local-feature cache when [verify] cache_dir is empty."""
        return self.root / "features"

    def inliers(self, part: str) -> Path:
        return self.root / f"inliers.{part}.parquet"

    def pool_embeddings(self, model: str, part: str) -> Path:
        """[knn] nonlandmark_pool's images embedded by a part's model (the test one is infer's pool)."""
        return self.root / "preds" / f"{model}.{part}.pool.emb.npy"

    def nonlandmark(self, part: str) -> Path:
        """Each query's similarity to the non-landmark pool (`glr nonlandmark`)."""
        return self.root / f"nonlandmark.{part}.parquet"

    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    @property
    def policy(self) -> Path:
        return self.tune_dir / "policy.json"

    def rescored(self, part: str) -> Path:
        return self.root / f"rescored.{part}.parquet"

    @property
    def submission(self) -> Path:
        return self.root / self.submission_file

    @property
    def bundle(self) -> Path:
        """`glr bundle`'s folder: the Kaggle dataset of this run ([kaggle] notebook = true)."""
        return self.root / "bundle"

    @property
    def kernel(self) -> Path:
        """`glr notebook`'s kernel folder (kernel-metadata.json + the notebook)."""
        return self.root / "kernel"

    @property
    def upload(self) -> Path:
        return self.root / "upload.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


def check_name(name: object, what: str, kind: str = "folder name") -> None:
    """Refuse anything but one plain path component: a run or model name, a file in the run folder.

    Names that are empty, '.', '..', absolute, hold a separator, NUL or control characters, begin or
    end with blanks, or exceed the file system's 255 bytes would leave (or escape) the folder they are
    meant to name, or fail only when written.
    """
    bad = (not isinstance(name, str) or name.strip() != name or name in ("", ".", "..")
           or any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name)
           or len(name.encode("utf-8", "surrogatepass")) > 255)
    if bad:
        raise UserError(f"{what}: {name!r} must be a single {kind} (not empty, '.' or '..', no '/' or '\\', "
                        "no control characters or surrounding blanks, at most 255 bytes)")


# sample arguments for `artefact_names`: every Layout method's parameters, by name
_SAMPLES = {"model": ("m",), "part": PARTS, "full": (False, True), "train": (False, True)}
_NOT_ARTEFACTS = ("rel", "submission")


def _paths(value) -> list[Path]:
    if isinstance(value, dict):
        value = list(value.values())
    return list(value) if isinstance(value, (list, tuple)) else [value]


def artefact_names() -> frozenset[str]:
    """The top-level names glr's own files take in a run folder (the submission file aside).

    Read off `Layout` itself (every property, every method called with sample arguments), so a
    new artefact is reserved the moment it is named here; `[submission] file` may not take one.
    """
    lay = Layout(Path("/run"))
    names: set[str] = set()
    for attr, member in vars(Layout).items():
        if attr.startswith("_") or attr in _NOT_ARTEFACTS or not (isinstance(member, property) or callable(member)):
            continue
        if isinstance(member, property):
            values = [getattr(lay, attr)]
        else:
            params = list(inspect.signature(member).parameters)[1:]
            values = [member(lay, *args) for args in itertools.product(*(_SAMPLES[p] for p in params))]
        for value in values:
            names.update(lay.rel(p).split("/")[0] for p in _paths(value))
    return frozenset(names)


def check_submission_file(name: str, what: str = "[submission] file") -> None:
    """Refuse a submission file name that leaves the run folder or takes the name of another artefact."""
    check_name(name, what, kind="file name")
    taken = {n.lower() for n in artefact_names()}
    if name.lower() in taken:
        raise UserError(f"{what}: {name!r} is the name of another file glr writes in the run folder "
                        f"({', '.join(sorted(artefact_names()))}); choose another name, e.g. submission.csv")


def layout_of(cfg: dict) -> Layout:
    """The run folder of a validated config: <root>/<name>."""
    return Layout(Path(cfg["run"]["root"]) / cfg["run"]["name"], cfg["submission"]["file"])


def data_files(data_dir: str | os.PathLike) -> list[Path]:
    """The competition's CSVs whose digests feed every stage (an outside input)."""
    root = Path(data_dir)
    return [root / n for n in ("train.csv", "test.csv", "sample_submission.csv", "solution.csv")]


def solution_of(data_dir: str | os.PathLike) -> Path | None:
    """A competition folder's solution.csv, when it has one (synthetic and local-validation folders do)."""
    p = Path(data_dir) / "solution.csv"
    return p if p.exists() else None
