"""`glr bundle`: a finished run as a folder that becomes a Kaggle dataset, for `glr infer` offline.

The bundle holds exactly what `glr infer` reads (`pipeline.run.infer.infer_inputs`): the run's
validated config as `config.json` and each final model's files plus the tuned policy at the same
run-folder-relative paths, so `glr infer BUNDLE --data-dir …` works on it as on the run. Next to
them: `wheels/` (glr's own wheel, plus wheels of dependencies a Kaggle notebook image lacks),
`dataset-metadata.json` (Kaggle's dataset format) and `glr-bundle.json` (every file's size and sha256).

Models are copied as the run wrote them (`model.keras`: Keras's native zip, which loads without
recompiling a graph). Kaggle's notebook images already provide every dependency glr declares
(`KAGGLE_IMAGE_HAS`), so by default only glr's own wheel is built; `--include-wheel NAME` adds
one downloaded with `pip download --no-deps --only-binary :all:` (uses the package index),
`--exclude-wheel NAME` drops one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from submissions.errors import UserError
from submissions.files import atomic_write_json

# glr's install_requires that Kaggle's Python notebook image (gcr.io/kaggle-images/python) ships:
# nothing of these needs a wheel in the bundle. Checked against the image's package list as of
# 2024-2025; a dependency missing from the image is added with --include-wheel NAME.
KAGGLE_IMAGE_HAS = frozenset({
    "tensorflow", "tensorflow-hub", "tf-keras", "keras", "setuptools", "pandas", "numpy", "pillow",
    "scikit-image", "scipy", "optuna", "kaggle", "click", "opencv-python-headless", "pyarrow", "tqdm",
    "matplotlib", "threadpoolctl", "nbformat",
})
DEFAULT_WHEELS: tuple[str, ...] = ()  # dependency wheels bundled by default (none: see KAGGLE_IMAGE_HAS)

# What Kaggle refuses (the kaggle client's checks in dataset_create_new, and Kaggle's dataset
# limits as documented at kaggle.com/docs/datasets; the per-dataset size is the documented 100 GB
# of the time, conservative against later raises).
MAX_DATASET_BYTES = 100 * 10**9
MAX_FILES = 10_000  # conservative: an upload is one file per top-level entry, folders go as one zip each
SLUG_LEN = (6, 50)
TITLE_LEN = (6, 50)
LICENSE = "CC0-1.0"

METADATA = "dataset-metadata.json"
MANIFEST = "glr-bundle.json"
WHEELS = "wheels"
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")


def project_root() -> Path:
    """The folder glr is installed from (its setup.cfg), for building glr's own wheel."""
    import pipeline

    root = Path(pipeline.__file__).resolve().parents[1]
    if not (root / "setup.cfg").is_file() and not (root / "pyproject.toml").is_file():
        raise UserError(f"{root}: glr is not installed from a source folder (no setup.cfg/pyproject.toml), so its "
                        "wheel cannot be built; install glr with `pip install -e` from its repository")
    return root


def check_dataset_ref(ref: str) -> tuple[str, str]:
    """(owner, slug) of USER/SLUG, or the UserError Kaggle's client would give, in one line."""
    owner, _, slug = (ref or "").partition("/")
    if not owner or not slug or "/" in slug:
        raise UserError(f"--dataset {ref!r}: give it as USER/SLUG, e.g. alice/glr-2021-bundle")
    if not SLUG_LEN[0] <= len(slug) <= SLUG_LEN[1] or not _SLUG.match(slug):
        raise UserError(f"--dataset {ref!r}: the slug must be {SLUG_LEN[0]}-{SLUG_LEN[1]} characters of a-z, 0-9 "
                        "and '-' (Kaggle's rule)")
    return owner, slug


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheels(dest: Path, include: Iterable[str], exclude: Iterable[str], echo: Callable[[str], None]) -> list[str]:
    """Build glr's wheel and fetch the extra ones into `dest`; the wheel files written."""
    exclude = {_norm(n) for n in exclude}
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    if "glr" not in exclude:
        with tempfile.TemporaryDirectory() as src:  # a copy: the build writes build/ and *.egg-info beside the source
            _pip(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", _source_copy(Path(src)), "-w",
                        str(dest)], "glr")
    extra = [n for n in dict.fromkeys([*DEFAULT_WHEELS, *include]) if _norm(n) not in exclude]
    if extra:
        echo(f"downloading wheels: {', '.join(extra)}")
        _pip(pip + ["download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest), *extra],
             ", ".join(extra))
    return sorted(p.name for p in dest.glob("*.whl"))


def _source_copy(dest: Path) -> str:
    """glr's packaging files and packages, copied to `dest` (no caches, builds or tests)."""
    root = project_root()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "setup.py", "MANIFEST.in"):
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    for pkg in ("pipeline", "submissions", "tuning"):
        shutil.copytree(root / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dest)


def _pip(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"cannot get the wheel of {what}: pip said: {last}")


def _check_limits(files: dict[str, int]) -> None:
    total = sum(files.values())
    if total > MAX_DATASET_BYTES:
        raise UserError(f"the bundle is {total / 1e9:.1f} GB, over Kaggle's {MAX_DATASET_BYTES / 1e9:.0f} GB per "
                        "dataset: bundle fewer models (or a smaller backbone)")
    if len(files) > MAX_FILES:
        raise UserError(f"the bundle has {len(files)} files, over the {MAX_FILES} a Kaggle dataset takes")


def build_bundle(run: str | os.PathLike, out: str | os.PathLike, dataset: str, *, title: str | None = None,
                 include_wheels: Iterable[str] = (), exclude_wheels: Iterable[str] = (),
                 echo: Callable[[str], None] = print) -> dict:
    """Write the bundle folder `out` for finished run `run` (dataset id `dataset` = USER/SLUG).

    Refuses a non-empty `out` that is not an earlier bundle (glr overwrites only what it wrote).
    Returns {"out", "dataset", "files", "bytes", "wheels"}.
    """
    from pipeline.run.infer import CONFIG_FILE, infer_inputs

    owner, slug = check_dataset_ref(dataset)
    title = title or f"glr {slug.replace('-', ' ')}"[:TITLE_LEN[1]]
    if not TITLE_LEN[0] <= len(title) <= TITLE_LEN[1]:
        raise UserError(f"--title {title!r}: Kaggle wants {TITLE_LEN[0]}-{TITLE_LEN[1]} characters")
    run, out = Path(run), Path(out)
    if out.resolve() == run.resolve():
        raise UserError(f"--out {out}: the bundle is a folder of its own, not the run folder")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"--out {out}: the folder is not empty and holds no earlier bundle ({MANIFEST}); "
                        "give a new or empty folder")
    inputs = infer_inputs(run)
    tmp = out.with_name(out.name + ".part")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for rel in inputs["files"]:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / rel, dst)
        atomic_write_json(tmp / CONFIG_FILE, inputs["config"])
        wheels = _wheels(tmp / WHEELS, include_wheels, exclude_wheels, echo)
        atomic_write_json(tmp / METADATA, {"title": title, "id": f"{owner}/{slug}", "licenses": [{"name": LICENSE}]})
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _check_limits(files)
        manifest = {"dataset": f"{owner}/{slug}", "run": str(run.resolve()), "bytes": sum(files.values()),
                    "files": {rel: {"bytes": n, "sha256": _sha256(tmp / rel)} for rel, n in files.items()},
                    "wheels": wheels}
        atomic_write_json(tmp / MANIFEST, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(files.values())
    return {"out": str(out), "dataset": f"{owner}/{slug}", "files": len(files) + 1, "bytes": total,
            "wheels": wheels}


def verify_bundle(folder: str | os.PathLike) -> list[str]:
    """The files of a bundle whose size or sha256 differs from its manifest (empty: intact)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise UserError(f"{folder / MANIFEST}: missing or unreadable; is {folder} a `glr bundle` folder?") from None
    bad = []
    for rel, rec in manifest["files"].items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != rec["bytes"] or _sha256(p) != rec["sha256"]:
            bad.append(rel)
    return bad
