"""`glr bundle` and `glr notebook` on the demo run: the bundle's size and build time, and the notebook executed
offline (nbclient under `unshare -n`, a fresh venv without glr that installs it from the bundle's wheels).

    .venv/bin/python benchmarks/code_competition.py [--demo DIR] [--write]

Without --demo, `glr demo --out <tmp>/demo` runs first (a few minutes). The notebook part needs root
(`unshare -n`), nbclient and ipykernel; without them it is reported as not measured. The venv is built
the way tests/acquire/test_notebook.py builds it (the "Kaggle image" = this venv's packages, glr excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._results import write_section  # noqa: E402

GLR = str(Path(sys.executable).with_name("glr"))
DATASET = "alice/glr-demo-bundle"
COMP = "landmark-recognition-2021"


def _run_notebook(demo: Path, bundle: Path, tmp: Path) -> tuple[float | None, str]:
    from tests.acquire.test_notebook import EXECUTE, _can_cut_network, _kaggle_like_python

    why = _can_cut_network()
    if why:
        return None, why
    python = _kaggle_like_python(tmp)
    kin, kwork = tmp / "kaggle" / "input", tmp / "kaggle" / "working"
    kin.mkdir(parents=True)
    kwork.mkdir()
    shutil.copytree(demo / "competition", kin / COMP, ignore=shutil.ignore_patterns(".glr-cache"))
    shutil.copytree(bundle, kin / DATASET.split("/")[1])
    subprocess.run([GLR, "notebook", str(bundle), "-c", COMP, "--dataset", DATASET, "--out", str(tmp / "k"), "--cpu",
                    "--expect-test", "1000"], check=True, stdout=subprocess.DEVNULL)
    spec = tmp / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": "python",
        "display_name": "kaggle-like"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(GLR_KAGGLE_INPUT=str(kin), GLR_KAGGLE_WORKING=str(kwork), GLR_KAGGLE_SCRATCH=str(tmp / "scratch"),
               JUPYTER_PATH=str(tmp / "jupyter"),
               JUPYTER_DATA_DIR=str(tmp / "jupyter"), PIP_NO_CACHE_DIR="1", HOME=str(tmp))
    t0 = time.perf_counter()
    proc = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1" "$2" "$3" "$4"',
                           sys.executable, EXECUTE, str(tmp / "k" / "glr-submit.ipynb"), str(kwork),
                           str(tmp / "executed.ipynb")], env=env, capture_output=True, text=True, cwd=tmp)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"the notebook failed:\n{proc.stderr[-3000:]}")
    same = (kwork / "submission.csv").read_bytes() == (demo / "run" / "submission.csv").read_bytes()
    return wall, "byte-identical to the run's" if same else "DIFFERENT from the run's"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", help="a finished `glr demo --out DIR` folder (default: run one in a temporary folder)")
    ap.add_argument("--write", action="store_true", help="update the 'code-competition' section of RESULTS.md")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="glr-cc-") as t:
        tmp = Path(t)
        demo = Path(args.demo) if args.demo else tmp / "demo"
        if not args.demo:
            subprocess.run([GLR, "demo", "--out", str(demo), "-q"], check=True, stdout=subprocess.DEVNULL)
        bundle = tmp / "bundle"
        t0 = time.perf_counter()
        res = subprocess.run([GLR, "bundle", str(demo / "run"), "--out", str(bundle), "--dataset", DATASET, "--json"],
                             capture_output=True, text=True)
        build = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"glr bundle failed:\n{res.stderr[-3000:]}")
        fig = json.loads(res.stdout)
        models = sum(p.stat().st_size for p in bundle.rglob("*.keras"))
        wheels = sum(p.stat().st_size for p in (bundle / "wheels").glob("*.whl"))
        nb_wall, nb_note = _run_notebook(demo, bundle, tmp / "nb")

    body = "\n".join([
        "## code-competition",
        "",
        f"`glr bundle` of the demo run (3 models, 64 px): **{fig['bytes'] / 2**20:.1f} MiB** in {fig['files']} files "
        f"(models {models / 2**20:.1f} MiB, glr's wheel {wheels / 2**10:.0f} KiB), built in **{build:.1f} s** "
        "(glr's wheel built from a copy of the source, the models copied, every file hashed).",
        "",
        (f"`glr notebook`'s notebook executed offline (nbclient, `unshare -n`, a fresh venv without glr): "
         f"**{nb_wall:.1f} s** wall in all — kernel start, `pip install --no-index` of glr from the bundle's "
         f"wheels, versions, and `glr infer` on the demo's test set; submission.csv {nb_note}."
         if nb_wall is not None else f"Notebook execution not measured here: {nb_note}."),
    ])
    print(body)
    if args.write:
        write_section("code-competition", body, "python benchmarks/code_competition.py --write")


if __name__ == "__main__":
    main()
