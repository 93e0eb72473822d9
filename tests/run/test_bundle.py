"""`glr bundle` on a small real run: exactly `infer_inputs`' files at the same paths, glr's wheel, Kaggle's
dataset metadata, a manifest whose digests hold; `glr infer` on the bundle gives the run's submission;
refusals (bad slug, a folder glr did not write, Kaggle's limits); `--upload` through the real kaggle client."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from tests.acquire.test_kaggle import _env, _home, _one_line_error, glr as glr_kaggle
from tests.fake_kaggle import FakeKaggle
from tests.run.test_stages import glr

DATASET = "alice/glr-test-bundle"


@pytest.fixture(scope="module")
def bundle(finished_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    res = glr("bundle", str(finished_run / "run"), "--out", str(out), "--dataset", DATASET, cwd=finished_run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MiB" in res.stdout and "glr-0.1.0-py3-none-any.whl" in res.stdout
    return out


@pytest.mark.slow
def test_bundle_holds_infer_inputs_wheel_metadata_and_digests(finished_run, bundle):
    from pipeline.run.bundle import verify_bundle
    from pipeline.run.infer import infer_inputs

    run = finished_run / "run"
    inputs = infer_inputs(run)
    for rel in inputs["files"]:
        assert (bundle / rel).read_bytes() == (run / rel).read_bytes(), rel
    assert json.loads((bundle / "config.json").read_text()) == json.loads(json.dumps(inputs["config"]))
    assert not (bundle / "manifest.json").exists()  # the run's manifest stays behind: the bundle is not a run
    meta = json.loads((bundle / "dataset-metadata.json").read_text())
    assert meta["id"] == DATASET and meta["licenses"] == [{"name": "CC0-1.0"}] and 6 <= len(meta["title"]) <= 50
    wheel = bundle / "wheels" / "glr-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "pipeline/run/infer.py" in names and "submissions/metric.py" in names
    assert not any(n.startswith("tests/") for n in names)
    manifest = json.loads((bundle / "glr-bundle.json").read_text())
    every = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"glr-bundle.json"}
    assert set(manifest["files"]) == every
    assert manifest["files"]["tune/policy.json"]["sha256"] == hashlib.sha256(
        (run / "tune/policy.json").read_bytes()).hexdigest()
    assert manifest["bytes"] == sum(r["bytes"] for r in manifest["files"].values())
    assert verify_bundle(bundle) == []
    assert not (Path(__file__).resolve().parents[2] / "build").exists()  # the wheel was built from a copy


@pytest.mark.slow
def test_infer_on_the_bundle_reproduces_the_runs_submission(finished_run, bundle, tmp_path):
    out = tmp_path / "submission.csv"
    res = glr("infer", str(bundle), "--data-dir", str(finished_run / "comp"), "--out", str(out), "-q",
              "--expect-test", "12", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == (finished_run / "run" / "submission.csv").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["--dataset", "alice/abc"], "6-50 characters"),
    (["--dataset", "no-slash-here"], "USER/SLUG"),
    (["--dataset", DATASET, "--title", "abc"], "6-50 characters"),
])
def test_bundle_refuses_what_kaggle_would(finished_run, tmp_path, args, needle):
    res = glr("bundle", str(finished_run / "run"), "--out", str(tmp_path / "b"), *args, cwd=tmp_path)
    assert res.returncode == 1 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_bundle_refuses_a_folder_it_did_not_write_and_an_unfinished_run(finished_run, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep")
    res = glr("bundle", str(finished_run / "run"), "--out", str(tmp_path / "b"), "--dataset", DATASET, cwd=tmp_path)
    assert res.returncode == 1 and "not empty" in res.stderr, res.stderr
    assert (tmp_path / "b" / "mine.txt").read_text() == "keep"
    (tmp_path / "half").mkdir()
    res = glr("bundle", str(tmp_path / "half"), "--out", str(tmp_path / "c"), "--dataset", DATASET, cwd=tmp_path)
    assert res.returncode == 1 and "neither a `glr run` folder" in res.stderr, res.stderr


def test_kaggle_limits_are_refused_with_the_reason(monkeypatch):
    from pipeline.run import bundle as b
    from submissions.errors import UserError

    b._check_limits({"a": 10, "b": 20})
    with pytest.raises(UserError, match="over Kaggle's 100 GB"):
        b._check_limits({"models_all/x/model.keras": b.MAX_DATASET_BYTES + 1})
    with pytest.raises(UserError, match="files, over"):
        b._check_limits({f"f{i}": 1 for i in range(b.MAX_FILES + 1)})


def test_include_and_exclude_wheels_offline(tmp_path, monkeypatch):
    """--include-wheel fetches with `pip download` (here from a local wheelhouse: PIP_NO_INDEX +
    PIP_FIND_LINKS, no network); --exclude-wheel glr leaves glr's own wheel out."""
    import subprocess
    import sys

    from pipeline.run.bundle import _wheels

    proj = tmp_path / "proj"
    (proj / "glrdummy").mkdir(parents=True)
    (proj / "glrdummy" / "__init__.py").write_text("X = 1\n")
    (proj / "setup.cfg").write_text("[metadata]\nname = glrdummy\nversion = 1.2\n[options]\npackages = glrdummy\n")
    (proj / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                         'build-backend = "setuptools.build_meta"\n')
    house = tmp_path / "house"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(proj),
                    "-w", str(house)], check=True, capture_output=True)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(house))
    got = _wheels(tmp_path / "wheels", ["glrdummy"], ["GLR"], echo=lambda m: None)
    assert got == ["glrdummy-1.2-py3-none-any.whl"]
    from submissions.errors import UserError

    with pytest.raises(UserError, match="cannot get the wheel of no-such-package-xyz"):
        _wheels(tmp_path / "w2", ["no-such-package-xyz"], ["glr"], echo=lambda m: None)


@pytest.mark.slow
def test_bundle_upload_creates_then_versions_the_dataset(finished_run, tmp_path):
    home = _home(tmp_path)
    with FakeKaggle() as fk:
        env = _env(fk, home)
        out = tmp_path / "bundle"
        args = ["bundle", str(finished_run / "run"), "--out", str(out), "--dataset", DATASET, "--upload"]
        res = glr_kaggle(args, env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "created dataset alice/glr-test-bundle" in res.stdout
        files = fk.dataset_files(DATASET)
        local = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"dataset-metadata.json"}
        assert set(files) == local  # folders went up as zips that Kaggle unpacks into the same paths
        for rel in local:
            assert files[rel] == (out / rel).read_bytes(), rel
        assert fk.datasets[DATASET]["private"] is True and fk.datasets[DATASET]["license"] == "CC0-1.0"
        res = glr_kaggle(args + ["--notes", "second"], env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "new version of dataset" in res.stdout and len(fk.datasets[DATASET]["versions"]) == 2
        # another user's slug: one line
        fk.datasets["bob/glr-test-bundle"] = {"owner": "bob", "versions": [{}]}
        res = glr_kaggle(["bundle", str(finished_run / "run"), "--out", str(tmp_path / "b2"), "--dataset",
                          "bob/glr-test-bundle", "--upload"], env)
        _one_line_error(res, "bob/glr-test-bundle", "403")
        assert not fk.stray()


@pytest.mark.slow
def test_bundle_upload_without_credentials_is_one_line(finished_run, tmp_path):
    home = _home(tmp_path, creds=None)
    with FakeKaggle() as fk:
        res = glr_kaggle(["bundle", str(finished_run / "run"), "--out", str(tmp_path / "b"), "--dataset", DATASET,
                          "--upload"], _env(fk, home))
        _one_line_error(res, "no Kaggle credentials")
        assert DATASET not in fk.datasets


@pytest.mark.slow
def test_run_with_kaggle_notebook_adds_bundle_and_notebook_stages(finished_run):
    """The same run with [kaggle] notebook = true (last in this module: it adds to the run folder)."""
    root = finished_run
    toml = (root / "glr.toml").read_text()
    (root / "glr-nb.toml").write_text(toml + '[kaggle]\nnotebook = true\n')
    res = glr("run", "glr-nb.toml", "-q", cwd=root)
    assert res.returncode == 1 and "[kaggle] dataset (needed with notebook = true)" in res.stderr, res.stderr
    (root / "glr-nb.toml").write_text(toml + f'[kaggle]\nnotebook = true\ndataset = "{DATASET}"\n')
    res = glr("run", "glr-nb.toml", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[done] bundle" in res.stdout and "[done] notebook" in res.stdout
    assert "[skip] train_all:vgg16" in res.stdout and "[skip] submission" in res.stdout  # only the new stages ran
    from pipeline.run.bundle import verify_bundle

    assert verify_bundle(root / "run" / "bundle") == []
    meta = json.loads((root / "run" / "kernel" / "kernel-metadata.json").read_text())
    assert meta["dataset_sources"] == [DATASET] and meta["enable_internet"] is False
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    assert manifest["stages"]["bundle"]["metrics"]["bytes"] > 0
