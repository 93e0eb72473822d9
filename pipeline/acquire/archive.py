"""Safe, resumable extraction of Kaggle's zip bundles and of the GLDv2 mirror's tar shards.

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
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from submissions.errors import UserError


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why this member may not be extracted, or None when it is a plain file/folder inside."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is not a regular file"
    return _name_problem(info.filename)


def _tar_member_problem(info: tarfile.TarInfo) -> str | None:
    """`_member_problem` for a tar member: the same refusals (links, devices, fifos, names that leave)."""
    if info.issym():
        return "is a symbolic link"
    if info.islnk():
        return "is a hard link"
    if not (info.isreg() or info.isdir()):
        return "is not a regular file"
    return _name_problem(info.name)


def _name_problem(name: str) -> str | None:
    """Why a member's name may not be written under the destination, or None."""
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


# --------------------------------------------------------------------------------------------
# tar (the GLDv2 mirror's shards): the same refusals, member by member
# --------------------------------------------------------------------------------------------
def check_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> list[tarfile.TarInfo]:
    """The tar's file members, after checking every member is safe to extract into `dest`.

    The refusals of `check_archive` (a link of either kind, a device or fifo, `..`, an absolute path,
    a name too long, a file where a folder goes): one UserError naming the first such member.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:") as tf:
            infos = tf.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{archive}: not a valid tar archive ({e}); delete it and re-run to download again") from None
    root = os.path.realpath(dest)
    names = [PurePosixPath(i.name).as_posix() if i.name else "" for i in infos]
    under = {f for n in names for f in _folders_of(n)} | {n for n, i in zip(names, infos) if i.isdir()}
    files = []
    cache: dict[str, str | None] = {}
    for info, name in zip(infos, names):
        problem = _tar_member_problem(info) or _place_problem(root, name, info.isdir(), under, cache)
        if problem:
            raise UserError(
                f"{archive}: member {info.name[:120]!r} {problem}; refusing to extract this archive "
                f"(nothing was written to {dest})"
            )
        if info.isreg():
            files.append(info)
    return files


def safe_extract_tar(
    archive: str | os.PathLike, dest: str | os.PathLike, *, tmp_dir: str | os.PathLike,
    select=None, transform=None, transform_workers: int = 1,
) -> dict:
    """Extract a tar's files into `dest` after `check_tar`, each renamed into place whole; return counts.

    `select(name) -> bool` keeps only some members; `transform(bytes) -> bytes | None` rewrites each
    (None drops it, counted in `dropped`), in `transform_workers` threads (the tar is read in this
    one; Pillow decodes and encodes without the GIL). A member already at its place is skipped (with
    its size when there is no transform: an earlier run put it there whole). `tmp_dir` is on `dest`'s
    file system. `written` lists the member names now in place (extracted or already there).
    """
    from pipeline.parallel import bounded_map

    archive, dest, tmp = Path(archive), Path(dest), Path(tmp_dir)
    members = check_tar(archive, dest)
    stats = {"members": len(members), "extracted": 0, "skipped": 0, "dropped": 0, "unselected": 0, "bytes": 0,
             "written": []}

    def todo(tf):  # (k, name, bytes) of each member to write, read in order
        for k, info in enumerate(members):
            name = PurePosixPath(info.name).as_posix()
            if select is not None and not select(name):
                stats["unselected"] += 1
                continue
            target = dest / name
            if target.is_file() and (transform is not None or target.stat().st_size == info.size):
                stats["skipped"] += 1
                stats["written"].append(name)
                continue
            try:
                yield k, name, tf.extractfile(info).read()
            except (tarfile.TarError, EOFError, OSError) as e:
                raise UserError(f"{archive}: member {info.name!r} is corrupt ({e}); delete the archive and re-run") from None

    def rewrite(item):
        k, name, data = item
        return k, name, transform(data)

    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:") as tf:
            items = bounded_map(rewrite, todo(tf), transform_workers) if transform is not None else todo(tf)
            for k, name, data in items:
                if data is None:
                    stats["dropped"] += 1
                    continue
                target = dest / name
                part = tmp / f"{os.getpid()}-{k}.part"
                with open(part, "wb") as out:
                    out.write(data)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, target)
                stats["extracted"] += 1
                stats["bytes"] += len(data)
                stats["written"].append(name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats
