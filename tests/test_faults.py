"""Issue 15, faults a user's machine throws at glr: read-only output folders, SIGTERM, dangling links.

Each case runs the real `glr` command in a subprocess and holds it to one clear line on stderr (no
traceback), before any work, and no litter left behind.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GLR = str(Path(sys.executable).with_name("glr"))


@pytest.fixture
def shared_tmp():
    """A folder another user can use too (pytest's tmp_path is private to its owner)."""
    base = Path(tempfile.mkdtemp(prefix="glr-faults-", dir="/tmp"))
    base.chmod(0o777)
    yield base
    for p in base.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o777)
    shutil.rmtree(base, ignore_errors=True)


def _as_user() -> list[str]:
    """Run as an unprivileged user when we are root (root writes through any permission bits)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot drop to a user that permission bits stop")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _glr(base: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    home = base / "home"
    home.mkdir(exist_ok=True)
    home.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), MPLCONFIGDIR=str(home))
    return subprocess.run([*_as_user(), GLR, *args], env=env, cwd=base, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in err and err.count("\n") == 0 and err.startswith("Error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


# -- class 9: a read-only output folder is one line, before any work ---------------------------------

def _read_only_cases(base: Path) -> dict[str, list[str]]:
    ro = base / "ro"
    data = base / "data"
    data.mkdir()
    (data / "sample_submission.csv").write_text("id,landmarks\na1,\n")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(data / "a.jpg")
    (base / "glr.toml").write_text(f'[run]\nroot = "{ro}"\n[data]\ndata_dir = "{data}"\n')
    return {
        "synth": ["synth", str(ro / "synth")],
        "fetch": ["fetch", "landmark-recognition-2021", "--data-dir", str(ro / "comp")],
        "fetch-urls": ["fetch-urls", str(base / "list.csv"), "--out", str(ro / "imgs")],
        "train": ["train", str(data), "--backbone", "vgg16", "--out", str(ro / "runs" / "vgg16")],
        "predict": ["predict", str(base / "run"), "--data-dir", str(data), "--out", str(ro / "p.parquet")],
        "predict-embeddings": ["predict", str(base / "run"), "--data-dir", str(data), "--out", str(base / "p.parquet"),
                               "--embeddings", str(ro / "e.npy")],
        "ensemble": ["ensemble", str(base / "a.parquet"), "--out", str(ro / "e.parquet")],
        "verify": ["verify", str(base / "p.parquet"), "--data-dir", str(data), "--out", str(ro / "i.parquet")],
        "merge": ["merge", str(base / "a.parquet"), "--out", str(ro / "m.parquet")],
        "match": ["match", str(data / "a.jpg"), str(data / "a.jpg"), "--plot", str(ro / "m.png")],
        "tune": ["tune", str(base / "p.parquet"), str(base / "i.parquet"), "--solution", str(base / "s.csv"),
                 "--out", str(ro / "policy.json")],
        "rescore": ["rescore", str(base / "p.parquet"), str(base / "i.parquet"), "--policy", "none",
                    "--out", str(ro / "r.parquet")],
        "write-submission": ["write-submission", str(base / "p.parquet"), "--data-dir", str(data),
                             "--out", str(ro / "s.csv")],
        "demo": ["demo", "--out", str(ro / "demo")],
        "run": ["run", str(base / "glr.toml")],
    }


def test_every_writing_command_refuses_a_read_only_output_folder_before_any_work(shared_tmp):
    cases = _read_only_cases(shared_tmp)
    ro = shared_tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for name, args in cases.items():
        t0 = time.monotonic()
        proc = _glr(shared_tmp, *args)
        _one_line_error(proc, str(ro))
        assert time.monotonic() - t0 < 30, name  # refused up front, not after the work
        assert list(ro.iterdir()) == [], (name, list(ro.iterdir()))  # no litter


def test_clean_refuses_a_read_only_data_folder_or_quarantine(shared_tmp):
    data = shared_tmp / "imgs"
    data.mkdir()
    data.chmod(0o777)
    (data / "empty.jpg").write_bytes(b"")
    q = shared_tmp / "q"
    q.mkdir()
    q.chmod(0o555)
    _one_line_error(_glr(shared_tmp, "clean", str(data), "--quarantine", str(q)), "--quarantine", "cannot write")
    data.chmod(0o555)
    _one_line_error(_glr(shared_tmp, "clean", str(data)), "DATA_DIR", "cannot write")
    assert (data / "empty.jpg").exists() and list(q.iterdir()) == []


def test_output_path_that_is_a_folder_or_under_a_file_is_one_line(tmp_path):
    from submissions.errors import UserError
    from submissions.files import check_writable

    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is a folder"):
        check_writable(tmp_path / "dir")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_writable(tmp_path / "file", folder=True)
    with pytest.raises(UserError, match="is not a folder"):
        check_writable(tmp_path / "file" / "sub" / "out.csv")
    check_writable(tmp_path / "new" / "deeper" / "out.csv")  # folders on the way are created later: fine
    check_writable(tmp_path / "dir", folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # the probe left nothing
