import os
import stat

import pytest

from submissions.files import atomic_dir, atomic_path, atomic_write_text


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "submission.csv", "id,landmarks\n")
    plain = tmp_path / "sub" / "plain.csv"
    plain.write_text("x")  # what any file the user writes gets (mkstemp alone would give 0o600)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~_umask()
    assert path.read_text() == "id,landmarks\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["plain.csv", "submission.csv"]


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
