"""`glr notebook`: the Kaggle kernel folder that submits a bundled run to a code competition.

GLR 2020 and 2021 take submissions only from a notebook that runs inside Kaggle with the
internet off and writes `submission.csv` to its working folder. This writes that notebook
(small and readable, nbformat 4) and its `kernel-metadata.json` (Kaggle's kernel format: the
competition and the bundle dataset attached, internet off, private). The notebook installs glr
from the bundle's wheels with no index, prints versions and the accelerator, and runs
`glr infer BUNDLE --data-dir INPUT/COMPETITION --out WORKING/submission.csv`.

INPUT and WORKING are read from `GLR_KAGGLE_INPUT` and `GLR_KAGGLE_WORKING` (defaults: Kaggle's
`/kaggle/input` and `/kaggle/working`), so the same notebook runs outside Kaggle for testing;
the bundle is at `INPUT/<dataset slug>`, where Kaggle mounts an attached dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from submissions.errors import UserError
from submissions.files import atomic_write_json, atomic_write_text

NOTEBOOK = "glr-submit.ipynb"
METADATA = "kernel-metadata.json"
INPUT_ENV, WORKING_ENV, SCRATCH_ENV = "GLR_KAGGLE_INPUT", "GLR_KAGGLE_WORKING", "GLR_KAGGLE_SCRATCH"
GPU_PRECISIONS = ("auto", "fp16")  # a run meant for a GPU: Kaggle's GPU notebooks run it at these


def wants_gpu(cfg: dict) -> bool:
    """Whether the notebook asks Kaggle for a GPU: when the run predicts at fp16 or `auto` (fp16 on a GPU).

    bf16 and fp32 are CPU precisions here: on a GPU their predictions would be slower for nothing.
    """
    precision = (cfg.get("predict") or {}).get("precision") or (cfg.get("train") or {}).get("precision") or "auto"
    return precision in GPU_PRECISIONS


def _slugify(text: str) -> str:
    import re

    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")


def _cells(competition: str, bundle_slug: str, infer_args: list[str]) -> list:
    from nbformat.v4 import new_code_cell, new_markdown_cell

    return [
        new_markdown_cell(
            f"# glr submission to `{competition}`\n\n"
            "Written by `glr notebook`. Runs with the internet off: installs glr from the attached bundle's "
            "wheels, then `glr infer` writes `submission.csv` to the working folder. Outside Kaggle, set "
            f"`{INPUT_ENV}` and `{WORKING_ENV}` to run it on a local copy."),
        new_code_cell(
            "import os, pathlib, platform, shutil, subprocess, sys\n\n"
            f'INPUT = pathlib.Path(os.environ.get("{INPUT_ENV}", "/kaggle/input"))\n'
            f'WORKING = pathlib.Path(os.environ.get("{WORKING_ENV}", "/kaggle/working"))\n'
            f'COMPETITION = INPUT / "{competition}"\n'
            f'BUNDLE = INPUT / "{bundle_slug}"\n'
            'SUBMISSION = WORKING / "submission.csv"\n'
            "# local features and intermediate tables: off /kaggle/working (limited, and saved as outputs)\n"
            f'SCRATCH = pathlib.Path(os.environ.get("{SCRATCH_ENV}", "/tmp/glr"))\n\n\n'
            "def sh(*cmd):\n"
            '    """Run a command, showing its output here; stop the notebook when it fails."""\n'
            "    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
            "    for line in proc.stdout:\n"
            '        print(line, end="")\n'
            "    if proc.wait():\n"
            '        raise RuntimeError(f"{cmd[2:4]} exited with status {proc.returncode}")'),
        new_code_cell(
            "# install glr offline, from the bundle's wheels (the image has its dependencies)\n"
            'sh(sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(BUNDLE / "wheels"), "glr")'),
        new_code_cell(
            "from importlib.metadata import PackageNotFoundError, version\n\n"
            'print("python", platform.python_version(), "on", platform.platform())\n'
            'for name in ("glr", "tensorflow", "keras", "numpy", "pandas", "opencv-python-headless", "optuna"):\n'
            "    try:\n"
            '        print(f"{name:24} {version(name)}")\n'
            "    except PackageNotFoundError:\n"
            '        print(f"{name:24} not installed")\n'
            'gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() '
            'if shutil.which("nvidia-smi") else ""\n'
            'print("accelerator:", gpus or f"none (CPU, {os.cpu_count()} cores)")'),
        new_code_cell(
            'sh(sys.executable, "-m", "pipeline.cli", "infer", str(BUNDLE), "--data-dir", str(COMPETITION),\n'
            f'   "--out", str(SCRATCH / "submission.csv"), "--cache-dir", str(SCRATCH / "cache")'
            f'{"".join(", " + json.dumps(a) for a in infer_args)})\n'
            'shutil.copyfile(SCRATCH / "submission.csv", SUBMISSION)  # the only output Kaggle needs'),
        new_code_cell(
            "import pandas as pd\n\n"
            "sub = pd.read_csv(SUBMISSION)\n"
            'print(f"{SUBMISSION}: {len(sub)} rows")\n'
            "sub.head()"),
    ]


def write_notebook(run: str | os.PathLike, competition: str, dataset: str, out: str | os.PathLike, *,
                   kernel: str | None = None, gpu: bool | None = None, expect_test: int | None = None,
                   time_limit_h: float | None = None) -> dict:
    """Write `out/kernel-metadata.json` and `out/glr-submit.ipynb` for run (or bundle) `run`.

    `kernel` (USER/SLUG) defaults to the dataset owner's `glr-<competition>`; `gpu` defaults to
    `wants_gpu` of the run's config. `expect_test` and `time_limit_h` are passed to `glr infer`
    (--expect-test, --time-limit; by default infer's own). Returns {"out", "kernel", "notebook", "metadata", "enable_gpu"}.
    """
    import nbformat

    from pipeline.run.bundle import check_dataset_ref
    from pipeline.run.infer import load_source

    if not competition or "/" in competition:
        raise UserError(f"--competition {competition!r}: give Kaggle's short name, e.g. landmark-recognition-2021")
    owner, slug = check_dataset_ref(dataset)
    cfg = load_source(run)[0]
    kernel = kernel or f"{owner}/glr-{_slugify(competition)}"
    k_owner, _, k_slug = kernel.partition("/")
    if not k_owner or not k_slug or "/" in k_slug or _slugify(k_slug) != k_slug or len(k_slug) < 5:
        raise UserError(f"--kernel {kernel!r}: give USER/SLUG with a slug of at least 5 characters of a-z, 0-9, '-'")
    gpu = wants_gpu(cfg) if gpu is None else gpu
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infer_args = ([f"--expect-test={expect_test}"] if expect_test else []) + (
        [f"--time-limit={time_limit_h:g}"] if time_limit_h else [])
    nb = nbformat.v4.new_notebook(cells=_cells(competition, slug, infer_args))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    atomic_write_text(out / NOTEBOOK, nbformat.writes(nb) + "\n")
    meta = {
        "id": kernel,
        "title": k_slug.replace("-", " "),  # Kaggle derives the slug from the title: keep them in step
        "code_file": NOTEBOOK,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": bool(gpu),
        "enable_tpu": False,
        "enable_internet": False,
        "dataset_sources": [f"{owner}/{slug}"],
        "competition_sources": [competition],
        "kernel_sources": [],
        "model_sources": [],
    }
    atomic_write_json(out / METADATA, meta)
    return {"out": str(out), "kernel": kernel, "notebook": str(out / NOTEBOOK), "metadata": json.loads(
        (out / METADATA).read_text()), "enable_gpu": bool(gpu)}
