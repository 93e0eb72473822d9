"""A GLDv2 mirror on loopback: the layout of `s3.amazonaws.com/google-landmark`, in miniature.

`make_mirror` builds the files (`metadata/train.csv` id,url,landmark_id; `metadata/train_clean.csv`
landmark_id,images; `metadata/test.csv` id,url; `ground_truth/recognition_solution_v2.1.csv`
id,landmarks,Usage; `<split>/images_NNN.tar` with members `a/b/c/<id>.jpg`;
`md5sum/<split>/md5.images_NNN.txt` as `<md5>  images_NNN.tar`). `MirrorServer` serves them with
Range (206) and HEAD, logs every request with its Range header, and on demand cuts a body halfway
once (`cut_once`) or serves other bytes than the md5 file says (`corrupt`: path → times).
"""
from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from tests.fake_kaggle import _Loopback, jpeg_bytes


@dataclass
class Mirror:
    files: dict[str, bytes] = field(default_factory=dict)
    images: dict[str, dict[str, bytes]] = field(default_factory=dict)  # split → id → JPEG bytes
    labels: dict[str, int] = field(default_factory=dict)  # train id → landmark_id
    clean: set[str] = field(default_factory=set)


def _tar(members: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        folders = sorted({"/".join(n.split("/")[:k]) for n in members for k in range(1, n.count("/") + 1)})
        for d in folders:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buf.getvalue()


def add_shard(m: Mirror, split: str, shard: int, members: dict[str, bytes], extra=None) -> None:
    data = _tar(members, extra)
    name = f"images_{shard:03d}.tar"
    m.files[f"{split}/{name}"] = data
    m.files[f"md5sum/{split}/md5.images_{shard:03d}.txt"] = f"{hashlib.md5(data).hexdigest()}  {name}\n".encode()


def make_mirror(train_shards: int = 2, per_shard: int = 6, test_shards: int = 1, test_per_shard: int = 8,
                w: int = 80, h: int = 60, classes: int = 3) -> Mirror:
    """A tiny deterministic mirror; ids are 16 hex characters as in GLDv2."""
    m = Mirror(images={"train": {}, "test": {}})
    k = 0
    for split, shards, per in (("train", train_shards, per_shard), ("test", test_shards, test_per_shard)):
        for s in range(shards):
            members = {}
            for _ in range(per):
                i = hashlib.md5(f"{split}{k}".encode()).hexdigest()[:16]
                k += 1
                img = jpeg_bytes(i, w, h)
                m.images[split][i] = img
                members[f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg"] = img
            add_shard(m, split, s, members)
    train_ids = list(m.images["train"])
    m.labels = {i: n % classes for n, i in enumerate(train_ids)}
    m.clean = set(train_ids[::2])
    m.files["metadata/train.csv"] = ("id,url,landmark_id\n" + "".join(
        f"{i},http://example.invalid/{i}.jpg,{m.labels[i]}\n" for i in train_ids)).encode()
    by_class: dict[int, list[str]] = {}
    for i in train_ids:
        if i in m.clean:
            by_class.setdefault(m.labels[i], []).append(i)
    m.files["metadata/train_clean.csv"] = ("landmark_id,images\n" + "".join(
        f"{c},{' '.join(ids)}\n" for c, ids in sorted(by_class.items()))).encode()
    test_ids = list(m.images["test"])
    m.files["metadata/test.csv"] = ("id,url\n" + "".join(f"{i},http://example.invalid/{i}.jpg\n" for i in test_ids)).encode()
    usages = ("Public", "Private", "Ignored")
    rows = []
    for n, i in enumerate(test_ids):
        landmarks = "" if n % 4 == 3 else (f"{n % classes}" if n % 5 else f"{n % classes} {(n + 1) % classes}")
        rows.append(f"{i},{landmarks},{usages[n % 3] if n < 6 else usages[n % 2]}\n")
    m.files["ground_truth/recognition_solution_v2.1.csv"] = ("id,landmarks,Usage\n" + "".join(rows)).encode()
    return m


class MirrorServer(_Loopback):
    """Serve a `Mirror`'s files under `/`; `log` holds (method, path, Range header, bytes sent)."""

    def __init__(self, mirror: Mirror, lifetime: float = 120.0):
        self.mirror, self.lifetime = mirror, lifetime
        self.log: list[list] = []  # [method, path, Range header, body bytes sent (-1: the client hung up)]
        self.cut_once: set[str] = set()
        self.corrupt: dict[str, int] = {}  # path → how many more GETs get corrupted bytes
        self.ignore_range = False  # answer 200 with the whole file, as a server without Range support
        self.trickle = 0.0  # seconds between pieces of a quarter of the file each (a slow host)
        self.lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self, path: str) -> list[list]:
        return [e for e in self.log if e[0] == "GET" and e[1] == path]

    def start(self) -> "MirrorServer":
        server = self

        class H(BaseHTTPRequestHandler):
            timeout = 10
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def _answer(self, head_only: bool) -> None:
                path = self.path.split("?")[0].lstrip("/")
                rng = self.headers.get("Range")
                data = server.mirror.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    if not head_only:
                        self.wfile.write(b"not found")
                    with server.lock:
                        server.log.append((self.command, path, rng, 0))
                    return
                cut = corrupt = False
                with server.lock:
                    if server.ignore_range:
                        rng = None
                    if not head_only and path in server.cut_once and not rng:
                        server.cut_once.discard(path)
                        cut = True
                    if not head_only and server.corrupt.get(path, 0) > 0:
                        server.corrupt[path] -= 1
                        corrupt = True
                if corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                start = 0
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                entry = [self.command, path, rng, 0]  # logged before the body: a slow one is seen while it runs
                with server.lock:
                    server.log.append(entry)
                sent = 0
                if not head_only:
                    sent = len(body) // 2 if cut else len(body)
                    try:
                        step = -(-len(data) // 4) if server.trickle else sent  # quarters of the whole file
                        for at in range(0, sent, max(1, step)):
                            self.wfile.write(body[at: at + step])
                            self.wfile.flush()
                            if server.trickle:
                                server._stop.wait(server.trickle)
                    except OSError:  # the client cut us off
                        sent = -1
                entry[3] = sent
                if cut:
                    self.close_connection = True
                    self.connection.shutdown(2)

            def do_GET(self):
                self._answer(False)

            def do_HEAD(self):
                self._answer(True)

        self._serve(H)
        self._server.handle_error = lambda request, address: None  # a client that hangs up is not news
        self.port = self._server.server_address[1]
        return self
