"""`glr fetch-urls` against a loopback image host with dead, hanging, flaky and HTML answers."""
from __future__ import annotations

import csv as csv_module
import io
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.acquire.competition import hashed_relpath
from pipeline.acquire.urls import fetch_urls, resized_url
from pipeline.images import load_rgb
from tests.fake_kaggle import ImageServer
from tests.test_images import flat_png

ROOT = Path(__file__).resolve().parents[1]
GLR = str(Path(sys.executable).with_name("glr"))


def test_resized_url_rewrites_only_google_size_segments():
    g = "https://lh3.googleusercontent.com/-LOW4n/WEmsb9/AAAAAAAAHWs/5ekjK5j/s1600/photo.jpg"
    assert resized_url(g, 96) == "https://lh3.googleusercontent.com/-LOW4n/WEmsb9/AAAAAAAAHWs/5ekjK5j/s96/photo.jpg"
    assert resized_url("http://lh4.ggpht.com/-ebOx/SM9n3Y/AAAAAAAAA3s/lvd8lZ/s1600/", 256).endswith("/s256/")
    assert resized_url("https://lh5.googleusercontent.com/p/AF1QipN=s1600-k-no", 128).endswith("=s128")
    assert resized_url("https://example.com/s1600/photo.jpg", 96) == "https://example.com/s1600/photo.jpg"
    assert resized_url(g, 0) == g


def _ids(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("0123456789abcdef"), 16)) for _ in range(n)]


def test_fetch_urls_mixed_failures_resize_and_resume(tmp_path, monkeypatch):
    with ImageServer(hang=3.0) as srv:
        # Google hosts are reached through the proxy, i.e. this same loopback server
        for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
            monkeypatch.setenv(k, srv.proxy)
        monkeypatch.setenv("no_proxy", "")
        monkeypatch.setenv("NO_PROXY", "")
        ids = _ids(13, 0)
        urls = [srv.url(f"/img/{k}.jpg") for k in range(6)] + [
            srv.url("/big/p.png"), srv.url("/flaky/f.jpg"),
            "http://lh3.googleusercontent.com/-abc/XYZ/AAAA/s1600/g1.jpg",
            "http://lh4.ggpht.com/-def/UVW/BBBB/s1600/",
            srv.url("/missing/a.jpg"), srv.url("/html/b.jpg"), srv.url("/hang/c.jpg"),
        ]
        csv = tmp_path / "train.csv"
        csv.write_text("id,url,landmark_id\n" + "".join(f"{i},{u},{k % 3}\n" for k, (i, u) in enumerate(zip(ids, urls))))
        out = tmp_path / "train"
        t0 = time.monotonic()
        res = fetch_urls(csv, out, size=48, workers=4, timeout=0.5, retries=1)
        assert time.monotonic() - t0 < 20
        assert (res["downloaded"], res["skipped"], res["failed"]) == (10, 0, 3)
        for i in ids[:10]:
            img = load_rgb(out / hashed_relpath(i))
            assert img.ndim == 3 and max(img.shape[:2]) <= 48
        failed = (out / "failed.csv").read_text().splitlines()
        assert failed[0] == "id,url,reason"
        reasons = {line.split(",")[0]: line.split(",", 2)[2] for line in failed[1:]}
        assert reasons == {ids[10]: "HTTP 404", ids[11]: "not an image (text/html)", ids[12]: "timeout (no complete answer within 0.5 s)"}
        for i in ids[10:]:
            assert not (out / hashed_relpath(i)).exists()
        c = dict(srv.counts)
        assert c[f"127.0.0.1:{srv.port}/flaky/f.jpg"] == 2          # 503 retried once
        assert c[f"127.0.0.1:{srv.port}/hang/c.jpg"] == 2           # timed out, retried, gave up
        assert c[f"127.0.0.1:{srv.port}/missing/a.jpg"] == 1        # 404 is not retried
        assert c["lh3.googleusercontent.com/-abc/XYZ/AAAA/s48/g1.jpg"] == 1  # resized by the server
        assert c["lh4.ggpht.com/-def/UVW/BBBB/s48/"] == 1
        assert not (out / ".glr-tmp").exists()

        # a re-run touches only what failed
        res2 = fetch_urls(csv, out, size=48, workers=4, timeout=0.5, retries=0)
        assert (res2["downloaded"], res2["skipped"], res2["failed"]) == (0, 10, 3)
        c2 = dict(srv.counts)
        changed = {k for k in c2 if c2[k] != c.get(k)}
        assert changed == {f"127.0.0.1:{srv.port}{p}" for p in ("/missing/a.jpg", "/html/b.jpg", "/hang/c.jpg")}


def test_fetch_urls_rejects_unsafe_ids(tmp_path):
    from submissions.errors import UserError

    csv = tmp_path / "t.csv"
    csv.write_text("id,url\nabc123,http://127.0.0.1:9/x.jpg\n../../etc,http://127.0.0.1:9/y.jpg\n")
    with pytest.raises(UserError, match=r"row 3: id '\.\./\.\./etc'"):
        fetch_urls(csv, tmp_path / "out")


@pytest.mark.slow
def test_fetch_urls_kill9_then_rerun_completes_without_duplicate_work(tmp_path):
    n, workers = 120, 4
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(no_proxy="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
    with ImageServer(delay=0.05) as srv:
        ids = _ids(n, 1)
        csv = tmp_path / "train.csv"
        csv.write_text("id,url\n" + "".join(f"{i},{srv.url(f'/img/{i}.jpg')}\n" for i in ids))
        out = tmp_path / "train"
        args = [GLR, "fetch-urls", str(csv), "--out", str(out), "--workers", str(workers), "--size", "0", "--timeout", "5"]
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        have = lambda: sum((out / hashed_relpath(i)).exists() for i in ids)  # noqa: E731
        while time.monotonic() < deadline and have() < 20:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        before = have()
        assert 20 <= before < n
        first = sum(srv.counts.values())

        srv.delay = 0.0
        done = subprocess.run(args + ["--json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        res = json.loads(done.stdout)
        assert res["skipped"] == before and res["downloaded"] == n - before and res["failed"] == 0
        for i in ids:  # complete and uncorrupted
            assert (out / hashed_relpath(i)).read_bytes() == srv._image((f"{i}.jpg",))
        # only the requests in flight at the kill were repeated
        assert sum(srv.counts.values()) <= n + workers
        assert first - before <= workers
        assert max(srv.counts.values()) <= 2
        assert not (out / ".glr-tmp").exists() and not list(out.rglob("*.part"))


# -- issue 15 class 3: every network read has a deadline, enforced while it blocks -------------------

class _TrickleHandler(socketserver.BaseRequestHandler):
    """A host that answers by path: `/ok/…` a JPEG at once; `/huge/…` a 49 Mpx single-colour PNG; `/body/…` headers with a Content-Length, then one
    body byte every 0.5 s; `/nolength/…` the same without a length (body ends at close); `/headers/…` the
    status line, then one header byte every 0.5 s; `/silent/…` reads the request and says nothing."""

    def handle(self):
        sock = self.request
        data = b""
        while b"\r\n\r\n" not in data:
            got = sock.recv(4096)
            if not got:
                return
            data += got
        path = data.split(b" ", 2)[1].decode()
        stop = self.server.stop
        try:
            if path.startswith("/ok/"):
                body = self.server.jpeg
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body)
                return
            if path.startswith("/huge/"):  # 7000×7000 single colour: 49 Mpx, over the pixel budget
                body = self.server.huge
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body)
                return
            if path.startswith("/silent/"):
                stop.wait(30)
                return
            if path.startswith("/body/"):
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
                drip = self.server.jpeg * 100
            elif path.startswith("/nolength/"):
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n")
                drip = self.server.jpeg * 100
            else:
                sock.sendall(b"HTTP/1.1 200 OK\r\n")
                drip = b"X-Slow: " + b"a" * 5000 + b"\r\n"
            for k in range(len(drip)):
                if stop.wait(0.5):
                    return
                sock.sendall(drip[k:k + 1])
        except OSError:  # the client gave up and closed: what we want
            return


@pytest.fixture
def trickle_host(monkeypatch):
    from PIL import Image

    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TrickleHandler)
    server.daemon_threads = True
    server.stop = threading.Event()
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "JPEG")
    server.jpeg = buf.getvalue()
    server.huge = flat_png(7000, 7000)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.stop.set()
    server.shutdown()
    server.server_close()


def test_fetch_urls_gives_up_on_a_trickling_host_within_the_timeout(tmp_path, trickle_host):
    """A host sending a byte every 0.5 s never trips a per-read timeout; the per-answer deadline must."""
    kinds = ["ok", "body", "nolength", "headers", "silent", "ok"]
    ids = _ids(len(kinds), 7)
    csv = tmp_path / "list.csv"
    csv.write_text("id,url\n" + "".join(f"{i},{trickle_host}/{k}/{i}.jpg\n" for i, k in zip(ids, kinds)))
    out = tmp_path / "imgs"
    timeout = 1.5
    t0 = time.monotonic()
    res = fetch_urls(csv, out, size=0, workers=len(kinds), timeout=timeout, retries=0)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 2.0, elapsed  # all in parallel: one deadline plus slack, not forever
    assert (res["downloaded"], res["failed"]) == (2, 4)
    reasons = {line.split(",")[0]: line.split(",", 2)[2] for line in (out / "failed.csv").read_text().splitlines()[1:]}
    assert set(reasons) == {i for i, k in zip(ids, kinds) if k != "ok"}
    assert all(r.startswith("timeout") for r in reasons.values()), reasons
    for i, k in zip(ids, kinds):
        assert (out / hashed_relpath(i)).exists() == (k == "ok")
    assert not (out / ".glr-tmp").exists()


def test_fetch_urls_cli_timeout_on_a_trickling_host_is_one_line_per_url(tmp_path, trickle_host):
    csv = tmp_path / "list.csv"
    ids = _ids(2, 8)
    csv.write_text(f"id,url\n{ids[0]},{trickle_host}/body/a.jpg\n{ids[1]},{trickle_host}/ok/b.jpg\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(no_proxy="127.0.0.1", PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    done = subprocess.run([GLR, "fetch-urls", str(csv), "--out", str(tmp_path / "o"), "--timeout", "1", "--retries",
                           "0", "-q"], env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - t0 < 15
    assert done.returncode == 0, done.stderr
    assert "1 downloaded, 0 already there, 1 failed" in done.stdout
    assert "timeout (no complete answer within 1 s)" in (tmp_path / "o" / "failed.csv").read_text()


def test_fetch_urls_refuses_an_image_over_the_pixel_budget_without_decoding_it(tmp_path, trickle_host):
    """Issue 15 class 8: a small PNG declaring 49 Mpx is listed as failed, for every --size."""
    ids = _ids(2, 9)
    csv = tmp_path / "list.csv"
    csv.write_text(f"id,url\n{ids[0]},{trickle_host}/huge/a.png\n{ids[1]},{trickle_host}/ok/b.jpg\n")
    for size in (0, 96):
        out = tmp_path / f"o{size}"
        res = fetch_urls(csv, out, size=size, workers=2, timeout=5, retries=0)
        assert (res["downloaded"], res["failed"]) == (1, 1)
        (row,) = csv_module.DictReader(open(out / "failed.csv"))
        assert row["reason"] == ("decompression bomb (7000x7000 = 49.0 Mpx to decode, over the 40 Mpx budget "
                                 "(pipeline.images.MAX_PIXELS))"), row
        assert not (out / hashed_relpath(ids[0])).exists()
