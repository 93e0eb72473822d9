"""The loader reads every odd-but-usable kind of photo as RGB with EXIF orientation applied."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageReadError, load_rgb, open_rgb, read_header


def odd_images(d: Path) -> dict[str, Path]:
    """One small file per odd kind (shared with tests/acquire/test_clean.py)."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    # palette with a transparent index: transparent pixels become white, others keep their colour
    pal = Image.new("P", (32, 24), 1)
    pal.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    pal.paste(0, (0, 0, 16, 24))
    pal.save(d / "palette.png", transparency=0)
    out["palette+transparency"] = d / "palette.png"
    # CMYK JPEG: pure cyan
    Image.new("CMYK", (32, 24), (255, 0, 0, 0)).save(d / "cmyk.jpg", quality=95)
    out["CMYK"] = d / "cmyk.jpg"
    # 16-bit grayscale PNG: a ramp over the full 0..65535 range
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (24, 1))
    Image.fromarray(ramp).save(d / "sixteen.png")
    out["16-bit"] = d / "sixteen.png"
    # grayscale JPEG
    Image.new("L", (32, 24), 90).save(d / "gray.jpg", quality=95)
    out["grayscale"] = d / "gray.jpg"
    # EXIF orientation 6 (camera held upright: rotate 90° clockwise to view); red mark top-left
    arr = np.zeros((24, 32, 3), np.uint8)
    arr[:8, :8] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(d / "rotated.jpg", exif=exif, quality=95)
    out["EXIF-rotated"] = d / "rotated.jpg"
    return out


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return odd_images(tmp_path_factory.mktemp("odd"))


def test_palette_with_transparency(odd):
    a = load_rgb(odd["palette+transparency"])
    assert a.shape == (24, 32, 3) and a.dtype == np.uint8
    assert (a[:, :16] == 255).all()  # transparent → white background
    assert (a[:, 16:] == (200, 30, 40)).all()


def test_cmyk(odd):
    a = load_rgb(odd["CMYK"]).astype(int)
    assert a.shape == (24, 32, 3)
    r, g, b = a[12, 16]
    assert r < 40 and g > 215 and b > 215  # cyan


def test_sixteen_bit(odd):
    with Image.open(odd["16-bit"]) as im:
        assert im.mode.startswith("I")
    a = load_rgb(odd["16-bit"]).astype(int)
    assert a.shape == (24, 32, 3)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255  # full range kept, not clipped at 255/65535
    assert abs(a[0, 16, 0] - round(16 / 31 * 255)) <= 1


def test_grayscale(odd):
    a = load_rgb(odd["grayscale"]).astype(int)
    assert a.shape == (24, 32, 3)
    assert np.abs(a - 90).max() <= 2


def test_exif_rotation_applied(odd):
    a = load_rgb(odd["EXIF-rotated"]).astype(int)
    assert a.shape == (32, 24, 3)  # portrait after rotation
    # orientation 6: the stored top-left corner ends up top-right
    assert a[2, -3, 0] > 200 and a[2, -3, 1] < 60
    assert a[2, 2, 0] < 60


def test_max_side_keeps_aspect(odd):
    img = open_rgb(odd["EXIF-rotated"], max_side=16)
    assert img.mode == "RGB" and img.size == (12, 16)


def test_unreadable_file_names_path(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"<html>no</html>")
    with pytest.raises(ImageReadError, match="x.jpg"):
        load_rgb(p)


# -- issue 15 class 8: the size comes from the header; nothing over the pixel budget is decoded -------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def flat_png(w: int, h: int, rgb=(200, 30, 30)) -> bytes:
    """A single-colour RGB PNG, compressed row by row (never w×h×3 bytes in memory): ~0.5 MB for 13000²."""
    row = b"\0" + bytes(rgb) * w
    z = zlib.compressobj(9)
    data = b"".join([z.compress(row) for _ in range(h)] + [z.flush()])
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("huge") / "flat.png"
    p.write_bytes(flat_png(13000, 13000))
    return p


_PEAK = """
import resource, sys
from pipeline.acquire.clean import inspect_image
from pipeline.images import ImageReadError, open_rgb, read_header
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
read_header(sys.argv[1])
reason = inspect_image(sys.argv[1])[0]  # glr clean's check
try:
    open_rgb(sys.argv[1], max_side=int(sys.argv[2]) or None)
    print("decoded", end=" ")
except ImageReadError as e:
    print(e.reason if e.reason == reason else "clean disagrees", end=" ")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def _peak_mb(path: Path, max_side: int) -> tuple[str, int]:
    """(outcome, growth of peak memory in MB) of reading the header, glr clean's check and open_rgb, in a
    fresh process."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(max_side)], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    outcome, mb = out.stdout.rsplit(" ", 1)
    return outcome, int(mb)


def test_single_colour_13000_square_png_is_refused_from_its_header(huge_png):
    assert huge_png.stat().st_size < 1_000_000  # tiny on disk, 507 MB decoded
    for max_side in (None, 512):  # a PNG has no cheap reduced decode: a max side does not help
        t0 = time.monotonic()
        with pytest.raises(ImageReadError) as err:
            open_rgb(huge_png, max_side=max_side)
        assert time.monotonic() - t0 < 0.5
        assert err.value.reason == "decompression bomb"
        assert "13000x13000 = 169.0 Mpx" in str(err.value) and "flat.png" in str(err.value)
        assert "\n" not in str(err.value)
    outcome, mb = _peak_mb(huge_png, 0)
    assert outcome == "decompression bomb" and mb < 100, mb  # a decode would add > 500 MB


def test_header_reports_size_without_decoding(huge_png, odd):
    head = read_header(huge_png)
    assert (head.width, head.height, head.mode, head.format) == (13000, 13000, "RGB", "PNG")
    rot = read_header(odd["EXIF-rotated"])
    assert rot.orientation == 6 and rot.oriented_size == (24, 32)
    with pytest.raises(ImageReadError) as err:
        read_header(io.BytesIO(b"<html>gone</html>"))
    assert err.value.reason == "not an image" and "<bytes>" in str(err.value)


def test_budget_counts_the_pixels_decoded_large_jpeg_reads_cheaply_at_a_max_side(tmp_path, monkeypatch):
    """JPEG draft mode decodes at 1/2–1/8 scale: a photo over the budget is fine when a max side is asked."""
    import pipeline.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 1_000_000)  # a 1 Mpx budget keeps the test image small
    p = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1600), (10, 120, 200)).save(p, quality=80)  # 3.8 Mpx
    with pytest.raises(ImageReadError, match=r"2400x1600 = 3\.8 Mpx to decode, over the 1 Mpx budget"):
        open_rgb(p)
    assert open_rgb(p, max_side=600).size == (600, 400)  # decoded at 1/4 scale (600×400), within the budget
    png = tmp_path / "big.png"
    Image.new("RGB", (2400, 1600), (10, 120, 200)).save(png)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        open_rgb(png, max_side=600)  # no reduced decode for PNG: refused whatever the max side


@pytest.mark.parametrize("w, h", [(13000, 13000), (40000, 1001), (6325, 6325)])
def test_every_image_shape_over_the_budget_is_refused_and_one_within_it_is_read(tmp_path, w, h):
    from pipeline.images import MAX_PIXELS

    p = tmp_path / "x.png"
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # a header is all the check needs
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
                  + _chunk(b"IEND", b""))
    if w * h > MAX_PIXELS:
        with pytest.raises(ImageReadError, match="decompression bomb"):
            open_rgb(p)
    else:  # within the budget: decoded (and this file's data is short, so it is truncated, not refused)
        with pytest.raises(ImageReadError) as err:
            open_rgb(p)
        assert err.value.reason in ("truncated", "corrupt")
