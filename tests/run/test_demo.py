"""`glr demo`: synthetic competition + the whole real pipeline, final table, re-run skips everything."""
from __future__ import annotations

import json
import tomllib

import pytest
from click.testing import CliRunner

import pipeline.run.demo as demo_module
from pipeline.cli import cli
from pipeline.run.config import validate
from submissions.errors import UserError
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
    assert small.count("[[models]]") == 2 and 'kind = "retrieval"' in small  # vgg16 and the retrieval member
    monkeypatch.setattr(demo_module, "CONFIG", small)
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    text = res.output
    for needle in ("model vgg16", "model arcface (kNN)", "ensemble + rescoring", "time per stage", "train:vgg16", "tune",
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


# -- issue 15 class 1: glr demo deletes or overwrites only what it wrote itself -----------------------

def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _demo(out, *args) -> str:
    """`glr demo --out OUT ARGS`: the one-line error it stops with ('' when none)."""
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "-q", *args])
    if isinstance(res.exception, UserError):
        return str(res.exception)
    assert res.exception is None, repr(res.exception)
    return ""


def _stop_at_run(monkeypatch):
    """Tiny competition, and a config the run refuses at once: the demo's own file handling, no training."""
    monkeypatch.setattr(demo_module, "SYNTH", {**demo_module.SYNTH, "landmarks": 2, "per_landmark": 2, "test": 2,
                                               "size": 32})
    monkeypatch.setattr(demo_module, "CONFIG", demo_module.CONFIG + "\n[stop_here]\n")


@pytest.mark.parametrize("setup", ["foreign_competition", "foreign_config", "edited_config", "competition_is_file"])
def test_demo_never_touches_files_it_did_not_write(tmp_path, monkeypatch, setup):
    _stop_at_run(monkeypatch)
    out = tmp_path / "mine"
    if setup == "foreign_competition":
        (out / "competition").mkdir(parents=True)
        (out / "competition" / "train.csv").write_text("id,landmark_id\nmine,1\n")
    elif setup == "foreign_config":
        out.mkdir()
        (out / "glr.toml").write_text('[run]\nname = "precious"\n')
    elif setup == "edited_config":  # written by an earlier demo, then edited by its user
        assert "unknown section [stop_here]" in _demo(out)
        (out / "glr.toml").write_text((out / "glr.toml").read_text().replace("epochs = 40", "epochs = 41"))
    else:
        out.mkdir()
        (out / "competition").write_text("not a folder")
    before = _snapshot(out)
    for args in ([], ["--overwrite"], ["--seed", "5", "--overwrite"]):
        line = _demo(out, *args)
        assert "\n" not in line and "leaves it alone" in line, line
        assert _snapshot(out) == before


def test_demo_replaces_its_own_files_of_other_settings_only_with_overwrite(tmp_path, monkeypatch):
    _stop_at_run(monkeypatch)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert "unknown section [stop_here]" in _demo(out)  # the demo wrote its files, then the run stopped
    assert json.loads((out / "competition" / "synth.json").read_text())["seed"] == 0
    before = _snapshot(out)
    made = (out / "competition").stat().st_ino

    assert "[stop_here]" in _demo(out)  # same settings: reused as is, not made again
    assert _snapshot(out) == before and (out / "competition").stat().st_ino == made

    assert "made with other settings; pass --overwrite" in _demo(out, "--seed", "3")
    assert _snapshot(out) == before

    assert "[stop_here]" in _demo(out, "--seed", "3", "--overwrite")
    assert json.loads((out / "competition" / "synth.json").read_text())["seed"] == 3
    assert "seed = 3" in (out / "glr.toml").read_text()
    assert (out / "notes.txt").read_text() == "my notes"


def test_demo_out_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "demo"
    path.write_text("a file")
    with pytest.raises(UserError, match="exists and is not a folder"):
        demo_module.demo(path)
    assert path.read_text() == "a file"
