"""`glr fetch-urls`: download the 2018/2019 competitions' `id,url` image lists.

Millions of photos from hosts that time out, vanish or answer with an HTML page: downloads
run in a thread pool, each image is decoded before it is kept (so a page or a truncated body
is a failure, not a file), written to `OUT/.glr-tmp/` and renamed into the hashed layout
(`OUT/a/b/c/<id>.jpg`) whole. A re-run skips every image already there, so an interrupted run
(even `kill -9`) resumes where it stopped. Failures go to `OUT/failed.csv` (id,url,reason).

Google photo URLs (`…googleusercontent.com/…/s1600/…`, `…=s1600`) carry the served size in an
`s<digits>` segment; asking for `s<size>` lets Google's servers resize (as competitors did) and
saves most of the bandwidth. Other images are resized here.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from submissions.errors import UserError

GOOGLE_HOSTS = ("googleusercontent.com", "ggpht.com", "blogspot.com", "blogger.com")
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_BYTES = 40 << 20  # a landmark photo is far smaller; anything bigger is not what we want
BACKOFF_S = 0.25  # first retry waits about this long, doubling after each failure
MAX_BACKOFF_S = 10.0
_ID = re.compile(r"^[A-Za-z0-9_-]{3,}$")
_SEG = re.compile(r"^s\d+(-[A-Za-z0-9-]*)?$")
_SUFFIX = re.compile(r"=s\d+(-[A-Za-z0-9-]*)?$")
TMP = ".glr-tmp"


def resized_url(url: str, size: int) -> str:
    """The URL asking Google's photo servers for a `size`-pixel version (else `url` unchanged).

    `…/s1600/photo.jpg` → `…/s96/photo.jpg`, `…=s1600` → `…=s96`; other hosts are left alone.
    """
    if size <= 0:
        return url
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not any(host == h or host.endswith("." + h) for h in GOOGLE_HOSTS):
        return url
    segs = parts.path.split("/")
    for k in range(len(segs) - 1, -1, -1):
        if _SEG.match(segs[k]):
            segs[k] = f"s{size}"
            return urlunsplit(parts._replace(path="/".join(segs)))
    if _SUFFIX.search(parts.path):
        return urlunsplit(parts._replace(path=_SUFFIX.sub(f"=s{size}", parts.path)))
    return url


class _Fail(Exception):
    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


_inflight = threading.local()  # per download thread: the socket its current request went out on


@functools.cache
def _adapter_class():
    """A requests adapter whose connections say which one a thread's request uses, so a deadline can cut it.

    Built on first use (requests and urllib3 load only when a download starts).
    """
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Tracked:  # the socket itself: a response read until close keeps it after the connection lets go
        def connect(self):
            super().connect()
            _inflight.sock = self.sock

        def request(self, *args, **kwargs):
            _inflight.sock = self.sock  # a kept-alive connection (None: connect() will say)
            return super().request(*args, **kwargs)

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = type("HTTPConn", (Tracked, HTTPConnection), {})

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = type("HTTPSConn", (Tracked, HTTPSConnection), {})

    pools = {"http": HTTPPool, "https": HTTPSPool}

    class DeadlineAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy, **kwargs):
            manager = super().proxy_manager_for(proxy, **kwargs)
            manager.pool_classes_by_scheme = pools
            return manager

    return DeadlineAdapter


class _Deadline:
    """Cut this thread's connection once `seconds` have passed, or `stop` is set, whatever read it is blocked in.

    A per-read socket timeout alone lets a host that trickles one byte a second (in the headers or
    the body) hold a download forever; shutting the socket down wakes the blocked read at once.
    """

    def __init__(self, seconds: float, stop: threading.Event):
        self.seconds, self.expired, self._stop = seconds, False, stop
        self._done = threading.Event()
        _inflight.sock = None
        self._slot = _inflight.__dict__  # this thread's slot, read from the timer thread
        self._timer = threading.Thread(target=self._cut, daemon=True, name="glr-fetch-deadline")

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _cut(self) -> None:
        end = time.monotonic() + self.seconds
        while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
            if self._done.wait(min(left, 0.2)):
                return
        self.expired = True
        while True:  # the socket may not exist yet (still connecting): try until it does or we are done
            sock = self._slot.get("sock")
            sock = sock if isinstance(sock, socket.socket) else getattr(sock, "socket", None)  # TLS in TLS
            if sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
                return
            if self._done.wait(0.05):
                return


def _get(session, url: str, timeout: float, stop: threading.Event) -> bytes:
    """The body of `url`; connecting, each read and the whole answer each get at most `timeout` seconds."""
    import requests

    deadline = _Deadline(timeout, stop)
    too_slow = _Fail(f"timeout (no complete answer within {timeout:g} s)", True)
    try:
        with deadline, session.get(url, timeout=(timeout, timeout), stream=True) as r:
            if r.status_code != 200:
                raise _Fail(f"HTTP {r.status_code}", r.status_code in RETRY_STATUS)
            ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype.startswith("text/") or ctype in ("application/json", "application/xhtml+xml"):
                raise _Fail(f"not an image ({ctype})", False)
            length = int(r.headers.get("Content-Length") or 0)
            if length > MAX_BYTES:
                raise _Fail(f"too large ({length} bytes)", False)
            buf = bytearray()
            for chunk in r.iter_content(64 * 1024):
                buf += chunk
                if len(buf) > MAX_BYTES:
                    raise _Fail(f"too large (> {MAX_BYTES} bytes)", False)
        if deadline.expired:  # the cut can look like a normal end of a body without Content-Length
            raise too_slow
        return bytes(buf)
    except requests.Timeout:
        raise too_slow from None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
        if deadline.expired:
            raise too_slow from None
        raise _Fail(f"connection error ({type(e).__name__})", True) from None
    except requests.RequestException as e:
        raise _Fail(f"bad request ({type(e).__name__})", False) from None


def _content_range_start(value: str) -> int | None:
    m = re.match(r"^bytes (\d+)-\d+/(\d+|\*)$", value.strip())
    return int(m.group(1)) if m else None


def get_to_file(session, url: str, part: Path, *, timeout: float, stop: threading.Event, deadline_s: float,
                on_bytes=None) -> int:
    """Append the rest of `url` to `part`, resuming with `Range: bytes=<size of part>-`; return its size.

    For files too big to hold in memory (the GLDv2 mirror's 1 GB shards): bytes go to disk as they
    come, so a cut (an error, or the `deadline_s` watchdog against a trickling host) loses nothing and
    the next call asks only for what is missing. A server that ignores the Range (200) starts the
    file over. Raises `_Fail` (retry says whether trying again may help); `on_bytes(n)` per chunk.
    """
    import requests
    import urllib3

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    deadline = _Deadline(deadline_s, stop)
    cut = _Fail(f"cut (no complete answer within {deadline_s:g} s)", True)
    total = None
    try:
        with deadline, session.get(url, timeout=(timeout, timeout), stream=True, headers=headers) as r:
            if r.status_code == 416 and have:  # asked past the end: what we have is too long, start over
                part.unlink()
                raise _Fail("HTTP 416 (the partial file was longer than the remote one)", True)
            if r.status_code == 206 and _content_range_start(r.headers.get("Content-Range", "")) != have:
                part.unlink()
                raise _Fail(f"HTTP 206 for the wrong range ({r.headers.get('Content-Range')!r})", True)
            if r.status_code not in (200, 206):
                raise _Fail(f"HTTP {r.status_code}", r.status_code in RETRY_STATUS)
            mode = "ab" if r.status_code == 206 else "wb"
            start = have if r.status_code == 206 else 0
            if r.headers.get("Content-Length"):
                total = start + int(r.headers["Content-Length"])
            # read1 hands over every byte that arrived before a cut (iter_content drops a partial last chunk)
            read1 = getattr(r.raw, "read1", None)
            chunks = iter(lambda: read1(1 << 20), b"") if read1 else r.iter_content(1 << 20)
            with open(part, mode) as f:
                for chunk in chunks:
                    f.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
        size = part.stat().st_size
        if deadline.expired:
            raise cut
        if total is not None and size != total:
            raise _Fail(f"short body ({size} of {total} bytes)", True)
        return size
    except (requests.Timeout, urllib3.exceptions.TimeoutError):
        raise cut from None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError) as e:
        if deadline.expired:
            raise cut from None
        raise _Fail(f"connection error ({type(e).__name__})", True) from None
    except requests.RequestException as e:
        raise _Fail(f"bad request ({type(e).__name__})", False) from None


def _encode(data: bytes, size: int) -> bytes:
    """The bytes to keep: the original JPEG when it fits, else a re-encoded RGB JPEG.

    Decoded through `pipeline.images` (header first: an image over the pixel budget is refused before
    decoding); a JPEG kept as served is still decoded whole, at `CHECK_SIDE`, to prove it complete.
    """
    from pipeline.images import CHECK_SIDE, ImageReadError, open_rgb, read_header

    try:
        head = read_header(io.BytesIO(data))
        keep = head.format == "JPEG" and (size <= 0 or max(head.width, head.height) <= size)
        img = open_rgb(io.BytesIO(data), max_side=size or (CHECK_SIDE if keep else None))
    except ImageReadError as e:
        raise _Fail(f"{e.reason} ({e.detail[:120]})", False) from None
    if keep:
        return data
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def _write(final: Path, data: bytes, tmp_dir: Path) -> None:
    part = tmp_dir / f"{final.name}.{threading.get_ident()}.part"
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)


def _download(session, url: str, final: Path, tmp_dir: Path, size: int, timeout: float, retries: int,
              stop: threading.Event) -> str | None:
    """Fetch one image into `final`; None on success, else the reason it failed (`stop`: give up now)."""
    urls = [resized_url(url, size)]
    if urls[0] != url:
        urls.append(url)  # a host that ignores the size segment: fall back to the original
    reason = "no attempt"
    for u in urls:
        for attempt in range(retries + 1):
            try:
                if stop.is_set():
                    return "interrupted"
                _write(final, _encode(_get(session, u, timeout, stop), size), tmp_dir)
                return None
            except _Fail as f:
                reason = f.reason
                if not f.retry:
                    break
                if attempt < retries:
                    stop.wait(min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt) * (0.5 + random.random()))
        if not reason.startswith("HTTP 4"):
            break  # only a refused resized URL is worth trying in its original size
    return reason


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """Set `stop` the moment SIGINT or SIGTERM arrives, then let the usual handler raise.

    The exception unwinds through the thread pool, which waits for the downloads in flight: with
    `stop` set they are cut at once instead of running to their deadline and retrying.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        stop.set()
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before != signal.SIG_IGN:  # the default action: end the process as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before if before is not None else signal.SIG_DFL)


def fetch_urls(
    csv: str | os.PathLike, out: str | os.PathLike, *, size: int = 96, workers: int = 16, timeout: float = 10,
    retries: int = 3,
) -> dict:
    """Download every `id,url` row of `csv` into `out/a/b/c/<id>.jpg`; return counts and images/s.

    Images already in `out` are skipped (resume). `size` is the longest side kept (0 = as
    served), `timeout` bounds connecting, each read and each whole answer, `retries` to timeouts,
    connection errors, 429 and 5xx answers, with exponential back-off. Rows that fail are
    written to `out/failed.csv` (id,url,reason); the file is removed when nothing failed.
    """
    import pandas as pd
    import requests

    from pipeline.acquire.competition import hashed_relpath, read_csv_checked
    from pipeline.parallel import bounded_map
    from pipeline.progress import progress
    from submissions.files import atomic_path

    csv, out = Path(csv), Path(out)
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    df = read_csv_checked(csv, ("id", "url"), dtype={"id": str, "url": str})
    bad = ~df["id"].str.match(_ID)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise UserError(f"{csv}: row {row + 2}: id {df['id'].iloc[row]!r} is not a plain id (letters, digits, _ or -, at least 3)")
    out.mkdir(parents=True, exist_ok=True)
    tmp_dir = out / TMP
    shutil.rmtree(tmp_dir, ignore_errors=True)  # pieces of an interrupted run are never complete
    tmp_dir.mkdir()

    failures: list[tuple[str, str, str]] = []
    todo: list[tuple[str, str, Path]] = []
    skipped = 0
    for i, u in zip(df["id"].tolist(), df["url"].tolist()):
        final = out / hashed_relpath(i)
        if final.exists():
            skipped += 1
        elif not isinstance(u, str) or not u.strip():
            failures.append((i, "", "no url"))
        else:
            todo.append((i, u.strip(), final))

    local = threading.local()

    def session():
        if not hasattr(local, "s"):
            s = requests.Session()
            for scheme in ("http://", "https://"):
                s.mount(scheme, _adapter_class()(pool_connections=4, pool_maxsize=4, max_retries=0))
            s.headers["User-Agent"] = "glr-fetch-urls"
            local.s = s
        return local.s

    def job(item):
        i, u, final = item
        return i, u, _download(session(), u, final, tmp_dir, size, timeout, retries, stop)

    def results():
        return bounded_map(job, todo, workers)

    t0 = time.monotonic()
    downloaded = 0
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            for i, u, reason in progress(results(), total=len(todo), desc="fetch-urls", unit="img"):
                if reason is None:
                    downloaded += 1
                else:
                    failures.append((i, u, reason))
    finally:  # also on Ctrl-C / SIGTERM: the pieces in flight are never complete
        shutil.rmtree(tmp_dir, ignore_errors=True)
    seconds = time.monotonic() - t0

    failed_csv = out / "failed.csv"
    if failures:
        with atomic_path(failed_csv) as tmp:
            pd.DataFrame(failures, columns=["id", "url", "reason"]).to_csv(tmp, index=False)
    elif failed_csv.exists():
        failed_csv.unlink()
    return {
        "csv": str(csv),
        "out": str(out),
        "rows": int(len(df)),
        "downloaded": downloaded,
        "skipped": skipped,
        "failed": len(failures),
        "failed_csv": str(failed_csv) if failures else None,
        "seconds": round(seconds, 3),
        "images_per_s": downloaded / seconds if seconds > 0 else 0.0,
    }
