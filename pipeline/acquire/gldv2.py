"""`glr fetch-gldv2`: the Google Landmarks Dataset v2 from its authors' mirror, into a 2019 competition folder.

The mirror (default `DEFAULT_MIRROR`) holds `metadata/*.csv`, `ground_truth/recognition_solution_v2.1.csv`,
`<split>/images_NNN.tar` (train 500, index 100, test 20; ~1 GB each, members `a/b/c/<id>.jpg`) and
`md5sum/<split>/md5.images_NNN.txt` (`<md5>  images_NNN.tar`). Each shard is downloaded with HTTP
Range resume (a cut costs only the missing bytes), checked against its md5 (a mismatch is downloaded
again once, then listed in `DATA_DIR/<split>/failed.csv`), checked member by member
(`archive.check_tar`: the refusals of `glr fetch`) and extracted with every file renamed into place
whole; `--resize PX` re-encodes each image to a longer side of at most PX on the way. A finished
shard is recorded in `DATA_DIR/.glr-gldv2/<split>/images_NNN.done.json` (with the ids it gave), so a
re-run downloads nothing it has.

The folder is then a `landmark-recognition-2019` one: `train.csv` (id,landmark_id of the extracted
train images; `--clean-only` keeps those of `train_clean.csv`), `sample_submission.csv` (the
extracted test ids) and `solution.csv` (the published recognition solution, Usage kept), so
`glr gap` gives the real 2019 private and public GAP.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import threading
import time
from pathlib import Path

from submissions.errors import UserError

DEFAULT_MIRROR = "https://s3.amazonaws.com/google-landmark"
SHARDS = {"train": 500, "index": 100, "test": 20}
STATE_DIR = ".glr-gldv2"
SOLUTION_SRC = "ground_truth/recognition_solution_v2.1.csv"
METADATA = {  # what each split needs from the mirror to build the competition folder
    "train": ("metadata/train.csv",),
    "index": (),
    "test": ("metadata/test.csv", SOLUTION_SRC),
}
CLEAN_SRC = "metadata/train_clean.csv"
GLDV2_MAX_SIDE = 800  # the mirror's images are at most 800 px a side (pipeline.images.MAX_PIXELS note)
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


# -- options --------------------------------------------------------------------------------------

def parse_shards(text: str | None, split: str) -> list[int]:
    """`--shards`: `0-49`, `7`, `0-9,20,30-39` (inclusive), None for all of the split's shards."""
    n = SHARDS[split]
    if text is None or not text.strip():
        return list(range(n))
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--shards {text!r}: {part.strip()!r} is not a shard number or a range like 0-49")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise UserError(f"--shards {text!r}: range {lo}-{hi} runs backwards; write {hi}-{lo}")
        if hi >= n:
            raise UserError(f"--shards {text!r}: the {split} split has shards 0-{n - 1} ({n} tar files); {hi} is past the end")
        out.update(range(lo, hi + 1))
    return sorted(out)


def shard_name(shard: int) -> str:
    return f"images_{shard:03d}.tar"


# -- HTTP -----------------------------------------------------------------------------------------

def _session():
    import requests

    from pipeline.acquire.urls import _adapter_class

    s = requests.Session()
    for scheme in ("http://", "https://"):
        s.mount(scheme, _adapter_class()(pool_connections=2, pool_maxsize=2, max_retries=0))
    s.headers["User-Agent"] = "glr-fetch-gldv2"
    return s


def _download(url: str, part: Path, *, timeout: float, retries: int, stop: threading.Event, on_bytes=None,
              deadline_s: float = 600.0) -> None:
    """`urls.get_to_file` until `part` is whole: an attempt that brought bytes does not count against
    `retries` (each cut resumes where it stopped); back-off doubles between empty attempts."""
    with _session() as session:
        _retry(session, url, part, timeout=timeout, retries=retries, stop=stop, on_bytes=on_bytes, deadline_s=deadline_s)


def _retry(session, url: str, part: Path, *, timeout: float, retries: int, stop: threading.Event, on_bytes,
           deadline_s: float) -> None:
    from pipeline.acquire.urls import BACKOFF_S, MAX_BACKOFF_S, _Fail, get_to_file

    failures = 0
    while True:
        if stop.is_set():
            raise _Fail("interrupted", False)
        before = part.stat().st_size if part.exists() else 0
        try:
            get_to_file(session, url, part, timeout=timeout, stop=stop, deadline_s=deadline_s, on_bytes=on_bytes)
            return
        except _Fail as f:
            after = part.stat().st_size if part.exists() else 0
            if not f.retry:
                raise
            if after <= before:
                failures += 1
                if failures > retries:
                    raise
                stop.wait(min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (failures - 1)) * (0.5 + random.random()))


def _remote_size(url: str, timeout: float) -> int | None:
    """Content-Length of a HEAD answer (None when the mirror does not say)."""
    import requests

    try:
        with _session() as s:
            r = s.head(url, timeout=(timeout, timeout), allow_redirects=True)
    except requests.RequestException:
        return None
    if r.status_code != 200 or not r.headers.get("Content-Length"):
        return None
    return int(r.headers["Content-Length"])


def md5_of(path: Path) -> str:
    """The hex md5 the mirror publishes for each tar (read in 1 MiB blocks: a shard is ~1 GB)."""
    from submissions.files import hash_file_into

    h = hashlib.md5()
    hash_file_into(h, path)
    return h.hexdigest()


def _parse_md5(text: str, tar: str, url: str) -> str:
    for line in text.splitlines():
        tokens = line.split()
        if tokens and _MD5.match(tokens[0]) and (len(tokens) == 1 or tokens[-1].lstrip("*") == tar):
            return tokens[0].lower()
    raise UserError(f"{url}: no md5 for {tar} in it (expected '<32 hex digits>  {tar}')")


# -- state ----------------------------------------------------------------------------------------

def _state(root: Path, split: str) -> Path:
    return root / STATE_DIR / split


def _done_path(root: Path, split: str, shard: int) -> Path:
    return _state(root, split) / f"images_{shard:03d}.done.json"


def _done_record(root: Path, split: str, shard: int) -> dict | None:
    try:
        return json.loads(_done_path(root, split, shard).read_text())
    except (OSError, ValueError):
        return None


def extracted_ids(root: Path, split: str) -> list[str]:
    """Ids of the images every finished shard of `split` put in place (from their records)."""
    ids: list[str] = []
    folder = _state(root, split)
    for p in sorted(folder.glob("images_*.done.json")) if folder.is_dir() else []:
        try:
            ids.extend(json.loads(p.read_text())["ids"])
        except (OSError, ValueError, KeyError):
            continue
    return ids


# -- one shard ------------------------------------------------------------------------------------

def _resizer(px: int):
    """bytes → a JPEG whose longer side is at most `px` (pipeline.images reads it); None when unreadable."""
    from pipeline.acquire.urls import _encode, _Fail

    def transform(data: bytes) -> bytes | None:
        try:
            return _encode(data, px)
        except _Fail:
            return None

    return transform


def _fetch_shard(root: Path, mirror: str, split: str, shard: int, *, resize: int, keep: set[str] | None,
                 keep_tars: bool, timeout: float, retries: int, stop: threading.Event, on_bytes,
                 resize_threads: int = 1) -> dict:
    """Download, verify and extract one shard; the done record it wrote (raises _Fail/UserError on failure)."""
    from pipeline.acquire.archive import safe_extract_tar
    from pipeline.acquire.urls import _Fail
    from submissions.files import atomic_write_json

    tar = shard_name(shard)
    state = _state(root, split)
    state.mkdir(parents=True, exist_ok=True)
    md5_url = f"{mirror}/md5sum/{split}/md5.images_{shard:03d}.txt"
    md5_part = state / f"md5.images_{shard:03d}.txt.part"
    md5_part.unlink(missing_ok=True)
    try:
        _download(md5_url, md5_part, timeout=timeout, retries=retries, stop=stop)
    except _Fail as f:
        raise _Fail(f"{md5_url}: {f.reason}", False) from None
    want = _parse_md5(md5_part.read_text(errors="replace"), tar, md5_url)
    md5_part.unlink()

    part, final = state / f"{tar}.part", state / tar
    got = md5_of(final) if final.exists() else None  # a tar kept (--keep-tars) or verified before a cut
    for attempt in range(2):  # a mismatch is downloaded once more from scratch
        if got == want:
            break
        final.unlink(missing_ok=True)
        if attempt:
            part.unlink(missing_ok=True)
        try:
            _download(f"{mirror}/{split}/{tar}", part, timeout=timeout, retries=retries, stop=stop, on_bytes=on_bytes)
        except _Fail as f:
            raise _Fail(f"{mirror}/{split}/{tar}: {f.reason} (the bytes so far are kept: a re-run resumes)", False) from None
        got = md5_of(part)
        if got == want:
            os.replace(part, final)
    if got != want:
        part.unlink(missing_ok=True)
        raise _Fail(f"md5 mismatch after 2 downloads (got {got}, the mirror's md5 file says {want})", False)

    select = None
    if keep is not None:
        select = lambda name: Path(name).stem in keep  # noqa: E731
    stats = safe_extract_tar(final, root / split, tmp_dir=state / f"extract-{shard:03d}", select=select,
                             transform=_resizer(resize) if resize else None, transform_workers=resize_threads)
    record = {"shard": shard, "tar": tar, "md5": want, "resize": resize, "clean_only": keep is not None,
              "extracted": stats["extracted"], "already_there": stats["skipped"], "dropped": stats["dropped"],
              "unselected": stats["unselected"], "bytes": stats["bytes"],
              "ids": [Path(n).stem for n in stats["written"]]}
    atomic_write_json(_done_path(root, split, shard), record)
    if not keep_tars:
        final.unlink()
    return record


# -- metadata and the competition folder ----------------------------------------------------------

def _fetch_metadata(root: Path, mirror: str, names: tuple[str, ...], *, timeout: float, retries: int,
                    stop: threading.Event) -> None:
    """The mirror's CSVs into `.glr-gldv2/` (kept: a re-run reuses them), each renamed into place whole."""
    for name in names:
        final = root / STATE_DIR / name
        if final.exists():
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(final.name + ".part")
        _download(f"{mirror}/{name}", part, timeout=timeout, retries=retries, stop=stop)
        os.replace(part, final)


def clean_ids(path: Path) -> set[str]:
    """Ids listed in `train_clean.csv` (`landmark_id,images`: images space-separated)."""
    from pipeline.acquire.competition import read_csv_checked

    df = read_csv_checked(path, ("landmark_id", "images"), dtype={"images": str})
    return {i for cell in df["images"].dropna().tolist() for i in cell.split()}


def build_folder(root: Path, clean_only: bool = False) -> dict:
    """Write the 2019 competition files from the metadata and what was extracted (atomic writes).

    `train.csv` (id,landmark_id) holds the metadata's rows whose image is in place (so `glr run`
    finds every one); `sample_submission.csv` (id,landmarks empty) the extracted test ids in
    test.csv's order; `solution.csv` the published solution as is (read back with `read_solution`
    first, so a broken download is caught here, not at scoring).
    """
    from pipeline.acquire.competition import read_csv_checked
    from submissions.files import atomic_path
    from submissions.format import read_solution

    meta = root / STATE_DIR
    wrote: list[str] = []
    have_train = extracted_ids(root, "train")
    if (meta / METADATA["train"][0]).exists() and have_train:
        df = read_csv_checked(meta / METADATA["train"][0], ("id", "landmark_id"), dtype={"id": str, "url": str})
        df = df[df["id"].isin(set(have_train))][["id", "landmark_id"]]
        if clean_only:
            df = df[df["id"].isin(clean_ids(meta / CLEAN_SRC))]
        with atomic_path(root / "train.csv") as tmp:
            df.to_csv(tmp, index=False)
        wrote.append("train.csv")
    have_test = set(extracted_ids(root, "test"))
    if (meta / METADATA["test"][0]).exists() and have_test:
        test = read_csv_checked(meta / METADATA["test"][0], ("id",), dtype={"id": str, "url": str})
        ids = test["id"][test["id"].isin(have_test)]
        with atomic_path(root / "sample_submission.csv") as tmp:
            ids.to_frame().assign(landmarks="").to_csv(tmp, index=False)
        wrote.append("sample_submission.csv")
    if (meta / SOLUTION_SRC).exists():
        read_solution(meta / SOLUTION_SRC)
        with atomic_path(root / "solution.csv") as tmp:
            shutil.copyfile(meta / SOLUTION_SRC, tmp)
        wrote.append("solution.csv")
    return {"wrote": wrote, "train_images": len(have_train), "test_images": len(have_test)}


# -- sizes ----------------------------------------------------------------------------------------

def resized_fraction(px: int) -> float:
    """Estimated bytes kept per byte of a mirror JPEG at a longer side of `px` (bytes ∝ pixels, ×1.5 for
    the worse compression of small images, +1% for headers; capped at 1). benchmarks/fetch_gldv2.py
    measures it: 0.125 at 256 px and 0.027 at 96 px against 0.164 and 0.032 estimated."""
    if px <= 0 or px >= GLDV2_MAX_SIDE:
        return 1.0
    return min(1.0, 1.5 * (px / GLDV2_MAX_SIDE) ** 2 + 0.01)


def _plan(root: Path, mirror: str, split: str, todo: list[int], *, resize: int, keep_tars: bool, workers: int,
          timeout: float) -> dict:
    """Download size (HEAD of each tar to fetch) and disk needed with and without `resize`; refuses
    (UserError) when the disk holding `root` cannot take it."""
    from pipeline.caches import free_bytes, human_bytes
    from pipeline.parallel import bounded_map

    sizes = list(bounded_map(lambda s: _remote_size(f"{mirror}/{split}/{shard_name(s)}", timeout), todo,
                             max(1, min(16, workers * 4))))
    known = [s for s in sizes if s]
    per = (sum(known) / len(known)) if known else 1e9  # the mirror's shards are ~1 GB
    download = int(per * len(todo))
    in_flight = int(min(workers, len(todo)) * per)  # tars waiting for their extraction
    extracted_full = download
    extracted_resized = int(download * resized_fraction(resize)) if resize else None
    held_tars = download if keep_tars else in_flight
    need = (extracted_resized if resize else extracted_full) + held_tars
    free = free_bytes(root)
    line = (f"fetch-gldv2 {split}: {len(todo)} shard(s) to fetch, {human_bytes(download)} to download; disk needed "
            f"{human_bytes(extracted_full + held_tars)} as published")
    if resize:
        line += f", about {human_bytes(need)} with --resize {resize}"
    else:  # what the study's sizes would take instead
        line += f" (about {human_bytes(int(download * resized_fraction(256)) + held_tars)} with --resize 256)"
    print(line + f" ({human_bytes(free)} free)", file=sys.stderr, flush=True)
    if need > free:
        raise UserError(f"{root}: fetching {len(todo)} {split} shard(s) needs about {human_bytes(need)} but the disk has "
                        f"{human_bytes(free)} free; free space, fetch fewer with --shards, or shrink with --resize")
    return {"download_bytes": download, "disk_needed": extracted_full + held_tars,
            "disk_needed_resized": (extracted_resized + held_tars) if resize else None, "free_bytes": free}


# -- the command ----------------------------------------------------------------------------------

def _earlier_failures(failed_csv: Path, chosen: set[str], root: Path, split: str) -> list[tuple[str, str]]:
    """Rows of an earlier failed.csv for shards this run did not try and that are still not done."""
    import csv

    try:
        with open(failed_csv, newline="", encoding="utf-8") as f:
            rows = [(r["shard"], r["reason"]) for r in csv.DictReader(f) if r.get("shard") and r.get("reason")]
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return []
    keep = []
    for tar, reason in rows:
        m = re.fullmatch(r"images_(\d{3})\.tar", tar)
        if m and tar not in chosen and _done_record(root, split, int(m.group(1))) is None:
            keep.append((tar, reason))
    return keep


def fetch_gldv2(
    data_dir: str | os.PathLike, *, split: str = "train", shards: str | None = None, workers: int = 4,
    resize: int = 0, clean_only: bool = False, keep_tars: bool = False, mirror: str = DEFAULT_MIRROR,
    timeout: float = 30.0, retries: int = 5,
) -> dict:
    """Fetch `split`'s chosen shards (and the metadata) into `data_dir`; build the 2019 folder; return a summary.

    Shards already recorded as done are skipped; a failing shard does not stop the others: it is
    listed in `data_dir/<split>/failed.csv` (shard,reason) and counted in `failed`; the file keeps
    earlier failures of shards this run did not try (`failed_earlier`) until they are done.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from pipeline.acquire.urls import _Fail, _stop_on_signals
    from pipeline.parallel import available_cores, bounded_map
    from pipeline.progress import enabled, progress
    from submissions.files import atomic_path, check_writable

    if split not in SHARDS:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SHARDS)}")
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if resize < 0:
        raise UserError(f"--resize {resize}: give a longer side in pixels (0 = as published)")
    if clean_only and split != "train":
        raise UserError(f"--clean-only applies to the train split (train_clean.csv), not {split}")
    mirror = mirror.rstrip("/")
    root = Path(data_dir)
    check_writable(root, folder=True, what="DATA_DIR")
    chosen = parse_shards(shards, split)
    todo = [s for s in chosen if _done_record(root, split, s) is None]
    stop = threading.Event()
    resize_threads = max(1, available_cores() // workers)  # every core re-encodes, whatever --workers is
    t0 = time.monotonic()
    with _stop_on_signals(stop):
        names = METADATA[split] + ((CLEAN_SRC,) if clean_only else ())
        try:
            _fetch_metadata(root, mirror, names, timeout=timeout, retries=retries, stop=stop)
        except _Fail as f:
            raise UserError(f"{mirror}: cannot download the metadata ({f.reason}); check --mirror and re-run") from None
        keep = clean_ids(root / STATE_DIR / CLEAN_SRC) if clean_only else None
        plan = _plan(root, mirror, split, todo, resize=resize, keep_tars=keep_tars, workers=workers, timeout=timeout) \
            if todo else {"download_bytes": 0}
        bar = tqdm(total=plan["download_bytes"], unit="B", unit_scale=True, desc="download", position=1,
                   disable=not enabled(), dynamic_ncols=True)
        lock = threading.Lock()
        downloaded = [0]

        def on_bytes(n: int) -> None:
            with lock:
                downloaded[0] += n
                bar.update(n)

        def job(shard: int):
            try:
                return shard, _fetch_shard(root, mirror, split, shard, resize=resize, keep=keep, keep_tars=keep_tars,
                                           timeout=timeout, retries=retries, stop=stop, on_bytes=on_bytes,
                                           resize_threads=resize_threads), None
            except _Fail as f:
                return shard, None, f.reason
            except UserError as e:
                return shard, None, str(e)

        done, failures, extracted = [], [], 0
        try:
            for shard, record, reason in progress(bounded_map(job, todo, workers), total=len(todo),
                                                  desc=f"{split} shards", unit="shard"):
                if reason is None:
                    done.append(shard)
                    extracted += record["extracted"]
                else:
                    failures.append((shard_name(shard), reason))
        finally:
            bar.close()
    seconds = time.monotonic() - t0
    failed_csv = root / split / "failed.csv"
    listed = failures + _earlier_failures(failed_csv, {shard_name(s) for s in chosen}, root, split)
    if listed:
        with atomic_path(failed_csv) as tmp:
            pd.DataFrame(sorted(listed), columns=["shard", "reason"]).to_csv(tmp, index=False)
    elif failed_csv.exists():
        failed_csv.unlink()
    folder = build_folder(root, clean_only=clean_only)
    return {
        "data_dir": str(root), "split": split, "mirror": mirror, "shards": len(chosen),
        "fetched": len(done), "skipped": len(chosen) - len(todo), "failed": len(failures),
        "failed_csv": str(failed_csv) if listed else None,
        "failed_earlier": len(listed) - len(failures), "images_extracted": extracted,
        "downloaded_bytes": downloaded[0], "seconds": round(seconds, 3),
        "mb_per_s": downloaded[0] / 1e6 / seconds if seconds > 0 else 0.0,
        "resize": resize, "clean_only": clean_only, **{k: v for k, v in plan.items() if k != "free_bytes"},
        "folder": folder,
    }


__all__ = ["DEFAULT_MIRROR", "SHARDS", "build_folder", "fetch_gldv2", "parse_shards", "resized_fraction"]
