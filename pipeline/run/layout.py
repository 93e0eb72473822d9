"""The run folder: the one place that names its artefacts.

Every stage, the summary and the report ask a `Layout` for a path instead of spelling it,
so renaming an artefact is a one-line change here. Methods return absolute paths; `rel`
turns one into the run-folder-relative name that stage records store.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    def upload(self) -> Path:
        return self.root / "upload.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


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
