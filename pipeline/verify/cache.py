"""On-disk cache of local features: each image is extracted once per extractor configuration.

Layout: `<cache_dir>/<config key>/<split>/<id[:2]>/<id>.npz` (plus `config.json` describing the key).
Default `cache_dir`: `<data_dir>/.glr-features/`. Each entry is written to a temporary file
beside it and renamed into place, so concurrent writers (workers, shards on a shared disk)
and interrupted runs never leave a half-written entry that could be read back; a damaged
entry (e.g. a disk error) is treated as missing and recomputed. Memory is bounded by a small
in-process LRU.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pipeline.options import VERIFY
from pipeline.verify.features import Extractor, ExtractorConfig, Features, make_config, make_extractor
from submissions.files import atomic_path, atomic_write_text

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,120}$")


def _to_disk(desc: np.ndarray) -> np.ndarray:
    """float32 descriptors are stored as float16: half the disk, no loss that matters for matching."""
    return desc.astype(np.float16) if desc.dtype == np.float32 else desc


def _from_disk(desc: np.ndarray) -> np.ndarray:
    """float16 → float32; unit-norm descriptors (RootSIFT, DELF) are renormalised to exactly unit norm,
    which lets matching skip the norm terms (see pipeline.verify.matching.match_descriptors)."""
    if desc.dtype != np.float16:
        return desc
    out = desc.astype(np.float32)
    if len(out):
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))
        if np.abs(norms - 1).max() < 5e-3:
            out /= norms[:, None]
    return out


def default_cache_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / ".glr-features"


def _file_stem(image_id: str) -> str:
    image_id = str(image_id)
    return image_id if _SAFE_ID.match(image_id) else "h-" + hashlib.sha1(image_id.encode()).hexdigest()


class FeatureCache:
    """Features by image id for one extractor configuration (disk + bounded LRU in memory)."""

    def __init__(self, cache_dir: str | os.PathLike, config: ExtractorConfig, split: str = "train",
                 memory_items: int = 512):
        self.config = config
        self.base = Path(cache_dir) / config.key()
        self.root = self.base / split  # train and test ids live apart (a synthetic id may repeat)
        self.memory_items = int(memory_items)
        self._lru: OrderedDict[str, Features] = OrderedDict()
        self._extractor: Extractor | None = None

    def path(self, image_id: str) -> Path:
        stem = _file_stem(image_id)
        return self.root / stem[:2] / f"{stem}.npz"

    def _remember(self, image_id: str, feats: Features) -> None:
        self._lru[image_id] = feats
        self._lru.move_to_end(image_id)
        while len(self._lru) > self.memory_items:
            self._lru.popitem(last=False)

    def get(self, image_id: str) -> Features | None:
        """Cached features, or None when not cached (or the entry is damaged)."""
        image_id = str(image_id)
        if image_id in self._lru:
            self._lru.move_to_end(image_id)
            return self._lru[image_id]
        path = self.path(image_id)
        try:
            with np.load(path, allow_pickle=False) as z:
                desc = z["descriptors"]
                feats = Features(
                    z["locations"].astype(np.float32), _from_disk(desc),
                    z["scales"].astype(np.float32), z["scores"].astype(np.float32), float(z["work_scale"]),
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return None  # not cached (FileNotFoundError is an OSError), or damaged: recompute and overwrite
        self._remember(image_id, feats)
        return feats

    def put(self, image_id: str, feats: Features) -> Path:
        """Store atomically (temp file + rename); last writer wins, readers see whole entries."""
        image_id = str(image_id)
        path = self.path(image_id)
        if not (self.base / "config.json").exists():
            self.base.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.base / "config.json", json.dumps(self.config.relevant(), indent=1, default=list))
        desc = _to_disk(feats.descriptors)
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, locations=feats.locations.astype(np.float32), descriptors=desc,
                         scales=feats.scales.astype(np.float32), scores=feats.scores.astype(np.float32),
                         work_scale=np.float32(feats.work_scale))
        if self.memory_items > 0:  # workers keep nothing in memory: skip the float16 round trip
            self._remember(image_id, self.get_stored_form(feats))
        return path

    @staticmethod
    def get_stored_form(feats: Features) -> Features:
        """What `get` will return for `feats` (descriptors round-tripped through float16)."""
        return feats._replace(descriptors=_from_disk(_to_disk(feats.descriptors)))

    @property
    def extractor(self) -> Extractor:
        if self._extractor is None:
            self._extractor = make_extractor(self.config)
        return self._extractor


# -- filling the cache (used by `glr features` and by `glr verify` before matching) -------------

_worker_caches: dict = {}


def _extract_chunk(args) -> list[tuple[str, str | None, int]]:
    """Worker: extract and store each (id, path) not cached yet → (id, error or None, n keypoints)."""
    from pipeline.images import ImageReadError

    cache_dir, config, split, items = args
    key = (str(cache_dir), config, split)
    cache = _worker_caches.get(key)
    if cache is None:
        cache = _worker_caches[key] = FeatureCache(cache_dir, config, split, memory_items=0)
    out = []
    for image_id, path in items:
        if cache.path(image_id).exists() and cache.get(image_id) is not None:
            out.append((image_id, None, -1))
            continue
        try:
            feats = cache.extractor.extract_path(path)
        except ImageReadError as e:
            out.append((image_id, str(e), 0))
            continue
        except Exception as e:  # a decoder crash on one image must not stop thousands
            out.append((image_id, f"{path}: {e.__class__.__name__}: {e}", 0))
            continue
        cache.put(image_id, feats)
        out.append((image_id, None, feats.n))
    return out


def extract_many(cache_dir: str | os.PathLike, config: ExtractorConfig, split: str,
                 items: list[tuple[str, Path]], *, workers: int = 1, desc: str = "features",
                 chunk: int = 8) -> dict[str, str]:
    """Extract every (id, path) not cached yet, in parallel; return {id: error} for unreadable images."""
    from pipeline.parallel import map_chunks
    from pipeline.progress import progress

    chunks = [(cache_dir, config, split, items[i:i + chunk]) for i in range(0, len(items), chunk)]
    errors: dict[str, str] = {}
    if not chunks:
        return errors
    bar = progress(range(len(items)), total=len(items), desc=desc, unit="img")
    try:
        with map_chunks(_extract_chunk, chunks, workers) as results:
            for res in results:
                for image_id, err, _ in res:
                    next(bar, None)
                    if err:
                        errors[image_id] = err
    finally:
        for _ in bar:  # close the bar
            pass
    return errors


def extract_split(data_dir: str | os.PathLike, split: str = "test", *, extractor: str = VERIFY.default("extractor"),
                  shard: str | tuple[int, int] | None = None, cache_dir: str | os.PathLike | None = None,
                  workers: int = VERIFY.default("workers"), max_side: int = VERIFY.default("max_side"),
                  n_features: int = VERIFY.default("n_features"),
                  delf_handle: str = VERIFY.default("delf_handle")) -> dict:
    """Fill the feature cache for one split (or one shard of it) ahead of `glr verify`.

    Already-cached images are skipped, so an interrupted run resumes. Unreadable images are
    reported (warning naming the id), not fatal. Returns counts for the CLI.
    """
    import warnings

    from pipeline.acquire.competition import Competition
    from pipeline.parallel import in_shard, parse_shard

    comp = Competition(data_dir)
    config = make_config(extractor, max_side=max_side, n_features=n_features, handle=delf_handle)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(data_dir)
    ids = in_shard(comp.ids(split), parse_shard(shard))
    cache = FeatureCache(cache_dir, config, split, memory_items=0)
    todo = [(i, comp.image_path(i, split)) for i in ids if not cache.path(i).exists()]
    errors = extract_many(cache_dir, config, split, todo, workers=workers, desc=f"features {split}")
    for image_id, err in errors.items():
        warnings.warn(f"image {image_id}: skipped ({err})", stacklevel=2)
    return {"split": split, "images": len(ids), "extracted": len(todo) - len(errors),
            "already_cached": len(ids) - len(todo), "unreadable": len(errors),
            "cache": str(cache.base), "config": config.relevant()}
