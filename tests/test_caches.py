"""`glr cache`: list and prune the caches of a competition (pipeline.caches), through the real CLI."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner


def _store(root: Path, kind: str, name: str, rows: int, shape=(4, 4, 3), dtype="uint8"):
    """A real RowStore under `root` holding `rows` rows."""
    from pipeline.caches import RowStore, kind_dir

    store = RowStore(kind_dir(root, kind) / name, kind=kind, key={"name": name}, dtype=dtype, row_shape=shape)
    with store.appending() as app:
        for i in range(rows):
            app.add(f"key-{name}-{i}".encode(), np.full(shape, i, dtype))
        app.add_failed(b"broken", "cannot decode")
    return store


def _features(root: Path, name: str, files: int) -> Path:
    """A local-feature folder as pipeline.verify.cache writes one: config.json + entries."""
    from pipeline.caches import kind_dir

    folder = kind_dir(root, "features") / name
    (folder / "train" / "ab").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"extractor": "sift"}))
    for i in range(files):
        (folder / "train" / "ab" / f"ab{i}.npz").write_bytes(b"x" * 100)
    return folder


@pytest.fixture
def root(tmp_path) -> Path:
    """A cache root with an images store, a bottleneck store, a features folder, and user files."""
    root = tmp_path / "data" / ".glr-cache"
    _store(root, "images", "32px", 5)
    _store(root, "bottleneck", "vgg16-32px-fp32-abc", 3, shape=(1, 1, 8), dtype="float16")
    _features(root, "sift-123", 4)
    (root / "notes.txt").write_text("mine")                      # a user's file in the root
    (root / "images" / "my-folder").mkdir()                      # a folder glr did not write
    (root / "images" / "my-folder" / "keep.bin").write_bytes(b"1")
    return root


def _glr(*args: str):
    from pipeline.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_list_shows_each_cache_and_the_total(root):
    r = _glr("cache", str(root.parent), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    got = {(c["kind"], c["key"]): c for c in out["caches"]}
    assert set(got) == {("images", "32px"), ("bottleneck", "vgg16-32px-fp32-abc"), ("features", "sift-123")}
    assert got["images", "32px"]["entries"] == 5 and got["images", "32px"]["failed"] == 1
    assert got["images", "32px"]["bytes"] >= 5 * 48
    assert got["bottleneck", "vgg16-32px-fp32-abc"]["entries"] == 3
    assert got["features", "sift-123"]["entries"] == 4 and got["features", "sift-123"]["bytes"] >= 400
    assert out["total_bytes"] == sum(c["bytes"] for c in out["caches"])
    text = _glr("cache", "--cache-dir", str(root)).output  # the same root named directly
    assert "32px" in text and "sift-123" in text and "3 cache(s)" in text


def test_prune_dry_run_deletes_nothing(root):
    before = sorted(p for p in root.rglob("*"))
    r = _glr("cache", "prune", "--cache-dir", str(root), "--all", "--dry-run")
    assert r.exit_code == 0 and "would delete 3 cache(s)" in r.output
    assert sorted(p for p in root.rglob("*")) == before


def test_prune_all_deletes_only_what_glr_wrote(root):
    r = _glr("cache", "prune", str(root.parent), "--all", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)["deleted"]) == 3
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / "images" / "my-folder" / "keep.bin").exists()
    assert not (root / "images" / "32px").exists() and not (root / "bottleneck").exists()
    assert not (root / "features").exists()
    assert json.loads(_glr("cache", str(root.parent), "--json").output)["caches"] == []


def test_prune_by_kind_and_age(root):
    from pipeline.caches import META

    old = time.time() - 40 * 86400
    os.utime(root / "images" / "32px" / META, (old, old))  # last used 40 days ago
    r = _glr("cache", "prune", "--cache-dir", str(root), "--older-than", "30")
    assert r.exit_code == 0 and "deleted 1 cache(s)" in r.output
    assert not (root / "images" / "32px").exists() and (root / "bottleneck" / "vgg16-32px-fp32-abc").exists()
    r = _glr("cache", "prune", "--cache-dir", str(root), "--kind", "features", "--all")
    assert "deleted 1 cache(s)" in r.output and not (root / "features" / "sift-123").exists()
    assert (root / "bottleneck" / "vgg16-32px-fp32-abc").exists()


def test_prune_needs_a_selection(root):
    from pipeline.cli import cli
    from submissions.errors import UserError

    r = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(root)])
    assert isinstance(r.exception, UserError) and "--older-than DAYS or --all" in str(r.exception)
    assert (root / "images" / "32px").exists()


def test_a_store_keeps_a_users_file_placed_inside_it(root):
    """Prune removes a store's own files; a foreign file keeps the folder (and itself)."""
    (root / "images" / "32px" / "mine.txt").write_text("x")
    _glr("cache", "prune", "--cache-dir", str(root), "--kind", "images", "--all")
    assert [p.name for p in (root / "images" / "32px").iterdir()] == ["mine.txt"]


def test_empty_root():
    r = _glr("cache", "--cache-dir", "/nonexistent/glr-cache")
    assert r.exit_code == 0 and "no caches" in r.output
