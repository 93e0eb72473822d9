"""`glr fetch` and `glr submit` through the real kaggle client against tests/fake_kaggle.py.

Every test runs `.venv/bin/glr` in a subprocess: the client reads KAGGLE_API_ENVIRONMENT and
the config folder at import, so each process gets its own HOME, credentials and proxy (the
fake on 127.0.0.1). Nothing leaves the machine: the fake records any https CONNECT.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.fake_kaggle import FakeKaggle

ROOT = Path(__file__).resolve().parents[1]
GLR = str(Path(sys.executable).with_name("glr"))
COMP = "landmark-recognition-2019"
MiB = 1 << 20


@pytest.fixture(scope="module")
def comp_dir(tmp_path_factory) -> Path:
    from pipeline.acquire.synth import make_competition

    out = tmp_path_factory.mktemp("synth") / "comp"
    make_competition(out, seed=3, landmarks=3, per_landmark=4, test=6, size=32)
    return out


@pytest.fixture(scope="module")
def bundle(comp_dir) -> bytes:
    """Kaggle's bundle of the synthetic competition, plus 2.5 MiB of noise so it spans > 1 MiB pieces."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(comp_dir.rglob("*")):
            rel = p.relative_to(comp_dir).as_posix()
            if p.is_file() and rel not in ("solution.csv", "synth.json"):
                zf.write(p, rel)
        noise = np.random.default_rng(0).integers(0, 256, size=5 * MiB // 2, dtype=np.uint8).tobytes()
        zf.writestr(zipfile.ZipInfo("extra/noise.bin"), noise, compress_type=zipfile.ZIP_STORED)
    return buf.getvalue()


def _home(tmp_path: Path, creds: dict | None = {"username": "alice", "key": "secret-key"}) -> Path:
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True, exist_ok=True)
    if creds is not None:
        cfg = home / ".kaggle" / "kaggle.json"
        cfg.write_text(json.dumps(creds))
        cfg.chmod(0o600)
    return home


def _env(fake: FakeKaggle, home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_") and "proxy" not in k.lower()}
    env.update(fake.env(home, **extra))
    env["PYTHONPATH"] = str(ROOT)
    return env


def glr(args: list[str], env: dict, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([GLR, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _assert_same_tree(comp_dir: Path, data: Path) -> None:
    for p in comp_dir.rglob("*"):
        rel = p.relative_to(comp_dir).as_posix()
        if p.is_file() and rel not in ("solution.csv", "synth.json"):
            assert (data / rel).read_bytes() == p.read_bytes(), rel


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""  # the client's chatter stays off stdout
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_fetch_downloads_extracts_and_summarises(tmp_path, comp_dir, bundle):
    with FakeKaggle(archives={COMP: bundle}) as fake:
        env = _env(fake, _home(tmp_path))
        data = tmp_path / "data"
        proc = glr(["fetch", COMP, "--data-dir", str(data), "--json"], env)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["summary"]["train_images"] == 12 and out["summary"]["classes"] == 3
        assert out["summary"]["test_images"] == 6
        _assert_same_tree(comp_dir, data)
        assert not list((data / ".glr-fetch").glob("*.zip*"))  # archive removed once extracted
        assert fake.api_calls() == ["competitions.CompetitionApiService/DownloadDataFiles"]
        assert all(h.auth.startswith("Basic ") for h in fake.hits if h.path.startswith("/api/"))
        assert not fake.stray()

        # a re-run asks Kaggle nothing and prints the summary again
        n = len(fake.hits)
        proc = glr(["fetch", COMP, "--data-dir", str(data)], env)
        assert proc.returncode == 0, proc.stderr
        assert "already complete" in proc.stdout and "12 train images, 3 classes, 6 test images" in proc.stdout
        assert len(fake.hits) == n


@pytest.mark.parametrize("how", ["env", "token"])
def test_fetch_with_env_credentials_or_token(tmp_path, comp_dir, bundle, how):
    with FakeKaggle(archives={COMP: bundle}) as fake:
        home = _home(tmp_path, creds=None)
        extra = {"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": "secret-key"} if how == "env" else {"KAGGLE_API_TOKEN": "good-token"}
        proc = glr(["fetch", COMP, "--data-dir", str(tmp_path / "d")], _env(fake, home, **extra))
        assert proc.returncode == 0, proc.stderr
        _assert_same_tree(comp_dir, tmp_path / "d")
        api = [h for h in fake.hits if h.path.endswith("DownloadDataFiles")]
        assert api[0].auth.startswith("Bearer " if how == "token" else "Basic ")
        if how == "token":
            assert fake.api_calls()[0] == "security.OAuthService/IntrospectToken"


@pytest.mark.slow
def test_fetch_resumes_after_connection_cut(tmp_path, comp_dir, bundle):
    assert len(bundle) > 2 * MiB
    with FakeKaggle(archives={COMP: bundle}, cut_after=3 * MiB // 2) as fake:
        proc = glr(["fetch", COMP, "--data-dir", str(tmp_path / "d")], _env(fake, _home(tmp_path)))
        assert proc.returncode == 0, proc.stderr
        _assert_same_tree(comp_dir, tmp_path / "d")
        first, second = fake.file_hits()
        assert first.range is None and first.body_bytes == 3 * MiB // 2
        # the client kept the whole 1 MiB pieces it had written and asked only for the rest
        start = int(second.range.split("=")[1].rstrip("-"))
        assert start >= MiB and start % MiB == 0
        assert second.status == 206 and second.body_bytes == len(bundle) - start


def _cases():
    return {
        "no-credentials": ({}, None, "no Kaggle credentials"),
        "wrong-key": ({}, {"username": "alice", "key": "nope"}, "rejected the credentials"),
        "bad-token": ({"KAGGLE_API_TOKEN": "expired"}, None, "KAGGLE_API_TOKEN"),
        "rules": ({}, "default", "accept its rules"),
        "wrong-name": ({}, "default", "found no competition"),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_fetch_errors_are_one_clear_line(tmp_path, bundle, case):
    extra, creds, needle = _cases()[case]
    kw = {"rules_accepted": set()} if case == "rules" else {}
    with FakeKaggle(archives={COMP: bundle}, **kw) as fake:
        home = _home(tmp_path, {"username": "alice", "key": "secret-key"} if creds == "default" else creds)
        name = "landmark-recognition-2099" if case == "wrong-name" else COMP
        proc = glr(["fetch", name, "--data-dir", str(tmp_path / "d")], _env(fake, home, **extra))
        _one_line_error(proc, needle)
        assert not fake.file_hits() and not fake.stray()
        assert not (tmp_path / "d" / "train.csv").exists()


def test_fetch_refuses_malicious_archive(tmp_path, bundle):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("train.csv", "id,landmark_id\n")
        zf.writestr("../../evil", "pwned")
    with FakeKaggle(archives={COMP: buf.getvalue()}) as fake:
        data = tmp_path / "a" / "b" / "data"
        proc = glr(["fetch", COMP, "--data-dir", str(data)], _env(fake, _home(tmp_path)))
        _one_line_error(proc, "'../../evil'", "refusing")
        assert not (tmp_path / "a" / "evil").exists() and not list(tmp_path.rglob("evil"))
        assert not (data / "train.csv").exists()  # nothing written, not even the safe members


@pytest.mark.slow
def test_fetch_single_files_and_server_zipped(tmp_path, comp_dir):
    train = (comp_dir / "train.csv").read_bytes()
    sample = (comp_dir / "sample_submission.csv").read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train.csv", train)
    files = {(COMP, "train.csv.zip"): buf.getvalue(), (COMP, "sample_submission.csv"): sample}
    with FakeKaggle(files=files) as fake:
        data = tmp_path / "d"
        env = _env(fake, _home(tmp_path))
        proc = glr(["fetch", COMP, "--data-dir", str(data), "--files", "train.csv,sample_submission.csv", "--json"], env)
        assert proc.returncode == 0, proc.stderr
        assert (data / "train.csv").read_bytes() == train and (data / "sample_submission.csv").read_bytes() == sample
        assert json.loads(proc.stdout)["summary"]["train_images"] == 12
        n = len(fake.hits)
        proc = glr(["fetch", COMP, "--data-dir", str(data), "--files", "train.csv"], env)
        assert proc.returncode == 0 and "already complete: train.csv" in proc.stdout and len(fake.hits) == n


def test_fetch_server_zipped_file_with_corrupt_data_is_one_line(tmp_path, comp_dir):
    train = (comp_dir / "train.csv").read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("train.csv", train)
    raw = bytearray(buf.getvalue())
    at = raw.index(train[:20])
    raw[at] ^= 0xFF  # the stored bytes no longer match the CRC in the header
    with FakeKaggle(files={(COMP, "train.csv.zip"): bytes(raw)}) as fake:
        data = tmp_path / "d"
        proc = glr(["fetch", COMP, "--data-dir", str(data), "--files", "train.csv"], _env(fake, _home(tmp_path)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "train.csv.zip" in proc.stderr and "is corrupt" in proc.stderr
    assert not (data / "train.csv").exists()
    assert not list(data.rglob("*.part"))


@pytest.mark.slow
def test_fetch_kill9_then_rerun_resumes_without_duplicate_work(tmp_path, comp_dir, bundle):
    data = tmp_path / "d"
    part = data / ".glr-fetch" / f"{COMP}.zip"
    with FakeKaggle(archives={COMP: bundle}, throttle=(64 * 1024, 0.05)) as fake:
        env = _env(fake, _home(tmp_path))
        proc = subprocess.Popen([GLR, "fetch", COMP, "--data-dir", str(data)], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (part.exists() and part.stat().st_size >= MiB):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        on_disk = part.stat().st_size
        assert MiB <= on_disk < len(bundle)
        assert not (data / "train.csv").exists()

        fake.throttle = None
        done = glr(["fetch", COMP, "--data-dir", str(data)], env)
        assert done.returncode == 0, done.stderr
        _assert_same_tree(comp_dir, data)
        first, *rerun = fake.file_hits()
        assert first.range is None
        # the re-run's client follows Kaggle's redirect (a plain GET whose body it never reads),
        # then asks for exactly the missing bytes and appends them to what the killed run wrote
        assert [h.range is None for h in rerun] == [True, False]
        ranged = rerun[1]
        assert ranged.range == f"bytes={on_disk}-" and ranged.status == 206
        assert ranged.body_bytes == len(bundle) - on_disk


# -- submit -------------------------------------------------------------------------------------
def _write_submission(comp_dir: Path, path: Path) -> Path:
    ids = [l.split(",")[0] for l in (comp_dir / "sample_submission.csv").read_text().splitlines()[1:]]
    path.write_text("id,landmarks\n" + "".join(f"{i},{k % 3} 0.{k + 1}\n" for k, i in enumerate(ids)))
    return path


def test_submit_uploads_through_the_client(tmp_path, comp_dir):
    sub = _write_submission(comp_dir, tmp_path / "submission.csv")
    with FakeKaggle(archives={COMP: b""}) as fake:
        proc = glr(["submit", str(sub), "-c", COMP, "-m", "first try", "--data-dir", str(comp_dir)],
                   _env(fake, _home(tmp_path)))
        assert proc.returncode == 0, proc.stderr
        assert "Successfully submitted" in proc.stdout and "ref 1000" in proc.stdout
        assert f"https://www.kaggle.com/competitions/{COMP}/submissions" in proc.stdout
        assert fake.api_calls() == ["competitions.CompetitionApiService/StartSubmissionUpload",
                                    "competitions.CompetitionApiService/CreateSubmission"]
        assert [h.method for h in fake.hits if h.path.startswith("/upload/")] == ["PUT"]
        (s,) = fake.submissions
        assert s["content"] == sub.read_bytes() and s["submissionDescription"] == "first try"


def test_submit_refuses_invalid_file_before_any_request(tmp_path, comp_dir):
    sub = _write_submission(comp_dir, tmp_path / "submission.csv")
    lines = sub.read_text().splitlines()
    sub.write_text("\n".join(lines[:-1] + [lines[1]]) + "\n")  # drop one id, duplicate another
    with FakeKaggle(archives={COMP: b""}) as fake:
        proc = glr(["submit", str(sub), "-c", COMP, "-m", "x", "--data-dir", str(comp_dir)], _env(fake, _home(tmp_path)))
        _one_line_error(proc, str(sub))
        assert fake.hits == []


def test_submit_code_competition_points_to_notebook(tmp_path, comp_dir):
    sub = _write_submission(comp_dir, tmp_path / "submission.csv")
    with FakeKaggle(code_competitions={"landmark-recognition-2021"}) as fake:
        proc = glr(["submit", str(sub), "-c", "landmark-recognition-2021", "-m", "x", "--data-dir", str(comp_dir)],
                   _env(fake, _home(tmp_path)))
        _one_line_error(proc, "refused the file submission", "Kaggle notebook")
        assert fake.submissions == []


# -- archive safety, in process ------------------------------------------------------------------
def _zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("name,kind", [("/etc/evil", "absolute"), ("a/../../evil", "outside"),
                                       ("C:\\evil", "backslash"), ("link", "symbolic link")])
def test_check_archive_rejects_unsafe_members(tmp_path, name, kind):
    from pipeline.acquire.archive import safe_extract
    from submissions.errors import UserError

    info = zipfile.ZipInfo(name)
    if kind == "symbolic link":
        info.external_attr = (0o120777 << 16)
    z = _zip(tmp_path / "x.zip", [("ok.txt", b"ok"), (info, b"../../etc/passwd")])
    with pytest.raises(UserError, match=kind):
        safe_extract(z, tmp_path / "out")
    assert not (tmp_path / "out" / "ok.txt").exists()


def test_safe_extract_skips_complete_and_finishes_partial(tmp_path):
    from pipeline.acquire.archive import safe_extract

    z = _zip(tmp_path / "x.zip", [("a/one.bin", b"1" * 100), ("a/two.bin", b"2" * 100), ("three.bin", b"3" * 10)])
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "one.bin").write_bytes(b"1" * 100)  # complete from an earlier run
    (out / "a" / "two.bin").write_bytes(b"2" * 40)   # cut short
    (out / ".glr-extract").mkdir()
    (out / ".glr-extract" / "0.part").write_bytes(b"junk")
    stats = safe_extract(z, out)
    assert stats == {"members": 3, "extracted": 2, "skipped": 1, "bytes": 110}
    assert (out / "a" / "two.bin").read_bytes() == b"2" * 100 and (out / "three.bin").read_bytes() == b"3" * 10
    assert not (out / ".glr-extract").exists()


def test_submit_reports_failed_upload(tmp_path, comp_dir):
    sub = _write_submission(comp_dir, tmp_path / "submission.csv")
    with FakeKaggle(archives={COMP: b""}, fail_upload=True) as fake:
        proc = glr(["submit", str(sub), "-c", COMP, "-m", "x", "--no-id-check"], _env(fake, _home(tmp_path)))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("Error: the upload of")
        assert fake.submissions == [] and "competitions.CompetitionApiService/CreateSubmission" not in fake.api_calls()


@pytest.mark.slow
def test_fetch_force_downloads_and_extracts_again(tmp_path, comp_dir, bundle):
    with FakeKaggle(archives={COMP: bundle}) as fake:
        env = _env(fake, _home(tmp_path))
        data = tmp_path / "d"
        assert glr(["fetch", COMP, "--data-dir", str(data)], env).returncode == 0
        (data / "train.csv").write_bytes(b"x" * (data / "train.csv").stat().st_size)  # same size, wrong bytes
        proc = glr(["fetch", COMP, "--data-dir", str(data), "--force", "--json"], env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["extracted"] == len(zipfile.ZipFile(io.BytesIO(bundle)).namelist())
        _assert_same_tree(comp_dir, data)
        assert len(fake.file_hits()) == 2


@pytest.mark.parametrize("command", ["fetch", "fetch-urls", "clean", "submit"])
def test_help_has_example(command):
    from click.testing import CliRunner

    from pipeline.cli import cli

    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0 and "Example:" in res.output and "glr " + command in res.output


def test_check_archive_rejects_member_under_symlinked_folder(tmp_path):
    from pipeline.acquire.archive import safe_extract
    from submissions.errors import UserError

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "train").symlink_to(elsewhere)
    z = _zip(tmp_path / "x.zip", [("train/a.jpg", b"x")])
    with pytest.raises(UserError, match="symlink"):
        safe_extract(z, out)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("content, problem", [
    ('{"username": "alice", "key": "secret-key"', "is not valid JSON (Expecting ',' delimiter at line 1"),
    ("", "is not valid JSON (Expecting value at line 1 column 1)"),
    ('["alice", "secret-key"]', "holds a JSON list, not an object with username and key"),
    ('{"username": "alice"}', "has no 'key'"),
    ('{"user": "alice", "key": "secret-key"}', "has no 'username'"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (None, "is a folder, not a file"),
])
def test_malformed_kaggle_json_is_named_not_reported_as_missing(tmp_path, bundle, content, problem):
    """Issue 15 class 9: the client ignores a broken kaggle.json silently; glr says what is wrong with it."""
    with FakeKaggle(archives={COMP: bundle}) as fake:
        home = _home(tmp_path, None)
        cfg = home / ".kaggle" / "kaggle.json"
        if content is None:
            cfg.mkdir()
        else:
            cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
            cfg.chmod(0o600)
        proc = glr(["fetch", COMP, "--data-dir", str(tmp_path / "d")], _env(fake, home))
        line = _one_line_error(proc, str(cfg), "malformed Kaggle credentials file", problem)
        assert "no Kaggle credentials" not in line
        assert not fake.file_hits() and not fake.stray()
