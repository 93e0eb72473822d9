"""Reading images the way every stage needs them: RGB uint8, EXIF orientation applied.

Kaggle's landmark photos include palette images with transparency, CMYK JPEGs, 16-bit
PNGs, grayscale and EXIF-rotated phone photos; all are read here, never elsewhere.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from submissions.errors import UserError

# Pillow's own decompression-bomb limit (about 179 Mpx for the error) is kept; see `glr clean`.


class ImageReadError(UserError):
    """An image file that cannot be decoded; carries the path."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def open_rgb(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Open `path` as an RGB PIL image with EXIF orientation applied.

    `max_side` downsizes (keeping aspect) with JPEG draft mode first, which makes large
    JPEGs several times cheaper to decode. Raises ImageReadError naming the file.
    """
    try:
        with Image.open(path) as img:
            if max_side and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot read image ({e})") from None
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return img


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Read `path` as an H×W×3 uint8 RGB array (see `open_rgb`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return np.asarray(open_rgb(path, max_side))
