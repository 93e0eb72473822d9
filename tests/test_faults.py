"""Issue 15, faults a user's machine throws at glr: read-only output folders, SIGTERM, dangling links.

Each case runs the real `glr` command in a subprocess and holds it to one clear line on stderr (no
traceback), before any work, and no litter left behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.acquire import test_urls

trickle = test_urls.trickle_host  # the fixture, under this name here: a loopback host that trickles bytes

ROOT = Path(__file__).resolve().parents[1]
GLR = str(Path(sys.executable).with_name("glr"))


@pytest.fixture
def shared_tmp():
    """A scratch folder with open permission bits (when not root, the tests set folders read-only by chmod)."""
    base = Path(tempfile.mkdtemp(prefix="glr-faults-", dir="/tmp"))
    base.chmod(0o777)
    yield base
    for p in base.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o777)
    shutil.rmtree(base, ignore_errors=True)


def _read_only(folders: list[Path]) -> list[str]:
    """A command prefix under which `folders` are read-only even for root: as root, a private mount
    namespace with read-only bind mounts of them (works wherever the checkout lives, e.g. a 0700 temp
    folder); otherwise the folders' permission bits (set by the caller) already stop us."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("running as root without mount namespaces (unshare -m): cannot make a folder read-only to root")
    script = 'for d in "$@"; do case "$d" in --) shift; break;; esac; ' \
             'mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" "$d" || exit 99; shift; done; exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh", *map(str, folders), "--"]


def _glr(base: Path, *args: str, read_only: list[Path], timeout: float = 120) -> subprocess.CompletedProcess:
    home = base / "home"
    home.mkdir(exist_ok=True)
    home.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), MPLCONFIGDIR=str(home))
    proc = subprocess.run([*_read_only(read_only), GLR, *args], env=env, cwd=base, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode != 99, proc.stderr  # the read-only mount itself failed
    return proc


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
        proc = _glr(shared_tmp, *args, read_only=[ro])
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
    _one_line_error(_glr(shared_tmp, "clean", str(data), "--quarantine", str(q), read_only=[q]), "--quarantine",
                    "cannot write")
    data.chmod(0o555)
    _one_line_error(_glr(shared_tmp, "clean", str(data), read_only=[data, q]), "DATA_DIR", "cannot write")
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


# -- class 10: no litter — SIGTERM cleans up, a later run removes what SIGKILL left -------------------

def _glr_temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".glr-" in p.name)


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    env = env or {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHONPATH=str(ROOT), no_proxy="127.0.0.1", NO_PROXY="127.0.0.1")
    return subprocess.Popen([GLR, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(cond, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


SYNTH_BIG = ["--landmarks", "40", "--per-landmark", "40", "--size", "256", "-q"]


def test_sigterm_while_synth_writes_removes_its_temp_folder(tmp_path):
    proc = _start(["synth", str(tmp_path / "out"), *SYNTH_BIG])
    _wait_for(lambda: any((p / "train").exists() for p in tmp_path.glob(".out.glr-*.tmp")))  # mid-write
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "Terminated; finished work is kept, re-run to resume.", err
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temp folder


def test_sigterm_while_fetch_urls_waits_on_a_slow_host_removes_its_pieces(tmp_path, trickle):
    csv = tmp_path / "list.csv"
    csv.write_text("id,url\n" + "".join(f"abc{k:03d},{trickle}/body/{k}.jpg\n" for k in range(4)))
    out = tmp_path / "imgs"
    proc = _start(["fetch-urls", str(csv), "--out", str(out), "--timeout", "30", "--workers", "2", "-q"])
    _wait_for(lambda: (out / ".glr-tmp").exists())
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out_text, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5  # the downloads in flight are cut, not waited for (30 s) and retried
    assert proc.returncode == 143, err
    assert "Terminated" in err and "Traceback" not in err
    assert not (out / ".glr-tmp").exists() and not list(out.rglob("*.part"))


def test_a_later_run_removes_the_temp_folder_sigkill_left_and_nothing_else(tmp_path):
    from submissions.files import STALE_AFTER_S

    proc = _start(["synth", str(tmp_path / "out"), *SYNTH_BIG])
    _wait_for(lambda: any((p / "train").exists() for p in tmp_path.glob(".out.glr-*.tmp")))
    proc.kill()
    proc.communicate(timeout=30)
    (left,) = tmp_path.glob(".out.glr-*.tmp")  # SIGKILL runs no finally: the temp folder stays
    old = time.time() - STALE_AFTER_S - 60
    os.utime(left, (old, old))
    lookalike = tmp_path / ".out.abcdefgh.tmp"  # not glr's pattern: never touched
    lookalike.mkdir()
    os.utime(lookalike, (old, old))
    fresh = tmp_path / f".out.glr-{proc.pid}-abcdefgh.tmp"  # same dead writer, but touched just now
    fresh.write_text("x")
    done = subprocess.run([GLR, "synth", str(tmp_path / "out"), "--landmarks", "2", "--per-landmark", "2",
                           "--test", "2", "--size", "32", "-q"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not left.exists() and lookalike.exists() and fresh.exists()
    assert (tmp_path / "out" / "train.csv").exists()


def test_remove_stale_temps_takes_only_glr_names_of_dead_writers_untouched_for_a_while(tmp_path):
    from submissions.files import STALE_AFTER_S, atomic_write_text, remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    old = time.time() - STALE_AFTER_S - 5
    names = {
        f".submission.csv.glr-{dead}-abcd_123.tmp": True,        # atomic_path's temp file
        f".emb.npy.glr-{dead}-zzzz9999.npy.part": True,          # the embeddings writer's extra piece
        f".competition.glr-{dead}-q1w2e3r4.old": True,           # atomic_dir's folder of the replaced one
        f".competition.glr-{os.getpid()}-q1w2e3r4.tmp": False,   # its writer still runs
        f".x.glr-{dead}-short.tmp": False,                       # not mkstemp's 8 characters
        ".submission.csv.abcd1234.tmp": False,                   # somebody else's temp naming
        f"submission.csv.glr-{dead}-abcd1234.tmp": False,        # not hidden: not a temp of ours
    }
    for name in names:
        p = tmp_path / name
        if name.endswith(".old"):
            p.mkdir()
            (p / "x").mkdir()
        else:
            p.write_text("x")
        os.utime(p, (old, old))
    recent = tmp_path / f".late.glr-{dead}-abcdefgh.tmp"
    recent.write_text("x")
    removed = {p.name for p in remove_stale_temps(tmp_path)}
    assert removed == {n for n, stale in names.items() if stale}
    assert recent.exists()
    # writing beside them sweeps the folder (once per process and folder)
    (tmp_path / f".again.glr-{dead}-abcdefgh.tmp").write_text("x")
    os.utime(tmp_path / f".again.glr-{dead}-abcdefgh.tmp", (old, old))
    atomic_write_text(tmp_path / "report.txt", "done")
    assert not (tmp_path / f".again.glr-{dead}-abcdefgh.tmp").exists()
    assert _glr_temps(tmp_path) == sorted([f".competition.glr-{os.getpid()}-q1w2e3r4.tmp", f".x.glr-{dead}-short.tmp",
                                           recent.name, f"submission.csv.glr-{dead}-abcd1234.tmp"])


def test_glr_clean_quarantines_links_that_lead_nowhere(tmp_path):
    from pipeline.acquire.clean import clean

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32), (5, 6, 7)).save(root / "a" / "real.jpg")
    (root / "a" / "good_link.jpg").symlink_to("real.jpg")
    (root / "a" / "dangling.jpg").symlink_to("gone.jpg")
    (root / "a" / "dangling_folder").symlink_to(tmp_path / "nowhere")  # no image suffix: still moved
    (root / "a" / "self.jpg").symlink_to("self.jpg")
    (root / "a" / "ping.png").symlink_to("pong.png")
    (root / "a" / "pong.png").symlink_to("ping.png")
    res = clean(root, workers=2)
    q = tmp_path / "imgs-quarantine"
    assert res["reasons"] == {"dangling symlink": 2, "symlink loop": 3}
    for name, target in (("dangling.jpg", "gone.jpg"), ("self.jpg", "self.jpg"), ("ping.png", "pong.png"),
                         ("dangling_folder", str(tmp_path / "nowhere"))):
        moved = q / "a" / name
        assert moved.is_symlink() and os.readlink(moved) == target  # the link itself, unchanged
        assert not os.path.lexists(root / "a" / name)
    assert (root / "a" / "real.jpg").exists() and (root / "a" / "good_link.jpg").exists()
    report = (q / "report.csv").read_text()
    assert "a/dangling.jpg,dangling symlink,-> gone.jpg" in report and "a/self.jpg,symlink loop" in report
