"""The `glr run` config: every key checked against the option schema before anything runs.

The schema (`pipeline.options`) is the single definition of every option: the Click options,
the config validation and `glr config-example` are derived from it, so these tests walk the
schema rather than compare copies.
"""
from __future__ import annotations

from types import SimpleNamespace

import json
import tomllib

import pytest

from pipeline.options import SECTIONS, example_config
from pipeline.run.config import load_config, validate
from submissions.errors import UserError


@pytest.mark.parametrize("text, message", [
    ('[verify]\ncandidates = "three"', r"\[verify\] candidates: expected an integer"),
    ('[verify]\nextractor = "surf"', r"\[verify\] extractor: 'surf' is not one of sift, orb, delf"),
    ('[tune]\nholdout = 1.5', r"\[tune\] holdout: must be in \[0, 1\)"),
    ('[data]\ndatadir = "x"', r"\[data\] datadir: unknown key"),
    ('[trian]\nepochs = 1', r"unknown section \[trian\]"),
    ('[[models]]\nbackbone = "vgg11"', r"\[\[models\]\] #1 backbone: 'vgg11' is not one of"),
    ('[[models]]\nbackbone = "vgg16"\n[[models]]\nbackbone = "vgg16"', r"name: 'vgg16' is used twice"),
    ('[[models]]\nbackbone = "vgg16"\nepochs = "x"', r"\[\[models\]\] #1 epochs: expected an integer"),
    ('[ensemble]\nweights = [1, 2]\n[[models]]\nbackbone = "vgg16"', r"2 weight\(s\) for 1 model"),
    ('[run\nname = 1', r"not valid TOML"),
    ('[run]\nname = ".."', r"\[run\] name: '\.\.' must be a single folder name"),
    ('[train]\nlr = "fast"', r"\[train\] lr: expected a number, got 'fast'"),
    ('[train]\nlr = -1', r"\[train\] lr: must be above 0, got -1"),
    ('[train]\nlr = nan', r"\[train\] lr: expected a finite number"),
    ('[train]\nimage_size = 8', r"\[train\] image_size: must be in \[32, 2048\], got 8"),
    ('[train]\nimage_size = 100000', r"\[train\] image_size: must be in \[32, 2048\], got 100000"),
    ('[verify]\nmax_side = "big"', r"\[verify\] max_side: expected an integer"),
    ('[verify]\nchunk_size = 0', r"\[verify\] chunk_size: must be at least 1, got 0"),
    ('[data]\nfiles = [1, 2]', r"\[data\] files: expected strings, got 1"),
    ('[submission]\nfile = ""', r"\[submission\] file: '' must be a single file name"),
    ('[ensemble]\nweights = [-1]\n[[models]]\nbackbone = "vgg16"', r"\[ensemble\] weights: must be at least 0"),
    ('[train]\nfinal_fit = "some"', r"\[train\] final_fit: 'some' is not one of all, split"),
    ('[tune]\ntrials = 0', r"\[tune\] trials and timeout are both 0"),
])
def test_config_values_are_checked_before_anything_runs(tmp_path, text, message):
    path = tmp_path / "glr.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(path)


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/abs", "../up", "a\\\\b", " run", "run ", "x\\u0000y",
                                  "tab\\tname", "x" * 256, "é" * 128])
def test_run_and_model_names_that_leave_their_folder_are_refused(tmp_path, name):
    """Issue 15 class 1: `[run] name = ".."` made the config's own folder the run folder."""
    for text, what in ((f'[run]\nname = "{name}"', r"\[run\] name"),
                       (f'[[models]]\nbackbone = "vgg16"\nname = "{name}"', r"\[\[models\]\] #1 name")):
        path = tmp_path / "glr.toml"
        path.write_text(text)
        with pytest.raises(UserError, match=what + ": .* must be a single folder name"):
            load_config(path)


def test_submission_file_may_not_leave_the_run_folder_or_take_another_artefacts_name(tmp_path):
    """Reserved names come from the Layout (every artefact it names), not from a second list."""
    from pipeline.run.layout import Layout, artefact_names

    reserved = artefact_names()
    lay = Layout(tmp_path / "run")
    for own in (lay.manifest, lay.report, lay.upload, lay.data_summary, lay.policy, lay.lock, lay.features,
                lay.ensemble("test"), lay.inliers("val"), lay.rescored("test"), lay.model_dir("m", True)):
        assert lay.rel(own).split("/")[0] in reserved
    path = tmp_path / "glr.toml"
    for name in sorted(reserved) + ["REPORT.html", "Manifest.JSON"]:
        path.write_text(f'[submission]\nfile = "{name}"')
        with pytest.raises(UserError, match=r"\[submission\] file: .* another file glr writes in the run folder"):
            load_config(path)
    for name in ("../submission.csv", "/tmp/s.csv", "sub/s.csv", ".", ""):
        path.write_text(f'[submission]\nfile = "{name}"')
        with pytest.raises(UserError, match=r"\[submission\] file: .* must be a single file name"):
            load_config(path)
    for name in ("submission.csv", "sub-2021.csv", "report.csv"):
        path.write_text(f'[submission]\nfile = "{name}"')
        assert load_config(path)["submission"]["file"] == name


def test_config_paths_relative_to_file_and_model_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "glr.toml"
    path.write_text('[data]\ndata_dir = "comp"\n[train]\nepochs = 3\n'
                    '[[models]]\nbackbone = "resnet50"\nname = "r"\nepochs = 7\n[[models]]\nbackbone = "vgg16"\n')
    cfg = load_config(path)
    assert cfg["data"]["data_dir"] == str(tmp_path / "sub" / "comp")
    assert [(m["name"], m["epochs"]) for m in cfg["models"]] == [("r", 7), ("vgg16", 3)]
    assert json.loads(json.dumps(cfg)) == cfg  # goes into the manifest as JSON


@pytest.mark.parametrize("extra, message", [
    ("[verify]\nbogus = 1\n", r"\[verify\] bogus: unknown key; known keys: extractor, candidates"),
    ('[[models]]\nbackbone = "vgg16"\nfine_tune_layerz = 3\n', r"\[\[models\]\] #1 fine_tune_layerz: unknown key"),
])
def test_unknown_stage_option_fails_before_any_stage_runs(tmp_path, extra, message):
    from pipeline.run.stages import run

    (tmp_path / "glr.toml").write_text(f'[run]\nroot = "."\n[data]\ndata_dir = "nowhere"\n{extra}')
    with pytest.raises(UserError, match=message):
        run(tmp_path / "glr.toml", echo=lambda s: None)
    assert not (tmp_path / "glr").exists()


# -- one definition per option ---------------------------------------------------------------------

def _uncommented(text: str) -> str:
    import re

    return re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M)


def test_example_config_lists_every_config_key_with_its_schema_default(tmp_path):
    raw = tomllib.loads(_uncommented(example_config()).replace('= "…"', '= "x"').replace("= …", "= 1"))
    for sec in SECTIONS:
        for o in sec.options:
            if o.config and o.default is not None:
                assert raw[sec.name][o.name] == o.default, f"[{sec.name}] {o.name}"
            elif o.config:
                assert o.name in raw[sec.name], f"[{sec.name}] {o.name} missing from the example"
    plain = validate(tomllib.loads(example_config()), tmp_path)
    assert [m["backbone"] for m in plain["models"]] == ["vgg16", "vgg19", "resnet50"]
    assert json.loads(json.dumps(plain)) == plain  # goes into the manifest as JSON


def test_every_command_option_is_its_schema_option():
    """The stage commands' flags are derived from the schema: same names, defaults and choices."""
    import click

    from pipeline.cli import cli
    from pipeline.options import BY_NAME

    commands = {"train": "train", "predict": "predict", "ensemble": "ensemble", "verify": "verify", "tune": "tune",
                "knn": "knn"}
    for command, section in commands.items():
        params = {p.name: p for p in cli.commands[command].params}
        for o in BY_NAME[section].options:
            if not o.cli:
                assert o.name not in params, f"glr {command} --{o.name}: a config-only key"
                continue
            p = params[o.name]
            assert p.help == o.help or (p.help or "").startswith(o.help), (command, o.name)
            if o.type is not list:
                assert p.default == o.default, (command, o.name, p.default, o.default)
            if o.choices:
                assert isinstance(p.type, click.Choice) and tuple(p.type.choices) == o.choices
    assert "--no-plots" in cli.commands["tune"].params[[p.name for p in cli.commands["tune"].params].index("plots")].secondary_opts


def test_stage_seeds_follow_run_seed_unless_set(tmp_path):
    cfg = validate({"run": {"seed": 7}, "verify": {"seed": 3}}, tmp_path)
    assert (cfg["localval"]["seed"], cfg["train"]["seed"], cfg["verify"]["seed"], cfg["tune"]["seed"]) == (7, 7, 3, 7)
    assert all(m["seed"] == 7 for m in cfg["models"])
    assert validate({}, tmp_path)["train"]["seed"] == 0


def _other(o):
    """A valid value of `o` different from its default (to see it arrive where it is used)."""
    if o.choices:
        return next(c for c in o.choices if c != o.default)
    if o.type is bool:
        return not o.default
    if o.type is int:
        return (o.default or 0) + 1 if o.max is None or (o.default or 0) + 1 <= o.max else o.default - 1
    if o.type is float:
        return o.default / 2 if o.default else 0.5
    if o.type is list:
        return [2.0] if o.item is float else ["x"]
    return "x" if o.default != "x" else "y"


def test_every_config_key_reaches_the_function_that_uses_it(tmp_path, monkeypatch):
    """Each stage section's every key, set to a non-default value, arrives at the stage's function."""
    import pipeline.model.ensemble
    import pipeline.model.predict
    import pipeline.model.train
    import pipeline.run.localval
    import pipeline.verify.inliers
    import tuning.search
    from pipeline.options import BY_NAME
    from pipeline.run.engine import Context
    from pipeline.run.stages import plan

    seen: dict[str, list[dict]] = {}

    def spy(section, result):
        def f(*args, **kwargs):
            seen.setdefault(section, []).append(kwargs)
            return result
        return f

    import pandas as pd

    monkeypatch.setattr(pipeline.run.localval, "make_local_validation",
                        spy("localval", dict.fromkeys(["train_images", "train_classes", "queries",
                                                       "landmark_queries", "non_landmark_queries"], 0)))
    monkeypatch.setattr(pipeline.model.train, "train", spy("train", {}))
    import pipeline.model.knn
    import pipeline.model.nonlandmark

    done = SimpleNamespace(seconds=0.0)
    monkeypatch.setattr(pipeline.model.predict, "predict", spy("predict", done))
    monkeypatch.setattr(pipeline.model.predict, "embed", spy("embed", done))  # a retrieval member's embeddings
    monkeypatch.setattr(pipeline.model.knn, "knn", spy("knn", done))
    monkeypatch.setattr(pipeline.model.nonlandmark, "nonlandmark", spy("nonlandmark", {}))
    monkeypatch.setattr(pipeline.model.ensemble, "ensemble", spy("ensemble", None))
    monkeypatch.setattr(pipeline.verify.inliers, "verify",
                        spy("verify", pipeline.verify.inliers.VerifyResult(pd.DataFrame(), 0, 0)))
    monkeypatch.setattr(tuning.search, "tune", spy("tune", {"accepted": True}))
    raw = {name: {o.name: _other(o) for o in BY_NAME[name].options if o.config and o.name != "cache_dir"}
           for name in ("localval", "train", "predict", "knn", "ensemble", "verify", "tune")}
    raw["train"].pop("final_fit")
    raw["verify"]["refs"] = "random"  # nearest needs embeddings written by predict
    raw["models"] = [{"backbone": "vgg16"}, {"backbone": "vgg16", "name": "r", "kind": "retrieval"}]
    raw["ensemble"]["weights"] = [2.0, 2.0]
    raw["data"] = {"data_dir": str(tmp_path)}
    cfg = validate(raw, tmp_path)
    ctx = Context(tmp_path / "run", cfg, {"tune": {"inputs": {}}}, echo=lambda s: None)
    for stage in plan(cfg):
        if stage.kind in ("localval", "train", "predict", "ensemble", "verify", "nonlandmark", "tune"):
            stage.action(ctx)
    # keys that are not a keyword of their section's function: (the function, its keyword, which of its calls)
    elsewhere = {("knn", "float16"): ("embed", "float16", None),  # the storage of `glr embed`'s output
                 ("knn", "nonlandmark_pool"): ("embed", "images", lambda c: c.get("images") is not None),
                 ("knn", "nonlandmark_k"): ("nonlandmark", "k", None)}
    for name, values in raw.items():
        if name in ("models", "data"):
            continue
        for key in values:
            want = cfg[name][key]  # as validated (a path resolved)
            function, keyword, which = elsewhere.get((name, key), (name, key, None))
            got = [c.get(keyword) for c in seen[function] if which is None or which(c)]
            assert got and all(g == want for g in got), f"[{name}] {key}: set {want!r}, the stage passed {got!r}"


def test_docs_config_reference_is_generated_from_the_schema():
    from pathlib import Path

    from pipeline.options import config_reference

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text() == config_reference(), (
        "docs/config.md is stale: python -c 'from pipeline.options import config_reference as c; "
        "open(\"docs/config.md\", \"w\").write(c())'")


def test_misspelt_tune_storage_stops_glr_run_with_one_line(tmp_path):
    """A typo in the storage URL is an error before any stage runs, not a silent fall back to identity."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "glr.toml").write_text('[run]\nroot = "."\n[tune]\nstorage = "postgresq://glr@db/optuna"\n')
    exe = Path(sys.executable).with_name("glr")
    res = subprocess.run([str(exe), "run", str(tmp_path / "glr.toml")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "[tune] storage 'postgresq://glr@db/optuna': unknown scheme" \
        in res.stderr, res.stderr
    assert not (tmp_path / "glr").exists()
