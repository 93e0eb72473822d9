"""`glr clean`: unusable images go to quarantine with a reason; odd but usable ones stay."""
from __future__ import annotations

import csv
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from PIL import Image

from pipeline.acquire.clean import clean, inspect_image
from pipeline.images import load_rgb
from tests.test_images import flat_png, odd_images

ROOT = Path(__file__).resolve().parents[1]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(w: int = 20000, h: int = 10000) -> bytes:
    """A few hundred bytes declaring 200 Mpx: more than the loader will ever decode."""
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + _png_chunk(b"IEND", b"")


def premultiplied_gray_tiff() -> bytes:
    """A TIFF Pillow opens as mode 'La' (gray + associated alpha), which it cannot convert to RGB."""
    buf = io.BytesIO()
    Image.new("LA", (8, 8), (100, 200)).save(buf, "TIFF", compression=None)
    data = bytearray(buf.getvalue())
    off = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[off:off + 2])[0]):
        e = off + 2 + 12 * k
        if struct.unpack("<H", data[e:e + 2])[0] == 338:  # ExtraSamples: 2 (unassociated) → 1 (associated)
            data[e + 8:e + 10] = struct.pack("<H", 1)
    return bytes(data)


def _tree(root: Path) -> dict[str, str]:
    """Write a folder of good, odd and broken images; return relpath → expected reason ('' = keep)."""
    good = io.BytesIO()
    Image.new("RGB", (48, 40), (10, 120, 200)).save(good, "JPEG", quality=90)
    jpg = good.getvalue()
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(noisy, "JPEG", quality=95)
    noisy = noisy.getvalue()
    files = {
        "a/b/c/good.jpg": (jpg, ""),
        "a/b/d/empty.jpg": (b"", "zero bytes"),
        "a/e/f/cut.jpg": (noisy[: len(noisy) * 2 // 3], "truncated"),  # header intact, data cut
        "a/e/g/cuthead.jpg": (jpg[:300], "truncated"),  # cut inside the header
        "b/page.jpg": (b"<!DOCTYPE html><html><body>gone</body></html>", "not an image"),
        "b/bomb.png": (bomb_png(), "decompression bomb"),
        "c/premult.tif": (premultiplied_gray_tiff(), "unsupported mode"),
        "notes.txt": (b"not scanned", ""),
    }
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    expected = {rel: reason for rel, (_, reason) in files.items()}
    for p in odd_images(root / "odd").values():
        expected[p.relative_to(root).as_posix()] = ""
    return expected


def test_inspect_image_reasons(tmp_path):
    expected = _tree(tmp_path / "d")
    for rel, reason in expected.items():
        if rel.endswith(".txt"):
            continue
        got, detail, _ = inspect_image(tmp_path / "d" / rel)
        assert (got or "") == reason, (rel, got, detail)


def test_clean_quarantines_and_reports(tmp_path):
    root = tmp_path / "train"
    expected = _tree(root)
    res = clean(root, workers=2)
    q = tmp_path / "train-quarantine"
    bad = {rel: r for rel, r in expected.items() if r}
    assert res["quarantine"] == str(q) and res["quarantined"] == len(bad) == 6
    assert res["checked"] == len(expected) - 1  # notes.txt is not an image file
    assert res["reasons"] == {"zero bytes": 1, "truncated": 2, "not an image": 1, "decompression bomb": 1,
                              "unsupported mode": 1}
    assert res["odd"] == {"palette+transparency": 1, "CMYK": 1, "16-bit": 1, "grayscale": 1, "EXIF-rotated": 1}
    for rel, reason in expected.items():
        if reason:
            assert not (root / rel).exists() and (q / rel).exists()  # moved, never deleted
        else:
            assert (root / rel).exists()
            if not rel.endswith(".txt"):
                assert load_rgb(root / rel).shape[2] == 3
    rows = list(csv.DictReader(open(q / "report.csv")))
    assert {r["path"]: r["reason"] for r in rows} == bad
    assert all(r["moved_to"] == r["path"] for r in rows)

    # a second run finds nothing new and leaves the report alone
    again = clean(root, workers=2)
    assert again["quarantined"] == 0 and len(list(csv.DictReader(open(q / "report.csv")))) == 6

    # a new broken file with a name already in quarantine gets a fresh name and a new row
    (root / "a/b/d/empty.jpg").write_bytes(b"")
    third = clean(root, quarantine=q)
    assert third["quarantined"] == 1 and (q / "a/b/d/empty.1.jpg").exists()
    assert list(csv.DictReader(open(q / "report.csv")))[-1]["moved_to"] == "a/b/d/empty.1.jpg"


def test_clean_cli_json(tmp_path):
    root = tmp_path / "imgs"
    _tree(root)
    proc = subprocess.run([str(Path(sys.executable).with_name("glr")), "clean", str(root), "--quarantine",
                           str(tmp_path / "q"), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert out["quarantined"] == 6 and out["report"] == str(tmp_path / "q" / "report.csv")


def test_clean_quarantines_an_image_over_the_pixel_budget_from_its_header(tmp_path):
    """Issue 15 class 8: a 0.2 MB single-colour 7000×7000 PNG is refused before decoding (~150 MB otherwise)."""
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "flat.png").write_bytes(flat_png(7000, 7000))
    (root / "fine.png").write_bytes(flat_png(600, 400))
    reason, detail, _ = inspect_image(root / "flat.png")
    assert reason == "decompression bomb" and "7000x7000 = 49.0 Mpx" in detail and "MAX_PIXELS" in detail
    res = clean(root, workers=2)
    assert res["reasons"] == {"decompression bomb": 1} and (tmp_path / "imgs-quarantine" / "flat.png").exists()
    assert (root / "fine.png").exists()
