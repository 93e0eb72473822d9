"""The real stages of `glr run`: a real process killed with -9 and resumed, Kaggle's workflow
through the real client, final_fit, stage errors and the dry-run plan.
"""
from __future__ import annotations

import json
import tomllib

import pytest

from pipeline.run.engine import read_manifest
from submissions.errors import UserError


# -- the real pipeline in a real process: kill -9 and resume ------------------------------------

TINY = """\
[run]
name = "run"
root = "."
[data]
data_dir = "comp"
[localval]
holdout_frac = 0.25
unseen_class_frac = 0.2
[train]
weights = "none"
image_size = 64
epochs = {epochs}
fine_tune_epochs = 0
batch_size = 16
[[models]]
backbone = "vgg16"
[verify]
candidates = 2
k = 2
[tune]
trials = {trials}
holdout = 0.3
[report]
examples = 2
"""


def glr(*args, cwd, timeout=300):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("glr")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_kill_minus_9_mid_stage_then_rerun_redoes_no_finished_stage(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pipeline.acquire.synth import make_competition

    make_competition(tmp_path / "comp", landmarks=5, per_landmark=10, test=20, size=64, seed=0)
    (tmp_path / "glr.toml").write_text(TINY.format(epochs=30, trials=8))
    exe = Path(sys.executable).with_name("glr")
    proc = subprocess.Popen([str(exe), "run", "glr.toml", "-q"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    manifest_path = tmp_path / "run" / "manifest.json"
    killed_in = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            stages = json.loads(manifest_path.read_text())["stages"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            stages = {}
        running = [s for s, r in stages.items() if r.get("status") == "running"]
        if running and stages.get("localval", {}).get("status") == "done":
            time.sleep(1.5)  # well inside the stage
            killed_in = running[0]
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # finished meanwhile
                killed_in = None
            break
        time.sleep(0.2)
    proc.wait(timeout=30)
    assert killed_in, "the run finished before it could be killed"
    before = json.loads(manifest_path.read_text())["stages"]
    done_before = {s: r["finished"] for s, r in before.items() if r["status"] == "done"}
    assert "data" in done_before and "localval" in done_before

    res = glr("run", "glr.toml", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    after = json.loads(manifest_path.read_text())["stages"]
    assert all(r["status"] == "done" for r in after.values())
    for stage, finished in done_before.items():  # nothing finished was redone
        assert after[stage]["finished"] == finished and after[stage]["runs"] == 1, stage
        assert f"[skip] {stage}: unchanged" in res.stdout
    assert after[killed_in]["runs"] == 1
    assert (tmp_path / "run" / "submission.csv").exists() and (tmp_path / "run" / "report.html").exists()
    from submissions.format import check_submission

    check_submission(tmp_path / "run" / "submission.csv", tmp_path / "comp" / "sample_submission.csv")
    assert "ensemble + rescoring" in res.stdout and "report:" in res.stdout

    # only the tuning budget changes: tuning and what follows are redone, nothing before it
    (tmp_path / "glr.toml").write_text(TINY.format(epochs=30, trials=12))
    plan = glr("run", "glr.toml", "--dry-run", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    import re

    assert re.search(r"train:vgg16\s+skip\s+unchanged", plan.stdout), plan.stdout
    assert re.search(r"tune\s+run\s+config changed", plan.stdout), plan.stdout
    res = glr("run", "glr.toml", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    final = json.loads(manifest_path.read_text())["stages"]
    redone = sorted(s for s in final if final[s]["runs"] > after[s]["runs"])
    assert "tune" in redone and set(redone) <= {"tune", "rescore", "submission", "report"}, redone

    # images replaced in place (same names, same CSVs): every stage that read them is redone
    from PIL import Image

    for split in ("train", "test"):
        img = next(p for p in sorted((tmp_path / "comp" / split).rglob("*.jpg")))
        Image.open(img).transpose(Image.Transpose.ROTATE_180).save(img)
        os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    res = glr("run", "glr.toml", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads(manifest_path.read_text())["stages"]
    redone = {s for s in again if again[s]["runs"] > final[s]["runs"]}
    assert {"data", "localval", "train:vgg16", "predict:vgg16", "verify:val", "verify:test"} <= redone, redone


def test_stage_error_names_the_stage(tmp_path):
    from pipeline.run.stages import run

    (tmp_path / "glr.toml").write_text('[run]\nroot = "."\n[data]\ndata_dir = "nowhere"\n')
    with pytest.raises(UserError, match=r"^stage data: .*nowhere: not a directory"):
        run(tmp_path / "glr.toml", echo=lambda s: None)


def test_cli_config_example_dry_run_and_errors(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["config-example"])
    assert res.exit_code == 0 and tomllib.loads(res.output)["verify"]["extractor"] == "sift"
    (tmp_path / "glr.toml").write_text(res.output.replace('root = "runs"', 'root = "."'))
    res = runner.invoke(cli, ["run", str(tmp_path / "glr.toml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    for stage in ("data", "localval", "train:vgg16", "train:vgg19", "train:resnet50", "predict:resnet50",
                  "ensemble", "verify:val", "verify:test", "tune", "rescore", "submission", "report"):
        assert f"  {stage} " in res.output, stage
    assert not (tmp_path / "glr" / "manifest.json").exists()  # a dry run writes nothing
    res = runner.invoke(cli, ["run", str(tmp_path / "missing.toml")])
    assert res.exit_code != 0 and "no such config file" in str(res.exception)


@pytest.mark.slow
def test_kaggle_workflow_fetch_run_submit_through_the_real_client(tmp_path):
    """The real case: no test labels; `glr run` fetches, validates locally, tunes, writes and uploads."""
    import io
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from pipeline.acquire.synth import make_competition
    from tests.fake_kaggle import FakeKaggle

    comp = "landmark-recognition-2019"
    make_competition(tmp_path / "src", landmarks=5, per_landmark=10, test=20, size=64, seed=0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # what Kaggle serves: no solution.csv
        for p in sorted((tmp_path / "src").rglob("*")):
            rel = p.relative_to(tmp_path / "src").as_posix()
            if p.is_file() and rel not in ("solution.csv", "synth.json"):
                zf.write(p, rel)
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "alice", "key": "secret-key"}))
    (home / ".kaggle" / "kaggle.json").chmod(0o600)
    config = TINY.format(epochs=15, trials=8).replace(
        'data_dir = "comp"', f'data_dir = "data"\ncompetition = "{comp}"\nfetch = true')
    (tmp_path / "glr.toml").write_text(config + '[kaggle]\nsubmit = true\nmessage = "glr run test"\n')
    with FakeKaggle(archives={comp: buf.getvalue()}) as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_") and "proxy" not in k.lower()}
        env.update(fake.env(home))
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        res = subprocess.run([str(Path(sys.executable).with_name("glr")), "run", "glr.toml", "-q"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        (sub,) = fake.submissions
        assert sub["content"] == (tmp_path / "run" / "submission.csv").read_bytes()
        assert sub["submissionDescription"] == "glr run test"
    assert (tmp_path / "data" / "train.csv").exists() and not (tmp_path / "data" / "solution.csv").exists()
    stages = read_manifest(tmp_path / "run")["stages"]
    assert stages["upload"]["status"] == "done" and (tmp_path / "run" / "upload.json").exists()
    assert stages["ensemble"]["metrics"]["test"] is None  # no ground truth for the test set
    assert stages["ensemble"]["metrics"]["val"]["gap"] >= 0  # but the local validation split has it
    header = next(l for l in res.stdout.splitlines() if l.startswith("GAP"))
    assert "local val" in header and "test" not in header
    # the default final_fit = "all": the submission comes from models retrained on all training images
    assert stages["train_all:vgg16"]["status"] == "done"
    assert "test predictions: models retrained on the full training set (models_all/vgg16)" in res.stdout


@pytest.mark.slow
def test_final_fit_all_predicts_the_test_set_with_models_retrained_on_everything(tmp_path):
    """final_fit = "all": train_all:<model> learns the whole training set and predicts the real test set
    (so a class left out for local validation can be predicted there), while the validation queries
    that tuning reads stay predicted by the split model; a re-run skips every stage."""
    import re

    from pipeline.run.stages import run
    from pipeline.run.summary import summary_table
    from pipeline.acquire.synth import make_competition
    from pipeline.model.train import read_labels
    from submissions.tables import read_predictions

    make_competition(tmp_path / "comp", landmarks=4, per_landmark=8, test=12, size=32, seed=0)
    config = (TINY.format(epochs=1, trials=3).replace("image_size = 64", "image_size = 32")
              .replace("batch_size = 16", 'batch_size = 16\nfinal_fit = "all"')
              .replace("unseen_class_frac = 0.2", "unseen_class_frac = 0.25").replace("examples = 2", "examples = 1"))
    (tmp_path / "glr.toml").write_text(config)
    lines: list[str] = []
    manifest = run(tmp_path / "glr.toml", echo=lines.append)
    rd = tmp_path / "run"
    assert manifest["plan"].index("train_all:vgg16") < manifest["plan"].index("predict:vgg16")
    stages = manifest["stages"]
    assert all(r["status"] == "done" for r in stages.values())
    assert stages["train_all:vgg16"]["inputs"].keys() == {"data"}  # the whole competition, not localval
    assert stages["predict:vgg16"]["metrics"]["models"] == {"val": "models/vgg16", "test": "models_all/vgg16"}

    (left_out,) = json.loads((rd / "localval" / "localval.json").read_text())["unseen_classes"]
    split_labels, full_labels = (set(read_labels(rd / f).tolist()) for f in ("models/vgg16", "models_all/vgg16"))
    assert left_out not in split_labels and left_out in full_labels and len(full_labels) == 4
    # top-5 of 4 classes ranks every class the model knows: the left-out one only in the test predictions
    test_classes = set(read_predictions(rd / "preds/vgg16.test.parquet")["landmark_id"].astype(int))
    val_classes = set(read_predictions(rd / "preds/vgg16.val.parquet")["landmark_id"].astype(int))
    assert left_out in test_classes and left_out not in val_classes
    assert left_out in set(read_predictions(rd / "ens.test.parquet")["landmark_id"].astype(int))
    table = summary_table(manifest)
    assert "test predictions: models retrained on the full training set (models_all/vgg16)" in table
    html = (rd / "report.html").read_text()
    assert "Test predictions: models retrained on the full training set" in html

    lines.clear()
    again = run(tmp_path / "glr.toml", echo=lines.append)
    assert not any(l.startswith("[run ]") for l in lines), lines
    assert "[skip] train_all:vgg16: unchanged" in lines
    assert all(again["stages"][s]["runs"] == 1 for s in again["stages"])

    lines.clear()
    run(tmp_path / "glr.toml", only="train_all", dry_run=True, echo=lines.append)
    plan = "\n".join(lines)
    assert re.search(r"train_all:vgg16\s+run\s+forced by --only", plan) and re.search(r"train:vgg16\s+keep", plan)
    lines.clear()
    run(tmp_path / "glr.toml", from_stage="train_all", dry_run=True, echo=lines.append)
    plan = "\n".join(lines)
    assert re.search(r"train:vgg16\s+keep", plan) and re.search(r"predict:vgg16\s+run", plan), plan
    # back to the split models for the test set: the split training is kept, the predictions are redone
    (tmp_path / "glr.toml").write_text(config.replace('final_fit = "all"', 'final_fit = "split"'))
    lines.clear()
    run(tmp_path / "glr.toml", dry_run=True, echo=lines.append)
    plan = "\n".join(lines)
    assert "train_all" not in plan and re.search(r"train:vgg16\s+skip\s+unchanged", plan), plan
    assert re.search(r"predict:vgg16\s+run\s+config changed", plan), plan
