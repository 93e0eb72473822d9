import os
import stat

import pytest

from submissions.files import atomic_dir, atomic_path, atomic_write_text


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "sub" / "submission.csv", "id,landmarks\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by others, like any file the user writes
    assert path.read_text() == "id,landmarks\n"
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "comp"
    with atomic_dir(target) as tmp:
        (tmp / "train.csv").write_text("v1")
    assert (target / "train.csv").read_text() == "v1"
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "train.csv").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "train.csv").read_text() == "v1"  # the old folder survives a failed rebuild
    with atomic_dir(target) as tmp:
        (tmp / "train.csv").write_text("v2")
    assert (target / "train.csv").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["comp"]  # no temporary or old folder left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
