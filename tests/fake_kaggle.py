"""A stand-in for Kaggle's API on loopback, for driving the real `kaggle` client offline.

The real client (kaggle 2.x + kagglesdk), with `KAGGLE_API_ENVIRONMENT=LOCALHOST` set before
`kaggle` is imported, POSTs JSON to `http://localhost/api/v1/<Service>/<Method>`. Routing it
here with `http_proxy=http://127.0.0.1:PORT` (and empty `no_proxy`) means this server receives
absolute-form requests (`POST http://localhost/api/... HTTP/1.0`) and answers them as Kaggle
would: Basic auth for username/key, Bearer for `KAGGLE_API_TOKEN` (checked through
`security.OAuthService/IntrospectToken`), downloads as a 302 to a file URL that honours `Range`
(so the client can resume), submissions as StartSubmissionUpload → PUT → CreateSubmission.
Code competitions too: datasets (StartBlobUpload → PUT per file, then CreateDataset or
CreateDatasetVersion; a folder uploaded as `<folder>.zip` is unpacked, as Kaggle does), kernels
(SaveKernel, GetKernelSessionStatus, ListKernelSessionOutput) and CreateCodeSubmission.

Everything is bounded: the server binds 127.0.0.1 only, stops itself after `lifetime` seconds,
handler sockets time out, and a CONNECT (a stray https request) is refused and recorded so a
test can assert nothing tried to leave the machine.
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

API = "/api/v1/"
LAST_MODIFIED = email.utils.formatdate(1_700_000_000, usegmt=True)


@dataclass
class Hit:
    """One request the fake received."""

    method: str
    path: str
    range: str | None = None
    auth: str | None = None
    status: int = 0
    body_bytes: int = 0  # bytes of file content actually sent


def _quiet_on_hangups(request, address) -> None:
    """A client that hangs up mid-answer (the tests cut downloads on purpose) is not news; anything
    else is printed as socketserver does."""
    import sys
    import traceback

    if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
        traceback.print_exc()


class _Loopback:
    """Serve a handler class on 127.0.0.1 in a daemon thread; stops itself after `lifetime` s."""

    lifetime: float
    _stop: threading.Event

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.handle_error = _quiet_on_hangups
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        # stops itself even when a test forgets to
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        self._stop.set()
        if getattr(self, "_server", None) is not None:
            self._server.shutdown()
            self._server.server_close()
            self._timer.cancel()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class FakeKaggle(_Loopback):
    """Configure, then `with FakeKaggle(...) as fk:` and use `fk.env(home)` for the client.

    archives: competition name → bytes of its all-files bundle (served as `<name>.zip`).
    files: (competition, file name) → bytes of one file (`competition_download_file`).
    users: username → key accepted with Basic auth. tokens: access token → username.
    rules_accepted: competitions whose rules the user accepted (others answer 403).
    code_competitions: competitions that refuse file submissions (400 on CreateSubmission).
    throttle: (bytes per chunk, seconds between chunks) for file bodies, or None for full speed.
    cut_after: when set, the first full (non-Range) download of a file sends this many bytes of
    the body and then drops the connection (the client sees an incomplete read).
    """

    archives: dict[str, bytes] = field(default_factory=dict)
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=lambda: {"alice": "secret-key"})
    tokens: dict[str, str] = field(default_factory=lambda: {"good-token": "alice"})
    rules_accepted: set[str] | None = None  # None: every known competition
    code_competitions: set[str] = field(default_factory=set)
    throttle: tuple[int, float] | None = None
    cut_after: int | None = None
    fail_upload: bool = False  # PUT answers 500 (a storage failure during the upload)
    kernel_polls: int = 2  # status answers RUNNING this many times before the outcome
    kernel_error: str | None = None  # when set, a pushed kernel ends in ERROR with this log
    lifetime: float = 180.0

    def __post_init__(self) -> None:
        self.hits: list[Hit] = []
        self.uploads: dict[str, bytes] = {}
        self.submissions: list[dict] = []
        self.blob_names: dict[str, str] = {}  # upload token → file name given to StartBlobUpload
        self.datasets: dict[str, dict] = {}  # "owner/slug" → {"owner", "title", "license", "versions": [{name: bytes}]}
        self.kernels: dict[str, list[dict]] = {}  # "owner/slug" → pushed versions (the SaveKernel request + state)
        self.lock = threading.Lock()
        self._cut_done: set[str] = set()
        self._server: ThreadingHTTPServer | None = None
        self._stop = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def start(self) -> "FakeKaggle":
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._serve(Handler)
        return self

    def env(self, home, **creds: str) -> dict[str, str]:
        """Environment variables that point the real client at this fake (and nowhere else)."""
        proxy = f"http://127.0.0.1:{self.port}"
        env = {
            "HOME": str(home),
            "KAGGLE_API_ENVIRONMENT": "LOCALHOST",
            "http_proxy": proxy, "HTTP_PROXY": proxy,
            "https_proxy": proxy, "HTTPS_PROXY": proxy,
            "all_proxy": proxy, "ALL_PROXY": proxy,
            "no_proxy": "", "NO_PROXY": "",
        }
        env.update(creds)
        return env

    # -- what the tests look at -------------------------------------------------------------------
    def file_hits(self) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path.startswith("/files/")]

    def api_calls(self) -> list[str]:
        with self.lock:
            return [h.path[len(API):] for h in self.hits if h.path.startswith(API)]

    def stray(self) -> list[Hit]:
        """Requests that were not for localhost (e.g. an https CONNECT to api.kaggle.com)."""
        with self.lock:
            return [h for h in self.hits if h.method == "CONNECT" or h.path.startswith("!")]

    def dataset_files(self, ref: str, version: int = -1) -> dict[str, bytes]:
        """The files of one version of a dataset (folders unpacked), by relative path."""
        return self.datasets[ref]["versions"][version]

    def known(self, competition: str) -> bool:
        return competition in self.archives or any(c == competition for c, _ in self.files) \
            or competition in self.code_competitions


class _CodeCompetitions:
    """Datasets, kernels and code submissions, answered as Kaggle's API would (one request each)."""

    def __init__(self, handler: "_Handler", hit: Hit, user: str):
        self.h, self.hit, self.user, self.fake = handler, hit, user, handler.fake

    def ok(self, obj: dict) -> None:
        self.h._json(self.hit, 200, obj)

    def error(self, status: int, message: str) -> None:
        self.h._error(self.hit, status, message)

    def handle(self, service: str, name: str, req: dict) -> None:
        fake = self.fake
        with fake.lock:
            if name == "StartBlobUpload":
                token = f"blob-{len(fake.uploads) + 1}"
                fake.uploads[token] = b""
                fake.blob_names[token] = req.get("name", "")
                return self.ok({"token": token, "createUrl": f"http://localhost/upload/{token}"})
            if name == "GetDatasetStatus":
                ref = f"{req.get('ownerSlug')}/{req.get('datasetSlug')}"
                if ref not in fake.datasets:
                    return self.error(404, f"Dataset {ref} not found")
                return self.ok({"status": "READY"})
            if name == "CreateDataset":
                return self.create_dataset(req)
            if name == "CreateDatasetVersion":
                return self.create_version(req)
            if name == "SaveKernel":
                return self.save_kernel(req)
            if name in ("GetKernelSessionStatus", "ListKernelSessionOutput"):
                return self.kernel_session(name, req)
        return self.error(404, f"fake Kaggle does not implement {service}/{name}")

    # -- datasets ---------------------------------------------------------------------------------
    def _files(self, files: list[dict]) -> dict[str, bytes] | str:
        """The uploaded files by name; a `<folder>.zip` is unpacked into `<folder>/…` as Kaggle does."""
        import zipfile

        out: dict[str, bytes] = {}
        for f in files:
            token = f.get("token", "")
            if token not in self.fake.blob_names:
                return f"unknown upload token {token!r}"
            name, data = self.fake.blob_names[token], self.fake.uploads[token]
            if name.endswith(".zip"):
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    for m in zf.infolist():
                        if not m.is_dir():
                            out[f"{name[:-4]}/{m.filename}"] = zf.read(m)
            else:
                out[name] = data
        return out

    def create_dataset(self, req: dict) -> None:
        ref = f"{req.get('ownerSlug')}/{req.get('slug')}"
        if req.get("ownerSlug") != self.user:
            return self.error(403, f"user {self.user} may not create datasets owned by {req.get('ownerSlug')}")
        if ref in self.fake.datasets:
            return self.ok({"status": "error", "error": f"The requested slug \"{req.get('slug')}\" is already in use"})
        files = self._files(req.get("files") or [])
        if isinstance(files, str):
            return self.error(400, files)
        self.fake.datasets[ref] = {"owner": self.user, "title": req.get("title"), "license": req.get("licenseName"),
                                   "private": req.get("isPrivate", False), "versions": [files]}
        return self.ok({"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"})

    def create_version(self, req: dict) -> None:
        ref = f"{req.get('ownerSlug')}/{req.get('datasetSlug')}"
        ds = self.fake.datasets.get(ref)
        if ds is None:
            return self.error(404, f"Dataset {ref} not found")
        if ds["owner"] != self.user:
            return self.error(403, f"user {self.user} may not write to dataset {ref}")
        files = self._files((req.get("body") or {}).get("files") or [])
        if isinstance(files, str):
            return self.error(400, files)
        ds["versions"].append(files)
        return self.ok({"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"})

    # -- kernels ----------------------------------------------------------------------------------
    def save_kernel(self, req: dict) -> None:
        fake = self.fake
        ref = req.get("slug") or ""
        owner = ref.split("/")[0]
        if owner != self.user:
            return self.error(403, f"user {self.user} may not push kernels owned by {owner}")
        comps = req.get("competitionDataSources") or []
        datasets = req.get("datasetDataSources") or []
        bad_comps = [c for c in comps if not fake.known(c)]
        bad_ds = [d for d in datasets if d not in fake.datasets]
        if any(c in fake.code_competitions for c in comps) and req.get("enableInternet", True):
            return self.ok({"error": "Notebooks submitted to this competition must have internet access disabled"})
        versions = fake.kernels.setdefault(ref, [])
        versions.append({**req, "polls": 0, "error": fake.kernel_error})
        n = len(versions)
        return self.ok({"ref": f"/code/{ref}", "url": f"https://www.kaggle.com/code/{ref}", "versionNumber": n,
                        "invalidCompetitionSources": bad_comps, "invalidDatasetSources": bad_ds})

    def _version(self, owner: str, slug: str, label) -> dict | None:
        versions = self.fake.kernels.get(f"{owner}/{slug}") or []
        if not versions:
            return None
        if label in (None, "", 0):
            return versions[-1]
        label = str(label)
        if not (label.startswith("v") and label[1:].isdigit()):  # the API writes versions as v<N> (404 otherwise)
            return None
        i = int(label[1:])
        return versions[i - 1] if 1 <= i <= len(versions) else None

    def kernel_session(self, name: str, req: dict) -> None:
        v = self._version(req.get("userName"), req.get("kernelSlug"), req.get("versionLabel"))
        if v is None:
            return self.error(404, f"Notebook {req.get('userName')}/{req.get('kernelSlug')} not found")
        if name == "GetKernelSessionStatus":
            v["polls"] += 1
            if v["polls"] <= self.fake.kernel_polls:
                return self.ok({"status": "RUNNING"})
            if v["error"]:
                return self.ok({"status": "ERROR", "failureMessage": "Your notebook hit an unhandled error while "
                                "executing"})
            return self.ok({"status": "COMPLETE"})
        log = v["error"] or "glr infer: wrote /kaggle/working/submission.csv\n"
        log_json = json.dumps([{"stream_name": "stdout", "time": 1.0, "data": line + "\n"}
                               for line in log.splitlines()])
        files = [] if v["error"] else [{"fileName": "submission.csv", "url": "http://localhost/files/out/submission.csv"}]
        return self.ok({"files": files, "log": log_json})

    def code_submission(self, req: dict) -> None:
        fake = self.fake
        comp = req.get("competitionName", "")
        if comp not in fake.code_competitions:
            return self.error(400, f"Competition '{comp}' does not accept code submissions")
        version = req.get("kernelVersion")
        v = self._version(req.get("kernelOwner"), req.get("kernelSlug"), f"v{version}" if version else None)
        if v is None:
            return self.error(404, f"Notebook {req.get('kernelOwner')}/{req.get('kernelSlug')} version "
                                   f"{req.get('kernelVersion')} not found")
        if comp not in (v.get("competitionDataSources") or []):
            return self.error(400, f"The notebook does not have competition '{comp}' as a data source")
        if v["error"] or v["polls"] <= fake.kernel_polls:
            return self.error(400, "The notebook version has not completed successfully")
        if v.get("enableInternet", True):
            return self.error(400, "Notebooks submitted to this competition must have internet access disabled")
        ref = 1000 + len(fake.submissions)
        fake.submissions.append({**req, "ref": ref})
        return self.ok({"message": "Your submission was successfully saved", "ref": ref})


def _etag(data: bytes) -> str:
    return '"' + hashlib.sha1(data).hexdigest()[:16] + '"'


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKaggle
    timeout = 10  # a stuck client never holds a handler thread for long
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args) -> None:  # quiet
        pass

    # -- helpers ---------------------------------------------------------------------------------
    def _record(self, **kw) -> Hit:
        url = urlsplit(self.path)
        path = unquote(url.path)
        if url.netloc and url.hostname not in ("localhost", "127.0.0.1"):
            path = "!" + url.netloc + path
        hit = Hit(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"), **kw)
        with self.fake.lock:
            self.fake.hits.append(hit)
        return hit

    def _json(self, hit: Hit, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        hit.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, hit: Hit, status: int, message: str) -> None:
        self._json(hit, status, {"code": status, "message": message})

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Basic "):
            try:
                user, _, key = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return None
            return user if self.fake.users.get(user) == key else None
        if auth.startswith("Bearer "):
            return self.fake.tokens.get(auth[7:])
        return None

    # -- verbs -----------------------------------------------------------------------------------
    def do_CONNECT(self) -> None:
        hit = self._record()
        hit.status = 403
        self.send_error(403, "fake Kaggle: https is not served here (only http://localhost)")

    def do_POST(self) -> None:
        hit = self._record()
        if hit.path.startswith("!") or not hit.path.startswith(API):
            return self._error(hit, 404, f"no such endpoint {hit.path}")
        method = hit.path[len(API):]
        try:
            req = json.loads(self._body() or b"{}")
        except ValueError:
            return self._error(hit, 400, "body is not JSON")
        if method == "security.OAuthService/IntrospectToken":
            user = self.fake.tokens.get(req.get("token", ""))
            return self._json(hit, 200, {"active": True, "username": user} if user else {"active": False})
        service = method.split("/", 1)[0]
        if service not in ("competitions.CompetitionApiService", "blobs.BlobApiService", "datasets.DatasetApiService",
                           "kernels.KernelsApiService"):
            return self._error(hit, 404, f"fake Kaggle does not implement {method}")
        user = self._user()
        if user is None:
            return self._error(hit, 401, "Unauthenticated: the request does not have valid credentials")
        name = method.split("/", 1)[1]
        if service != "competitions.CompetitionApiService":
            return _CodeCompetitions(self, hit, user).handle(service, name, req)
        comp = req.get("competitionName", "")
        fake = self.fake
        if not fake.known(comp):
            return self._error(hit, 404, f"Competition '{comp}' not found")
        if fake.rules_accepted is not None and comp not in fake.rules_accepted:
            return self._error(hit, 403, "You must accept this competition's rules before you'll be able to download files")
        if name == "DownloadDataFiles":
            if comp not in fake.archives:
                return self._error(hit, 404, f"Competition '{comp}' has no data files")
            return self._redirect(hit, f"/files/{comp}/{comp}.zip")
        if name == "DownloadDataFile":
            fname = req.get("fileName", "")
            if (comp, fname + ".zip") in fake.files:  # big files are served zipped, as Kaggle does
                return self._redirect(hit, f"/files/{comp}/{fname}.zip")
            if (comp, fname) not in fake.files:
                return self._error(hit, 404, f"File '{fname}' not found in competition '{comp}'")
            return self._redirect(hit, f"/files/{comp}/{fname}")
        if name == "StartSubmissionUpload":
            token = f"blob-{len(fake.uploads) + 1}"
            fake.uploads[token] = b""
            return self._json(hit, 200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})
        if name == "CreateCodeSubmission":
            with fake.lock:
                return _CodeCompetitions(self, hit, self._user()).code_submission(req)
        if name == "CreateSubmission":
            if comp in fake.code_competitions:
                return self._error(hit, 400, "Submission not allowed: this competition only accepts submissions from Kaggle Notebooks")
            token = req.get("blobFileTokens", "")
            if not fake.uploads.get(token):
                return self._error(hit, 400, f"unknown or empty upload {token!r}")
            ref = 1000 + len(fake.submissions)
            fake.submissions.append({**req, "ref": ref, "content": fake.uploads[token]})
            return self._json(hit, 200, {"message": "Successfully submitted to " + comp, "ref": ref})
        return self._error(hit, 404, f"fake Kaggle does not implement {method}")

    def _redirect(self, hit: Hit, path: str) -> None:
        hit.status = 302
        self.send_response(302)
        self.send_header("Location", "http://localhost" + path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:
        hit = self._record()
        token = hit.path.rsplit("/", 1)[-1]
        if not hit.path.startswith("/upload/") or token not in self.fake.uploads:
            return self._error(hit, 404, "no such upload")
        body = self._body()
        if self.fake.fail_upload:
            return self._error(hit, 500, "storage backend unavailable")
        self.fake.uploads[token] = body
        self._json(hit, 200, {})

    def do_GET(self) -> None:
        hit = self._record()
        parts = hit.path.split("/", 3)  # '', 'files', comp, name
        if len(parts) != 4 or parts[1] != "files":
            return self._error(hit, 404, "not found")
        comp, name = parts[2], parts[3]
        data = self.fake.archives.get(comp) if name == f"{comp}.zip" else self.fake.files.get((comp, name))
        if data is None:
            return self._error(hit, 404, "not found")
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and self.headers.get("If-Range", _etag(data)) in (_etag(data), LAST_MODIFIED):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                hit.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        hit.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/zip" if name.endswith(".zip") else "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", _etag(data))
        self.send_header("Last-Modified", LAST_MODIFIED)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        end = len(data)
        cut = False
        with self.fake.lock:
            if self.fake.cut_after is not None and start == 0 and hit.path not in self.fake._cut_done:
                self.fake._cut_done.add(hit.path)
                end, cut = min(end, self.fake.cut_after), True
        chunk, pause = self.fake.throttle or (1 << 20, 0.0)
        pos = start
        try:
            while pos < end and not self.fake._stop.is_set():
                n = min(chunk, end - pos)
                self.wfile.write(data[pos:pos + n])
                self.wfile.flush()
                pos += n
                hit.body_bytes += n
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            return
        if cut:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------
# Image hosts for `glr fetch-urls` (the 2018/2019 lists point at Google's photo servers)
# ------------------------------------------------------------------------------------------------
def jpeg_bytes(name: str, w: int = 80, h: int = 60, fmt: str = "JPEG") -> bytes:
    """A small deterministic photo-like image (smooth gradient + noise) named `name`."""
    import zlib

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(zlib.crc32(name.encode()))
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    arr = (base + 0.8 * xx[..., None] + 0.5 * yy[..., None] + rng.normal(0, 8, (h, w, 3))) % 256
    buf = io.BytesIO()
    Image.fromarray(arr.astype("uint8"), "RGB").save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


class ImageServer(_Loopback):
    """Loopback image host. Behaviour by path:

    `/img/<name>.jpg` an 80×60 JPEG, `/photo/<name>.jpg` a 256×192 one; `/big/<name>.png` a 200×120 PNG; `/missing/…` 404; `/html/…` an
    HTML page with status 200; `/hang/…` answers nothing for `hang` seconds; `/flaky/<name>.jpg`
    503 on the first request, then the JPEG. Requests for other hosts (through the proxy) with an
    `s<digits>` path segment, like Google's photo servers, get a JPEG of that longest side.
    `delay` slows every answer (for kill -9 tests). Counts every request per URL.
    """

    def __init__(self, delay: float = 0.0, hang: float = 3.0, lifetime: float = 180.0):
        self.delay, self.hang, self.lifetime = delay, hang, lifetime
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._cache: dict[tuple, bytes] = {}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _image(self, key: tuple) -> bytes:
        with self.lock:
            if key not in self._cache:
                self._cache[key] = jpeg_bytes(*key)
            return self._cache[key]

    def start(self) -> "ImageServer":
        server = self

        class H(BaseHTTPRequestHandler):
            timeout = 10
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

            def log_message(self, *a):
                pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                u = urlsplit(self.path)
                key = (u.netloc or "127.0.0.1") + u.path
                with server.lock:
                    n = server.counts[key] = server.counts.get(key, 0) + 1
                if server.delay:
                    server._stop.wait(server.delay)
                path = u.path
                name = path.rsplit("/", 1)[-1]
                if u.hostname not in (None, "127.0.0.1", "localhost"):
                    segs = [s for s in path.split("/") if re.fullmatch(r"s\d+", s)]
                    side = int(segs[-1][1:]) if segs else 1600
                    side = min(side, 400)
                    return self._send(200, server._image((name, side, side * 3 // 4)), "image/jpeg")
                if path.startswith("/img/"):
                    return self._send(200, server._image((name,)), "image/jpeg")
                if path.startswith("/photo/"):
                    return self._send(200, server._image((name, 256, 192)), "image/jpeg")
                if path.startswith("/big/"):
                    return self._send(200, server._image((name, 200, 120, "PNG")), "image/png")
                if path.startswith("/html/"):
                    return self._send(200, b"<html><body>Photo removed</body></html>", "text/html; charset=utf-8")
                if path.startswith("/hang/"):
                    server._stop.wait(server.hang)
                    return self._send(200, server._image((name,)), "image/jpeg")
                if path.startswith("/flaky/"):
                    if n == 1:
                        return self._send(503, b"busy", "text/plain")
                    return self._send(200, server._image((name,)), "image/jpeg")
                return self._send(404, b"not found", "text/plain")

        self._serve(H)
        self.port = self._server.server_address[1]
        return self
