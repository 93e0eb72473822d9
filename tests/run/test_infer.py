"""`glr infer` on a small real run: the run's own submission byte for byte, the run folder untouched,
an early refusal of a projection that cannot fit, and one line for a run that is not finished."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.run.test_stages import TINY, glr


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_infer_reproduces_the_runs_submission_and_leaves_the_run_alone(finished_run, tmp_path):
    run_dir = finished_run / "run"
    before = _digests(run_dir)
    out = tmp_path / "sub" / "submission.csv"
    res = glr("infer", str(run_dir), "--data-dir", str(finished_run / "comp"), "--out", str(out), "--json",
              "--expect-test", "1000", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == (run_dir / "submission.csv").read_bytes()
    assert _digests(run_dir) == before  # nothing in the run folder was written
    figures = json.loads(res.stdout)
    assert figures["test_images"] == 12 and figures["rows"] == 12
    assert figures["expect_test"] == 1000 and figures["projected_s"] > 0
    assert set(figures["stages"]) >= {"predict", "ensemble", "verify", "rescore", "submission"}
    assert figures["stages"]["load"]["images_per_s"] is None  # paid once, not per image
    assert all(s["images_per_s"] > 0 for k, s in figures["stages"].items() if k != "load")
    assert (tmp_path / "sub" / "submission.csv.infer" / "rescored.test.parquet").exists()


@pytest.mark.slow
def test_infer_inputs_are_all_a_copy_needs(finished_run, tmp_path):
    """A folder holding only `infer_inputs` (the bundle's contract) gives the same submission."""
    import shutil

    from pipeline.run.infer import CONFIG_FILE, infer, infer_inputs

    run_dir = finished_run / "run"
    inputs = infer_inputs(run_dir)
    assert "tune/policy.json" in inputs["files"] and "models_all/vgg16/model.keras" in inputs["files"]
    bundle = tmp_path / "bundle"
    for rel in inputs["files"]:
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run_dir / rel, bundle / rel)
    (bundle / CONFIG_FILE).write_text(json.dumps(inputs["config"]))
    lines: list[str] = []
    res = infer(bundle, finished_run / "comp", tmp_path / "out" / "submission.csv", time_limit_h=1e6,
                echo=lines.append)
    assert Path(res["submission"]).read_bytes() == (run_dir / "submission.csv").read_bytes()
    # [data] competition is landmark-recognition-2021 (the default): its hidden test set is projected
    assert res["expect_test"] == 120_000 and any("projected for 120,000 test images" in x for x in lines), lines


@pytest.mark.slow
def test_a_projection_that_cannot_fit_is_refused_before_the_submission(finished_run, tmp_path):
    out = tmp_path / "submission.csv"
    res = glr("infer", str(finished_run / "run"), "--data-dir", str(finished_run / "comp"), "--out", str(out),
              "--expect-test", "10000000", "--time-limit", "0.01", "-q", cwd=tmp_path)
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]  # besides the cache notes
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], res.stderr
    assert "exceeds the limit" in errors[0] and "10,000,000 test images" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_run_that_is_not_finished_is_one_line(tmp_path):
    from pipeline.acquire.synth import make_competition

    make_competition(tmp_path / "comp", landmarks=2, per_landmark=3, test=2, size=32, seed=0)
    (tmp_path / "glr.toml").write_text(TINY.format(epochs=1, trials=2))
    res = glr("run", "glr.toml", "--only", "data", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = glr("infer", "run", "--data-dir", "comp", "--out", "sub.csv", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip() == ("Error: run: not a finished run (stage train_all:vgg16 has not finished); "
                                  "finish it with `glr run CONFIG` first"), res.stderr
    assert not (tmp_path / "sub.csv").exists()
    res = glr("infer", "comp", "--data-dir", "comp", "--out", "sub.csv", cwd=tmp_path)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "neither a `glr run` folder" in res.stderr


def test_the_projection_counts_fixed_costs_once():
    from pipeline.run.infer import expected_test_images, fit_costs, project

    # 2 s to load and trace, then 0.1 s per image: 16 images in 3.6 s, 48 in 6.8 s
    costs = fit_costs(16, {"predict": 3.6}, 48, {"predict": 6.8})
    assert costs["predict"] == pytest.approx((2.0, 0.1))
    assert project(costs, 1000) == pytest.approx(2.0 + 100.0)
    # the references of refs = nearest grow with the training images, loading the models with nothing
    costs.update(references=(1.0, 0.01), load=(3.0, 0.0))
    assert project(costs, 1000, train=50_000) == pytest.approx(2.0 + 100.0 + 1.0 + 500.0 + 3.0)
    # noise (the larger sample faster per image than the slope allows): all of it per image, conservative
    assert fit_costs(16, {"verify": 5.0}, 48, {"verify": 4.8})["verify"] == pytest.approx((0.0, 0.1))
    assert expected_test_images({"data": {"competition": "landmark-recognition-2020"}}, 10_345) == 120_000
    assert expected_test_images({"data": {"competition": "landmark-recognition-2019"}}, 300) == 300


@pytest.mark.slow
def test_infer_with_nearest_references_and_split_models(tmp_path):
    """[verify] refs = nearest (the training images' descriptors) and final_fit = split (models/<m>)."""
    from pipeline.acquire.synth import make_competition
    from pipeline.run.infer import infer_inputs

    make_competition(tmp_path / "comp", landmarks=4, per_landmark=8, test=12, size=64, seed=1)
    toml = TINY.format(epochs=1, trials=2).replace("[verify]\n", '[verify]\nrefs = "nearest"\n')
    (tmp_path / "glr.toml").write_text(toml.replace("[train]\n", '[train]\nfinal_fit = "split"\n'))
    res = glr("run", "glr.toml", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "models/vgg16/model.keras" in infer_inputs(tmp_path / "run")["files"]
    res = glr("infer", "run", "--data-dir", "comp", "--out", "out/submission.csv", "--expect-test", "100",
              "--json", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "submission.csv").read_bytes() == (tmp_path / "run" / "submission.csv").read_bytes()
    figures = json.loads(res.stdout)
    assert figures["stages"]["references"]["seconds"] > 0 and figures["stages"]["references"]["images_per_s"] > 0
    assert figures["sample"]["train_images"] == len((tmp_path / "comp" / "train.csv").read_text().splitlines()) - 1
    assert figures["sample"]["costs"]["references"]["per_image_s"] > 0


@pytest.mark.slow
def test_a_read_only_competition_caches_beside_the_output(finished_run, tmp_path):
    """As on Kaggle (/kaggle/input is read-only): the competition bound read-only in a mount namespace."""
    import os
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount the competition read-only")
    ro, out = tmp_path / "ro", tmp_path / "out" / "submission.csv"
    ro.mkdir()
    glr_exe = Path(sys.executable).with_name("glr")
    script = (f"mount --bind {finished_run / 'comp'} {ro} && mount -o remount,ro,bind {ro} && "
              f"{glr_exe} infer {finished_run / 'run'} --data-dir {ro} --out {out} --expect-test 100 --json -q")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "mount" in res.stderr and "infer" not in res.stderr:
        pytest.skip(f"cannot mount here: {res.stderr.strip()[:200]}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["cache_dir"] == str(tmp_path / "out" / ".glr-cache")
    assert out.read_bytes() == (finished_run / "run" / "submission.csv").read_bytes()
