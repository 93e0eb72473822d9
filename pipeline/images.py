"""Reading images the way every stage needs them: RGB uint8, EXIF orientation applied, within a pixel budget.

Kaggle's landmark photos include palette images with transparency, CMYK JPEGs, 16-bit
PNGs, grayscale and EXIF-rotated phone photos; all are read here, never elsewhere.

A file's size on disk says nothing about its cost: a 164 KB single-colour 13000×13000 PNG
decodes to 507 MB. Every reader therefore learns the size from the header first (Pillow opens
lazily) and refuses, before decoding, an image that would take more than `MAX_PIXELS` pixels.
JPEGs asked for at a `max_side` decode at 1/2–1/8 scale (draft mode), so the budget counts the
pixels actually decoded: a 100 Mpx phone photo read at 1024 px costs 1.7 Mpx.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from submissions.errors import UserError

MAX_PIXELS = 40_000_000
"""Most pixels glr decodes from one image (120 MB as RGB). Landmark photos fit with room to spare:
GLDv2's are at most 800 px a side, Google's photo servers give 1600 px, phone cameras 12–50 Mpx JPEGs
(decoded at reduced scale whenever a reader gives a max side, as every stage does). What exceeds it is
refused (`glr clean` quarantines it as a decompression bomb, `glr fetch-urls` lists it as failed)."""

CHECK_SIDE = 1024
"""The side `glr clean` and `glr fetch-urls` decode at to prove an image whole: a JPEG's data is all read
at any draft scale, so truncation still shows, at a fraction of the memory."""

Source = str | os.PathLike | IO[bytes]

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


def image_files(root: str | os.PathLike, *, skip: str | os.PathLike | None = None,
                also: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """Image files under `root` by extension (IMAGE_EXTS), in sorted order, hidden files and folders (glr's
    `.glr-*` work folders) and the folder `skip` left out; `also(path)` true keeps another file too."""
    skip = Path(skip).resolve() if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (skip is None or (d / n).resolve() != skip))
        for name in sorted(filenames):
            if not name.startswith(".") and (Path(name).suffix.lower() in IMAGE_EXTS or (also and also(d / name))):
                yield d / name


class ImageReadError(UserError):
    """An image file that cannot (or may not) be decoded; names the file, says why in `reason`.

    `reason` is one of: not an image, truncated, corrupt, decompression bomb, unsupported mode.
    """

    def __init__(self, message: str, reason: str = "unreadable", detail: str = ""):
        super().__init__(message)
        self.reason, self.detail = reason, detail or message


def _error(path: Source, reason: str, detail: str) -> ImageReadError:
    name = "<bytes>" if hasattr(path, "read") else str(path)
    return ImageReadError(f"{name}: cannot read image ({reason}: {detail})", reason, detail)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded."""

    width: int
    height: int
    mode: str
    format: str | None
    orientation: int  # EXIF orientation (1 = as stored; 5–8 swap width and height)
    transparency: bool

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) as displayed, EXIF rotation applied."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def _classify(path: Source, e: Exception) -> ImageReadError:
    msg = str(e)
    if isinstance(e, Image.DecompressionBombError):
        return _error(path, "decompression bomb", msg[:120])
    if isinstance(e, UnidentifiedImageError):
        return _error(path, "not an image", msg[:120])
    return _error(path, "truncated" if "truncated" in msg.lower() else "corrupt", msg[:120])


def _check_budget(path: Source, img: Image.Image) -> None:
    """Refuse what `load()` would decode beyond the budget (`img.size` already reflects a JPEG draft)."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise _error(path, "not an image", f"{w}x{h} pixels")
    if w * h > MAX_PIXELS:
        raise _error(path, "decompression bomb", f"{w}x{h} = {w * h / 1e6:.1f} Mpx to decode, over the "
                             f"{MAX_PIXELS / 1e6:g} Mpx budget (pipeline.images.MAX_PIXELS)")


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, from what the header gave (`getexif()` on a PNG decodes every pixel to look
    for an eXIf chunk after them: a 13000×13000 one would cost 0.5 GB just to learn its orientation)."""
    try:
        if "exif" in img.info:  # JPEG, WebP, and PNGs whose eXIf chunk precedes the pixels
            exif = Image.Exif()
            exif.load(img.info["exif"])
        elif img.format == "TIFF":  # tags come with the header
            exif = img.getexif()
        else:
            return 1
        return int(exif.get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: the image is read as stored
        return 1


def read_header(path: Source) -> ImageHeader:
    """The header of `path` (size, mode, format, EXIF orientation), decoding no pixel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                return ImageHeader(img.width, img.height, img.mode, img.format, _orientation(img),
                                   "transparency" in img.info)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise _classify(path, e) from None


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
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def open_rgb(path: Source, max_side: int | None = None) -> Image.Image:
    """Open `path` (a file or a binary stream) as an RGB PIL image with EXIF orientation applied.

    `max_side` downsizes (keeping aspect) with JPEG draft mode first, which makes large JPEGs
    several times cheaper to decode. An image over `MAX_PIXELS` (after the draft) is refused
    before decoding. Raises ImageReadError naming the file and the reason.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                if max_side and img.format == "JPEG":
                    img.draft("RGB", (max_side, max_side))
                _check_budget(path, img)
                img.load()
                try:
                    img = _to_rgb(ImageOps.exif_transpose(img))
                except (OSError, ValueError) as e:  # decoded, but no way to RGB (e.g. TIFF 'La')
                    raise _error(path, "unsupported mode", f"{img.mode}: {str(e)[:100]}") from None
        except ImageReadError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise _classify(path, e) from None
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return img


def load_rgb(path: Source, max_side: int | None = None) -> np.ndarray:
    """Read `path` as an H×W×3 uint8 RGB array (see `open_rgb`)."""
    return np.asarray(open_rgb(path, max_side))
