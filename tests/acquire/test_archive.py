"""Issue 15 class 9: archives whose members cannot all be written are refused whole, in one line, before
anything is written, and leave no `.glr-extract` behind."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from pipeline.acquire.archive import safe_extract
from submissions.errors import UserError


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            if name.endswith("/"):
                zf.mkdir(name.rstrip("/"))
            else:
                zf.writestr(name, data)
    return path


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


LONG = "n" * 300
DEEP = "/".join(["d" * 250] * 17) + "/f.txt"  # each part fits, the whole path does not (> 4096 bytes)


@pytest.mark.parametrize("members, before, problem", [
    ([("a", b"x"), ("a/b", b"y")], {}, "'a' is a file, but other members of the archive lie under it"),
    ([("a/b", b"y"), ("a", b"x")], {}, "'a' is a file, but other members of the archive lie under it"),
    ([("a/", b""), ("a", b"x")], {}, "'a' is a file, but other members"),
    ([("ok.txt", b"1"), (LONG, b"x")], {}, "has a name too long for the file system"),
    ([("ok.txt", b"1"), (f"dir/{LONG}/x.csv", b"x")], {}, "has a name too long"),
    ([(DEEP, b"x")], {}, "has a name too long"),
    ([("ok.txt", b"1"), ("d", b"x")], {"d/inner/keep.txt": b"mine"}, "would replace the folder"),
    ([("ok.txt", b"1"), ("f/under.txt", b"x")], {"f": b"my file"}, "would need a folder where the file"),
    ([("g/", b"")], {"g": b"my file"}, "would replace the file"),
])
def test_unwritable_archive_layouts_are_refused_whole_before_writing(tmp_path, members, before, problem):
    z = _zip(tmp_path / "bundle.zip", members)
    out = tmp_path / "out"
    out.mkdir()
    for rel, data in before.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    was = _snapshot(out)
    with pytest.raises(UserError) as err:
        safe_extract(z, out)
    msg = str(err.value)
    assert problem in msg and "refusing to extract this archive (nothing was written" in msg, msg
    assert "\n" not in msg and len(msg) < 600
    assert _snapshot(out) == was  # nothing written, nothing replaced, no .glr-extract left


def test_a_corrupt_member_found_while_extracting_leaves_no_work_folder(tmp_path):
    z = _zip(tmp_path / "bundle.zip", [("a.txt", b"A" * 1000), ("b.txt", b"B" * 1000)])
    data = bytearray(z.read_bytes())
    at = data.index(b"B" * 1000)
    data[at + 10] ^= 0xFF  # CRC mismatch in the second member
    z.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"member 'b.txt' is corrupt"):
        safe_extract(z, out)
    assert not (out / ".glr-extract").exists() and not (out / "b.txt").exists()
    assert (out / "a.txt").read_bytes() == b"A" * 1000  # complete members stay: a re-run skips them


def test_writable_layouts_still_extract(tmp_path):
    z = _zip(tmp_path / "bundle.zip", [("x/", b""), ("x/a.txt", b"1"), ("x/y/b.txt", b"2"), ("n" * 255, b"3")])
    out = tmp_path / "out"
    (out / "x").mkdir(parents=True)  # an existing folder where the archive has one: fine
    assert safe_extract(z, out)["extracted"] == 3
    assert (out / "x/y/b.txt").read_bytes() == b"2" and (out / ("n" * 255)).read_bytes() == b"3"
    assert not (out / ".glr-extract").exists()
