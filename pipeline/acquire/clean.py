"""`glr clean`: move images that no stage can use into quarantine, with a report of why.

Unusable: zero bytes, not an image, decompression-bomb sized (more pixels than
`pipeline.images.MAX_PIXELS`, told from the header without decoding), truncated / corrupt data,
a mode the loader cannot turn into RGB, or a symbolic link that leads nowhere (dangling, or a
loop; moved as a link, whatever its name). Such files are moved (never deleted) to the
quarantine folder, keeping their relative path, and a row is added to `QUARANTINE/report.csv`
(path, reason, detail, moved_to) *before* the move, so an interrupted run never loses track of
a file. Odd but usable images (palette with transparency, CMYK, 16-bit, grayscale,
EXIF-rotated) stay where they are and are only counted.
"""
from __future__ import annotations

import csv
import errno
import os
import shutil
from collections import Counter
from pathlib import Path

from pipeline.images import image_files
from submissions.errors import UserError

REPORT_COLUMNS = ["path", "reason", "detail", "moved_to"]


def _oddity(head) -> str | None:
    if head.mode in ("P", "PA") and (head.transparency or head.mode == "PA"):
        return "palette+transparency"
    if head.mode == "CMYK":
        return "CMYK"
    if head.mode.startswith("I;16") or head.mode in ("I", "F"):
        return "16-bit"
    if head.mode in ("L", "LA", "1"):
        return "grayscale"
    if head.orientation not in (0, 1):
        return "EXIF-rotated"
    return None


def _broken_link(path: Path) -> tuple[str, str, None] | None:
    """('dangling symlink' | 'symlink loop', target, None) for a link that leads to no file, else None."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
        return None
    except OSError as e:
        target = os.readlink(path)
        return ("symlink loop" if e.errno == errno.ELOOP else "dangling symlink"), f"-> {target}"[:120], None


def inspect_image(path: str | os.PathLike) -> tuple[str | None, str, str | None]:
    """(reason it is unusable or None, detail, oddity or None) for one image file.

    Reads the header, then decodes at `CHECK_SIDE` through `pipeline.images.open_rgb` (what every stage
    does): an image over the pixel budget is refused from its header, never decoded.
    """
    from pipeline.images import CHECK_SIDE, ImageReadError, open_rgb, read_header

    path = Path(path)
    broken = _broken_link(path)
    if broken:
        return broken
    if path.stat().st_size == 0:
        return "zero bytes", "", None
    try:
        head = read_header(path)
        open_rgb(path, max_side=CHECK_SIDE)
    except ImageReadError as e:
        return e.reason, e.detail, None
    return None, "", _oddity(head)


def _free_name(dest: Path) -> Path:
    if not os.path.lexists(dest):  # a quarantined broken link counts as taken
        return dest
    for k in range(1, 10_000):
        cand = dest.with_name(f"{dest.stem}.{k}{dest.suffix}")
        if not os.path.lexists(cand):
            return cand
    raise UserError(f"{dest}: too many quarantined files with this name; empty the quarantine folder")


def clean(data_dir: str | os.PathLike, *, quarantine: str | os.PathLike | None = None, workers: int = 4) -> dict:
    """Check every image under `data_dir`; move unusable ones to `quarantine` and report why.

    `quarantine` defaults to `<data_dir>-quarantine` beside `data_dir` (outside it, so no stage
    ever sees the files). Hidden folders (`.glr-*` work folders) are not scanned. Returns
    counts: checked, quarantined, reasons, the odd-but-usable kinds, and the report path.
    """
    from pipeline.parallel import bounded_map
    from pipeline.progress import progress
    from submissions.files import check_writable

    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    qdir = Path(quarantine) if quarantine else root.parent / f"{root.resolve().name}-quarantine"
    if qdir.resolve() == root.resolve():
        raise UserError(f"--quarantine {qdir}: must not be the folder being cleaned")
    check_writable(root, folder=True, what="DATA_DIR")  # files are moved out of it
    check_writable(qdir, folder=True, what="--quarantine")
    report = qdir / "report.csv"
    files = list(image_files(root, skip=qdir, also=_broken_link))  # links that lead nowhere, whatever their name
    reasons: Counter = Counter()
    odd: Counter = Counter()
    moved = 0

    def check(p: Path):
        try:
            return p, inspect_image(p)
        except OSError as e:  # vanished or unreadable file
            return p, ("unreadable", str(e)[:120], None)

    fh = None
    try:
        for path, (reason, detail, oddity) in progress(bounded_map(check, files, workers), total=len(files),
                                                       desc="clean", unit="img"):
            if reason is None:
                if oddity:
                    odd[oddity] += 1
                continue
            if not os.path.lexists(path):  # vanished meanwhile (a broken link is still there: moved as such)
                continue
            rel = path.relative_to(root)
            dest = _free_name(qdir / rel)
            if fh is None:
                qdir.mkdir(parents=True, exist_ok=True)
                new = not report.exists() or report.stat().st_size == 0
                fh = open(report, "a", newline="", encoding="utf-8")
                writer = csv.writer(fh)
                if new:
                    writer.writerow(REPORT_COLUMNS)
            writer.writerow([rel.as_posix(), reason, detail, dest.relative_to(qdir).as_posix()])
            fh.flush()
            os.fsync(fh.fileno())
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(dest))
            reasons[reason] += 1
            moved += 1
    finally:
        if fh is not None:
            fh.close()
    return {
        "data_dir": str(root),
        "quarantine": str(qdir),
        "checked": len(files),
        "ok": len(files) - moved,
        "quarantined": moved,
        "reasons": dict(reasons),
        "odd": dict(odd),
        "report": str(report) if moved else None,
    }
