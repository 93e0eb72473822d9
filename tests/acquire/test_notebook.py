"""`glr notebook` (kernel folder), `--push --wait` and `glr submit --kernel` through the real kaggle client against
tests/fake_kaggle.py, their one-line errors, and the notebook executed offline in a fresh venv without glr."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acquire.test_kaggle import _env, _home, _one_line_error, glr
from tests.fake_kaggle import FakeKaggle
from tests.run.test_bundle import DATASET, bundle  # noqa: F401  (a fixture)

COMP = "landmark-recognition-2021"
KERNEL = "alice/glr-landmark-recognition-2021"


def _fake(**kw) -> FakeKaggle:
    fk = FakeKaggle(code_competitions={COMP}, kernel_polls=2, **kw)
    fk.datasets[DATASET] = {"owner": "alice", "versions": [{}]}
    return fk


def _notebook(run: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return glr(["notebook", str(run), "-c", COMP, "--dataset", DATASET, "--out", str(out), *extra],
               env or dict(os.environ))


@pytest.mark.slow
def test_notebook_folder_is_kaggles_format_internet_off(finished_run, tmp_path):
    import nbformat

    res = _notebook(finished_run / "run", tmp_path / "k", "--cpu", "--expect-test", "12")
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "k" / "kernel-metadata.json").read_text())
    assert meta["id"] == KERNEL and meta["code_file"] == "glr-submit.ipynb"
    assert (meta["language"], meta["kernel_type"]) == ("python", "notebook")
    assert meta["competition_sources"] == [COMP] and meta["dataset_sources"] == [DATASET]
    assert meta["enable_internet"] is False and meta["is_private"] is True and meta["enable_gpu"] is False
    nb = nbformat.read(tmp_path / "k" / "glr-submit.ipynb", as_version=4)
    nbformat.validate(nb)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert '"--no-index", "--find-links", str(BUNDLE / "wheels"), "glr"' in code
    assert 'os.environ.get("GLR_KAGGLE_INPUT", "/kaggle/input")' in code
    assert 'os.environ.get("GLR_KAGGLE_WORKING", "/kaggle/working")' in code
    assert 'os.environ.get("GLR_KAGGLE_SCRATCH", "/tmp/glr")' in code and '"--cache-dir"' in code
    assert 'BUNDLE = INPUT / "glr-test-bundle"' in code and f'COMPETITION = INPUT / "{COMP}"' in code
    assert '"infer", str(BUNDLE), "--data-dir", str(COMPETITION)' in code and '"--expect-test=12"' in code
    # the run's precision (auto) asks for a GPU unless told otherwise
    res = _notebook(finished_run / "run", tmp_path / "g")
    assert json.loads((tmp_path / "g" / "kernel-metadata.json").read_text())["enable_gpu"] is True


@pytest.mark.slow
def test_push_wait_then_submit_the_kernel_version(finished_run, tmp_path):
    home = _home(tmp_path)
    with _fake() as fk:
        env = _env(fk, home)
        res = _notebook(finished_run / "run", tmp_path / "k", "--push", "--wait", "--poll", "0", env=env)
        assert res.returncode == 0, res.stderr
        pushed = fk.kernels[KERNEL][0]
        assert pushed["enableInternet"] is False and pushed["isPrivate"] is True
        assert pushed["competitionDataSources"] == [COMP] and pushed["datasetDataSources"] == [DATASET]
        assert pushed["kernelType"] == "notebook" and "glr" in json.loads(pushed["text"])["cells"][2]["source"]
        assert "notebook alice/glr-landmark-recognition-2021 version 1: running" in res.stderr
        assert "complete" in res.stderr and "glr submit --kernel" in res.stdout
        res = glr(["submit", "--kernel", KERNEL, "--version", "1", "-c", COMP, "-m", "vgg16 tiny"], env)
        assert res.returncode == 0, res.stderr
        assert "successfully" in res.stdout
        sub = fk.submissions[-1]
        assert (sub["kernelOwner"], sub["kernelSlug"], sub["kernelVersion"]) == ("alice", "glr-landmark-recognition-2021", 1)
        assert sub["fileName"] == "submission.csv" and sub["submissionDescription"] == "vgg16 tiny"
        # a second push is version 2; submitting without --version takes the latest
        res = _notebook(finished_run / "run", tmp_path / "k", "--push", "--wait", "--poll", "0", env=env)
        assert res.returncode == 0 and len(fk.kernels[KERNEL]) == 2, res.stderr
        res = glr(["submit", "--kernel", KERNEL, "-c", COMP, "-m", "again"], env)
        assert res.returncode == 0, res.stderr
        assert "kernelVersion" not in fk.submissions[-1]
        assert not fk.stray()


@pytest.mark.slow
def test_kernel_that_fails_on_kaggle_shows_its_log_tail(finished_run, tmp_path):
    home = _home(tmp_path)
    with _fake(kernel_error="Traceback (most recent call last):\nValueError: boom in infer") as fk:
        res = _notebook(finished_run / "run", tmp_path / "k", "--push", "--wait", "--poll", "0", env=_env(fk, home))
        assert res.returncode == 1 and "Traceback" in res.stderr  # the notebook's, as the log tail
        assert "  | ValueError: boom in infer" in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: notebook alice/glr-landmark-recognition-2021 version 1 failed on Kaggle")
        # and Kaggle refuses to score the failed version: one line
        _one_line_error(glr(["submit", "--kernel", KERNEL, "-c", COMP, "-m", "x"], _env(fk, home)),
                        "refused notebook", "400")


@pytest.mark.slow
def test_push_with_a_dataset_kaggle_does_not_have_is_one_line(finished_run, tmp_path):
    home = _home(tmp_path)
    with FakeKaggle(code_competitions={COMP}) as fk:
        res = _notebook(finished_run / "run", tmp_path / "k", "--push", env=_env(fk, home))
        _one_line_error(res, "could not attach", DATASET, "glr bundle")


@pytest.mark.parametrize("case", ["no-credentials", "rules", "unknown-kernel", "file-competition", "bad-ref"])
def test_submit_kernel_errors_are_one_line(tmp_path, case):
    home = _home(tmp_path, creds=None if case == "no-credentials" else {"username": "alice", "key": "secret-key"})
    with FakeKaggle(code_competitions={COMP}, rules_accepted=set() if case == "rules" else None,
                    archives={"landmark-recognition-2019": b"x"}) as fk:
        comp = "landmark-recognition-2019" if case == "file-competition" else COMP
        kernel = "nobody" if case == "bad-ref" else KERNEL
        res = glr(["submit", "--kernel", kernel, "-c", comp, "-m", "msg"], _env(fk, home))
        needle = {"no-credentials": "no Kaggle credentials", "rules": "accept its rules",
                  "unknown-kernel": "404", "file-competition": "400", "bad-ref": "USER/SLUG"}[case]
        _one_line_error(res, needle)
        assert not fk.submissions


def test_submit_needs_a_file_or_a_kernel_not_both(tmp_path):
    res = glr(["submit", "-c", COMP, "-m", "x"], dict(os.environ))
    _one_line_error(res, "--kernel USER/SLUG")
    (tmp_path / "s.csv").write_text("id,landmarks\n")
    res = glr(["submit", str(tmp_path / "s.csv"), "--kernel", KERNEL, "-c", COMP, "-m", "x"], dict(os.environ))
    _one_line_error(res, "not both")


# -- the done-when test: the notebook, executed offline in a fresh venv without glr ------------------------------

def _kaggle_like_python(root: Path) -> Path:
    """A fresh venv that sees this venv's packages (the "Kaggle image") but not glr: a folder of links to every
    site-packages entry except glr's own (editable finder, .pth, dist-info), added through a .pth file."""
    venv = root / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    ours = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(sys.prefix)))
    image = root / "image-site"
    image.mkdir()
    for entry in ours.iterdir():
        if entry.name.lower().startswith(("glr", "__editable__", "__pycache__")) or entry.suffix == ".pth":
            continue
        (image / entry.name).symlink_to(entry)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "kaggle-image.pth").write_text(str(image) + "\n")
    return venv / "bin" / "python"


def _can_cut_network() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for `unshare -n` (a network namespace without a route out)"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare -n refused here: {probe.stderr.decode().strip()}"


EXECUTE = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(nb, sys.argv[3])
"""


@pytest.mark.slow
def test_notebook_runs_offline_in_a_fresh_venv_and_reproduces_the_submission(finished_run, bundle, tmp_path):  # noqa: F811
    why = _can_cut_network()
    if why:
        pytest.skip(why)
    pytest.importorskip("nbclient", reason="the notebook executor (pip install nbclient ipykernel)")
    pytest.importorskip("ipykernel", reason="the notebook kernel (pip install ipykernel)")
    python = _kaggle_like_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}

    def probe(code: str) -> int:
        return subprocess.run([str(python), "-c", code], capture_output=True, cwd=tmp_path, env=env).returncode

    assert probe("import pipeline") != 0  # no glr
    assert probe("import tensorflow, ipykernel, click") == 0  # the image's packages
    # Kaggle's tree: the competition and the bundle under the input root (read-only there), an empty working folder
    kin, kwork = tmp_path / "kaggle" / "input", tmp_path / "kaggle" / "working"
    kin.mkdir(parents=True)
    kwork.mkdir()
    shutil.copytree(finished_run / "comp", kin / COMP, ignore=shutil.ignore_patterns(".glr-cache"))
    shutil.copytree(bundle, kin / "glr-test-bundle")
    res = _notebook(finished_run / "run", tmp_path / "k", "--cpu", "--expect-test", "12")
    assert res.returncode == 0, res.stderr
    # the kernel runs the fresh venv's python
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kaggle-like", "language": "python"}))
    env.update(GLR_KAGGLE_INPUT=str(kin), GLR_KAGGLE_WORKING=str(kwork), GLR_KAGGLE_SCRATCH=str(tmp_path / "scratch"),
               JUPYTER_PATH=str(tmp_path / "jupyter"),
               JUPYTER_DATA_DIR=str(tmp_path / "jupyter"), PIP_NO_CACHE_DIR="1", HOME=str(tmp_path))
    executed = tmp_path / "executed.ipynb"
    proc = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1" "$2" "$3" "$4"',
                           sys.executable, EXECUTE, str(tmp_path / "k" / "glr-submit.ipynb"), str(kwork),
                           str(executed)], env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    import nbformat

    out = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells for o in c.get("outputs", []))
    assert "Successfully installed glr" in out and "accelerator:" in out
    assert (kwork / "submission.csv").read_bytes() == (finished_run / "run" / "submission.csv").read_bytes()
    assert sorted(p.name for p in kwork.iterdir()) == ["submission.csv"]  # caches and tables stay in scratch


@pytest.mark.slow
def test_run_with_notebook_and_submit_uploads_pushes_waits_and_submits(finished_run, tmp_path):
    """[kaggle] notebook = true + submit = true: the upload stage takes the code-competition route."""
    root = finished_run
    toml = (root / "glr.toml").read_text()  # [data] competition: the default, landmark-recognition-2021
    (root / "glr-submit.toml").write_text(
        toml + f'[kaggle]\nnotebook = true\nsubmit = true\nmessage = "from glr run"\ndataset = "{DATASET}"\n')
    home = _home(tmp_path)
    with FakeKaggle(code_competitions={COMP}, kernel_polls=0) as fk:
        env = _env(fk, home)
        proc = subprocess.run([str(Path(sys.executable).with_name("glr")), "run", "glr-submit.toml"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "[done] upload" in proc.stdout
        assert set(fk.dataset_files(DATASET)) >= {"config.json", "tune/policy.json", "wheels/glr-0.1.0-py3-none-any.whl"}
        assert fk.kernels[KERNEL][0]["enableInternet"] is False
        sub = fk.submissions[-1]
        assert (sub["competitionName"], sub["kernelSlug"], sub["kernelVersion"]) == (COMP, KERNEL.split("/")[1], 1)
        assert sub["submissionDescription"] == "from glr run"
        upload = json.loads((root / "run" / "upload.json").read_text())
        assert upload["submit"]["ref"] == sub["ref"] and upload["dataset"]["created"] is True
        report = (root / "run" / "report.html").read_text()
        assert "Kaggle code competition" in report and f"dataset {DATASET}" in report and " MiB in " in report
