"""On-disk cache of local features: each image FILE is extracted once per extractor configuration.

Layout, under `kind_dir(cache_root(data_dir, cache_dir), "features")` (pipeline.caches):

    <extractor key>/config.json         the extractor settings the key stands for
    <extractor key>/<k[:2]>/<k>.feat    one entry per image file

`k` is the file's identity (`pipeline.caches.file_keys`: name, inode, size, mtime), not its id or
split: a hard link or symlink to the same file (the local-validation folder's images) finds the
same entry, and an image changed on disk is a new entry, never stale features.

An entry holds only what matching uses (`pipeline.verify.matching`): keypoint locations, as
uint16 fixed point over the keypoints' extent (≤ 0.03 px error on a 4,000-px photo), and
quantised descriptors: non-negative ones (128-D RootSIFT, components in [0, 0.5)) as uint8 at a
fixed scale of 512, signed unit ones (the default projected 64-D RootSIFT, DELF's 40-D; components
in [-1, 1]) as int8 at 127, ORB's binary bytes as they are — the codec follows the descriptors and
is written in each entry's header. The arrays are deflated and float descriptors are renormalised
to unit length when read. About 100 KB per 1,000 128-D RootSIFT keypoints, 53 KB per 1,000
projected 64-D ones (float16 npz with scales and scores: 260 KB). Scales and scores are not kept
(NaN when read back).

Each entry is written to a temporary file beside it and renamed into place, so concurrent
writers (workers, shards on a shared disk) and interrupted runs never leave a half-written
entry; a damaged entry is deleted when read and recomputed by the next run. Memory is bounded
by a small in-process LRU (bytes). Extraction builds the extractor once per process before the
first image, so a module that does not load stops the run before anything is written, and
catches per image only the errors of reading an image (`ImageReadError`).
"""
from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.options import VERIFY
from pipeline.verify.features import Extractor, ExtractorConfig, Features, make_config, make_extractor
from submissions.files import atomic_path, atomic_write_text

FORMAT = 2
_MAGIC = b"GLRF"
_HEAD = struct.Struct("<4sBBHIffff")  # magic, format, codec, dim, n, work_scale, x0, y0, location step
_RAW, _U8, _I8 = 0, 1, 2  # descriptor codecs: bytes as they are; non-negative ×512 → uint8; signed ×127 → int8
_SCALE = {_U8: 512.0, _I8: 127.0}
_CODEC = {"sift": _U8, "delf": _I8, "orb": _RAW}  # each extractor's codec before projected SIFT (tests use it)


class DamagedEntry(ValueError):
    """An entry that cannot be decoded (a disk error, or not written by this version)."""


def codec_of(descriptors: np.ndarray) -> int:
    """The codec for these descriptors: bytes as they are; 128-D non-negative floats (RootSIFT, SIFT) as uint8;
    any other floats (projected RootSIFT, DELF: signed unit vectors) as int8."""
    if descriptors.dtype == np.uint8:
        return _RAW
    signed = descriptors.ndim != 2 or descriptors.shape[1] != 128 or (descriptors.size and descriptors.min() < 0)
    return _I8 if signed else _U8


def encode(feats: Features, codec: int | None = None) -> bytes:
    """One entry's bytes (see the module docstring); `codec` None: the one the descriptors need."""
    codec = codec_of(np.asarray(feats.descriptors)) if codec is None else codec
    n = feats.n
    loc = np.asarray(feats.locations, np.float64).reshape(n, 2)
    lo = loc.min(axis=0) if n else np.zeros(2)
    step = max(float((loc - lo).max()) if n else 0.0, 1e-3) / 65535
    qloc = np.rint((loc - lo) / step).clip(0, 65535).astype("<u2")
    desc = np.asarray(feats.descriptors)
    if codec == _RAW:
        qdesc = np.ascontiguousarray(desc, np.uint8)
    elif codec == _U8:
        qdesc = np.rint(desc * _SCALE[_U8]).clip(0, 255).astype(np.uint8)
    else:
        qdesc = np.rint(desc * _SCALE[_I8]).clip(-127, 127).astype(np.int8)
    dim = desc.shape[1] if desc.ndim == 2 else 0
    head = _HEAD.pack(_MAGIC, FORMAT, codec, dim, n, feats.work_scale, lo[0], lo[1], step)
    return head + zlib.compress(qloc.tobytes() + qdesc.tobytes(), 6)


def decode(blob: bytes) -> Features:
    """Features from an entry's bytes (DamagedEntry if they are not a whole entry)."""
    try:
        magic, fmt, codec, dim, n, work_scale, x0, y0, step = _HEAD.unpack_from(blob)
        body = zlib.decompress(blob[_HEAD.size:])
    except (struct.error, zlib.error) as e:
        raise DamagedEntry(str(e)) from None
    if magic != _MAGIC or fmt != FORMAT or codec not in (_RAW, _U8, _I8) or len(body) != n * (4 + dim):
        raise DamagedEntry("not a feature entry of this format")
    qloc = np.frombuffer(body, "<u2", 2 * n).reshape(n, 2)
    loc = (qloc * np.float64(step) + np.array([x0, y0])).astype(np.float32)
    if codec == _RAW:
        desc = np.frombuffer(body, np.uint8, n * dim, 4 * n).reshape(n, dim).copy()
    else:
        q = np.frombuffer(body, np.uint8 if codec == _U8 else np.int8, n * dim, 4 * n).reshape(n, dim)
        desc = q.astype(np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", desc, desc))
        desc /= np.where(norms > 0, norms, 1)[:, None]  # unit length, as extracted (matching relies on it)
    nan = np.full(n, np.nan, np.float32)
    return Features(loc, desc, nan, nan.copy(), float(work_scale))


def stored_form(feats: Features, extractor: str | None = None) -> Features:
    """What the cache returns for `feats` (quantised and read back): benchmarks use it. `extractor` is
    ignored (the codec follows the descriptors); kept for callers that name it."""
    return decode(encode(feats))


def entry_bytes_at_most(config: ExtractorConfig) -> int:
    """Bound on one entry's size (before deflate), for the size shown before extracting."""
    n = config.max_feature_num if config.name == "delf" else config.n_features
    return _HEAD.size + int(n) * (4 + config.descriptor_dim)


def image_keys(paths: Iterable[str | os.PathLike]) -> list[str | None]:
    """Each image file's cache key (hex of `pipeline.caches.file_keys`); None for a file that does not exist."""
    from pipeline.caches import file_keys

    return [k.hex() if k else None for k in file_keys([Path(p) for p in paths])]


def features_dir(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local-feature cache folder: `<cache root>/features` (pipeline.caches)."""
    from pipeline.caches import cache_root, kind_dir

    return kind_dir(cache_root(data_dir, cache_dir), "features")


class FeatureCache:
    """Features by image-file key for one extractor configuration (disk + LRU bounded in bytes)."""

    def __init__(self, folder: str | os.PathLike, config: ExtractorConfig, memory_mb: float = 64):
        self.config = config
        self.base = Path(folder) / config.key()
        self.memory_bytes = int(memory_mb * 2**20)
        self._lru: OrderedDict[str, Features] = OrderedDict()
        self._held = 0

    get_stored_form = staticmethod(stored_form)  # what `get` returns for freshly extracted features

    def path(self, key: str) -> Path:
        return self.base / key[:2] / f"{key}.feat"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def _remember(self, key: str, feats: Features) -> None:
        size = feats.locations.nbytes + feats.descriptors.nbytes
        if size > self.memory_bytes:
            return
        if key in self._lru:
            self._held -= _size(self._lru.pop(key))
        self._lru[key] = feats
        self._held += size
        while self._held > self.memory_bytes:
            self._held -= _size(self._lru.popitem(last=False)[1])

    def get(self, key: str) -> Features | None:
        """Cached features, or None when not cached (a damaged entry is deleted: the next run recomputes it)."""
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        path = self.path(key)
        try:
            feats = decode(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, DamagedEntry):
            path.unlink(missing_ok=True)  # our own entry, unreadable: never read garbage, recompute
            return None
        self._remember(key, feats)
        return feats

    def put(self, key: str, feats: Features) -> Path:
        """Store atomically (temp file + rename); last writer wins, readers see whole entries."""
        if not (self.base / "config.json").exists():
            self.base.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.base / "config.json",
                              json.dumps({"format": FORMAT, **self.config.relevant()}, indent=1, default=list))
        path = self.path(key)
        with atomic_path(path, suffix=".feat") as tmp:
            tmp.write_bytes(encode(feats))
        return path


def _size(feats: Features) -> int:
    return feats.locations.nbytes + feats.descriptors.nbytes


# -- filling the cache (used by `glr features` and by `glr verify` before matching) -------------

_extractors: dict[ExtractorConfig, Extractor] = {}  # one per process and config, built before its first image


def _extractor(config: ExtractorConfig) -> Extractor:
    if config not in _extractors:
        _extractors[config] = make_extractor(config)
    return _extractors[config]


def _extract_chunk(args) -> list[tuple[str, str | None, int]]:
    """Worker: extract and store each (key, path) not cached yet → (key, error or None, n keypoints)."""
    from pipeline.images import ImageReadError

    folder, config, items = args
    cache = FeatureCache(folder, config, memory_mb=0)
    extractor = _extractor(config)  # outside the per-image loop: a module that does not load fails the run
    out = []
    for key, path in items:
        if cache.has(key):  # another worker or shard got there first
            out.append((key, None, -1))
            continue
        try:
            feats = extractor.extract_path(path)
        except ImageReadError as e:  # this image cannot be decoded: the others go on
            out.append((key, str(e), 0))
            continue
        cache.put(key, feats)
        out.append((key, None, feats.n))
    return out


def extract_images(folder: str | os.PathLike, config: ExtractorConfig, paths: dict, *,
                   workers: int = VERIFY.default("workers"), desc: str = "features",
                   chunk: int = 8) -> tuple[dict[str, str | None], dict[str, str], dict[str, int]]:
    """Make sure the features of every image in `paths` ({id: file}) are cached.

    Returns ({id: entry key, None for an unreadable or missing image}, {id: why unreadable}, counts of
    image files extracted now and found cached). Before extracting: the extractor is built here (a DELF handle that does not
    load stops the run now, with nothing written), then one line says how many images will be
    extracted and how many bytes they take at most (pipeline.caches.announce, which also refuses
    when the disk cannot hold them).
    """
    from pipeline.caches import announce
    from pipeline.parallel import map_chunks, resolve_workers
    from pipeline.progress import progress

    folder = Path(folder)
    cache = FeatureCache(folder, config, memory_mb=0)
    ids = list(paths)
    keys = dict(zip(ids, image_keys(paths[i] for i in ids)))
    errors = {i: f"{paths[i]}: no such image file" for i, k in keys.items() if k is None}
    todo = {k: paths[i] for i, k in keys.items() if k is not None and not cache.has(k)}  # one per file
    n_files = len({k for k in keys.values() if k is not None})
    failed: dict[str, str] = {}
    if todo:
        _extractor(config)
        announce(cache.base, f"local features ({config.name})", len(todo), n_files - len(todo),
                 entry_bytes_at_most(config))
        if resolve_workers(workers) > 1 and len(todo) > chunk:
            _extractors.pop(config, None)  # loaded to check it; the workers load their own
        failed = _extract_all(folder, config, list(todo.items()), workers, desc, chunk, map_chunks, progress)
        for i, k in keys.items():
            if k in failed:
                errors[i], keys[i] = failed[k], None
    counts = {"extracted": len(todo) - len(failed), "already_cached": n_files - len(todo)}
    return {i: (None if i in errors else k) for i, k in keys.items()}, errors, counts


def _extract_all(folder, config, items, workers, desc, chunk, map_chunks, progress) -> dict[str, str]:
    """{key: error} of the images that could not be read; the others are cached."""
    chunks = [(str(folder), config, items[i:i + chunk]) for i in range(0, len(items), chunk)]
    failed: dict[str, str] = {}
    bar = progress(range(len(items)), total=len(items), desc=desc, unit="img")
    try:
        with map_chunks(_extract_chunk, chunks, workers) as results:
            for res in results:
                for key, err, _ in res:
                    next(bar, None)
                    if err:
                        failed[key] = err
    finally:
        for _ in bar:  # close the bar
            pass
    return failed


def extract_split(data_dir: str | os.PathLike, split: str = "test", *, extractor: str = VERIFY.default("extractor"),
                  shard: str | tuple[int, int] | None = None, cache_dir: str | os.PathLike | None = None,
                  workers: int = VERIFY.default("workers"), max_side: int = VERIFY.default("max_side"),
                  n_features: int = VERIFY.default("n_features"),
                  delf_handle: str = VERIFY.default("delf_handle")) -> dict:
    """Fill the feature cache for one split (or one shard of it) ahead of `glr verify`.

    `cache_dir` is the cache root ([run] cache_dir; default DATA_DIR/.glr-cache). Already-cached
    images are skipped, so an interrupted run resumes. Unreadable images are reported (warning
    naming the id), not fatal. Returns counts for the CLI.
    """
    from pipeline.acquire.competition import Competition
    from pipeline.parallel import in_shard, parse_shard

    comp = Competition(data_dir)
    config = make_config(extractor, max_side=max_side, n_features=n_features, handle=delf_handle)
    folder = features_dir(data_dir, cache_dir)
    ids = in_shard(comp.ids(split), parse_shard(shard))
    _, errors, counts = extract_images(folder, config, {i: comp.image_path(i, split) for i in ids},
                                       workers=workers, desc=f"features {split}")
    for image_id, err in errors.items():  # never cached: each run tries (and reports) them again
        warnings.warn(f"image {image_id}: skipped ({err})", stacklevel=2)
    return {"split": split, "images": len(ids), **counts, "unreadable": len(errors),
            "cache": str(FeatureCache(folder, config).base), "config": config.relevant()}
