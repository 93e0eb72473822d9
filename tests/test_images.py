"""The loader reads every odd-but-usable kind of photo as RGB with EXIF orientation applied."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageReadError, load_rgb, open_rgb


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
