"""Safe, resumable extraction of Kaggle's zip bundles.

A downloaded archive is untrusted: every member is checked before anything is written (no
absolute paths, no `..`, no symlinks or device files — one bad member refuses the whole
archive). Members are written to a temporary folder beside the destination and renamed into
place, so a file at its final path is always complete; a re-run skips members already there
with the right size and finishes the rest.
"""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from submissions.errors import UserError


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why this member may not be extracted, or None when it is a plain file/folder inside."""
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is not a regular file"
    if not name or "\x00" in name:
        return "has an empty or invalid name"
    if "\\" in name:
        return "contains a backslash (Windows path)"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "would land outside the destination (contains '..')"
    return None


NAME_MAX = 255  # bytes per path component on Linux/macOS file systems
PATH_MAX = 4096


def _folders_of(name: str) -> list[str]:
    parts = PurePosixPath(name).parts
    return ["/".join(parts[:k]) for k in range(1, len(parts))]


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _place_problem(root: str, name: str, is_dir: bool, under: set[str], cache: dict[str, str | None]) -> str | None:
    """Why `name` cannot be written at its place in `root`: too long, or in the way of what is there."""
    parts = PurePosixPath(name).parts
    if any(len(os.fsencode(p)) > NAME_MAX for p in parts) or len(os.fsencode(os.path.join(root, name))) >= PATH_MAX:
        return f"has a name too long for the file system (over {NAME_MAX} bytes a part or {PATH_MAX} in all)"
    if not is_dir and name in under:
        return "is a file, but other members of the archive lie under it"
    parent = os.path.dirname(name)
    if parent not in cache:  # once per folder: a symlink or a file already in `dest` could be in the way
        where = os.path.join(root, parent)
        real = os.path.realpath(where)
        if os.path.commonpath([root, real]) != root:
            cache[parent] = "would land outside the destination (through a symlink in it)"
        else:
            have = _nearest_existing(where)
            cache[parent] = None if os.path.isdir(have) else f"would need a folder where the file {have} is"
    if cache[parent]:
        return cache[parent]
    target = os.path.join(root, name)
    if not is_dir and os.path.isdir(target):
        return f"would replace the folder {target}"
    if is_dir and os.path.lexists(target) and not os.path.isdir(target):
        return f"would replace the file {target}"
    return None


def check_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> list[zipfile.ZipInfo]:
    """The archive's file members, after checking every member is safe to extract into `dest`.

    Refused (UserError naming the first such member; nothing is written): names that leave `dest`
    or are not plain files/folders, names too long for the file system, a file that other members
    lie under, and a member whose place in `dest` holds a folder where a file goes or the reverse.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive}: not a valid zip archive ({e}); delete it and re-run to download again") from None
    root = os.path.realpath(dest)
    under = {f for info in infos for f in _folders_of(info.filename.rstrip("/"))}
    under |= {info.filename.rstrip("/") for info in infos if info.is_dir()}
    files = []
    cache: dict[str, str | None] = {}
    for info in infos:
        problem = _member_problem(info) or _place_problem(root, info.filename.rstrip("/"), info.is_dir(), under, cache)
        if problem:
            raise UserError(
                f"{archive}: member {info.filename[:120]!r} {problem}; refusing to extract this archive "
                f"(nothing was written to {dest})"
            )
        if not info.is_dir():
            files.append(info)
    return files


def safe_extract(
    archive: str | os.PathLike, dest: str | os.PathLike, *, tmp_dir: str | os.PathLike | None = None,
    desc: str = "extract", overwrite: bool = False,
) -> dict:
    """Extract `archive` into `dest` safely and resumably; return counts.

    Members whose final file already exists with the member's size are skipped (they were
    moved into place whole by an earlier run) unless `overwrite`. `tmp_dir` (default `dest/.glr-extract`) must be
    on the same file system as `dest`; it is emptied first and removed at the end.
    """
    from pipeline.progress import progress

    archive, dest = Path(archive), Path(dest)
    members = check_archive(archive, dest)
    tmp = Path(tmp_dir) if tmp_dir else dest / ".glr-extract"
    todo, skipped = [], 0
    for info in members:
        target = dest / info.filename
        if not overwrite and target.is_file() and target.stat().st_size == info.file_size:
            skipped += 1
        else:
            todo.append(info)
    need = sum(i.file_size for i in todo)
    free = shutil.disk_usage(dest if dest.exists() else dest.parent).free
    if need > free:
        raise UserError(
            f"{archive}: extracting needs {need / 1e9:.1f} GB but {dest} has {free / 1e9:.1f} GB free; "
            "free some space and re-run (finished files are kept)"
        )
    written = 0
    if tmp.exists():
        shutil.rmtree(tmp)  # leftovers of an interrupted run: never complete files
    try:
        tmp.mkdir(parents=True)
        with zipfile.ZipFile(archive) as zf:
            for k, info in enumerate(progress(todo, total=len(todo), desc=desc, unit="file")):
                target = dest / info.filename
                part = tmp / f"{k}.part"
                try:
                    with zf.open(info) as src, open(part, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                except zipfile.BadZipFile as e:  # CRC mismatch, truncated data
                    raise UserError(
                        f"{archive}: member {info.filename!r} is corrupt ({e}); delete the archive and re-run"
                    ) from None
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, target)
                written += info.file_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"members": len(members), "extracted": len(todo), "skipped": skipped, "bytes": written}
