"""`glr demo`: synthetic competition + the whole real pipeline, final table, re-run skips everything."""
from __future__ import annotations

import tomllib

import pytest
from click.testing import CliRunner

import pipeline.run.demo as demo_module
from pipeline.cli import cli
from pipeline.run.config import validate
from submissions.format import check_submission


def test_demo_config_is_valid_and_small(tmp_path):
    cfg = validate(tomllib.loads(demo_module.demo_config(seed=3)), tmp_path)
    assert cfg["run"]["seed"] == 3 and cfg["train"]["weights"] == "none"
    assert cfg["verify"]["extractor"] == "sift" and len(cfg["models"]) >= 2
    assert cfg["train"]["lr"] == 0.003  # a pass-through `glr train` option
    assert demo_module.SYNTH["size"] <= 64 and demo_module.SYNTH["landmarks"] <= 12


@pytest.mark.slow
def test_demo_end_to_end_then_rerun_skips_everything(tmp_path, monkeypatch):
    # the real stages on a smaller competition and budget than the built-in demo, to keep CI quick
    monkeypatch.setattr(demo_module, "SYNTH", {**demo_module.SYNTH, "landmarks": 6, "per_landmark": 12, "test": 30})
    small = (demo_module.CONFIG.replace("epochs = 40 ", "epochs = 25 ").replace("trials = 60", "trials = 15")
             .replace('[[models]]\nbackbone = "resnet50"\n', "").replace('[[models]]\nbackbone = "vgg19"\n', "")
             .replace("examples = 6", "examples = 3"))
    assert small.count("[[models]]") == 1
    monkeypatch.setattr(demo_module, "CONFIG", small)
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    text = res.output
    for needle in ("model vgg16", "ensemble + rescoring", "time per stage", "train:vgg16", "tune",
                   f"submission: {out / 'run' / 'submission.csv'}", f"report:     {out / 'run' / 'report.html'}"):
        assert needle in text, needle
    assert "tuning part" in text and "held-out part" in text
    check_submission(out / "run" / "submission.csv", out / "competition" / "sample_submission.csv")
    html = (out / "run" / "report.html").read_text()
    assert 'id="examples"' in html and "data:image/png;base64," in html

    again = CliRunner().invoke(cli, ["demo", "--out", str(out), "-q"])
    assert again.exit_code == 0, again.output
    assert "[run ]" not in again.output and "[skip] report: unchanged" in again.output
    assert "[synth]" not in again.output  # the competition is reused too
