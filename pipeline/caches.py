"""Where glr's caches live: one folder per competition, shared by every model, stage and run.

    <cache_root>/images/      decoded training images (pipeline.model.data)
    <cache_root>/bottleneck/  frozen-base features (pipeline.model.train)
    <cache_root>/features/    local features for verification (pipeline.verify.cache)

The root is `--cache-dir` / `[run] cache_dir`, else DATA_DIR/.glr-cache. Everything under it
is content-keyed, so sharing it between runs never returns another input's result.
"""
from __future__ import annotations

import os
from pathlib import Path

KINDS = ("images", "bottleneck", "features")
DEFAULT_NAME = ".glr-cache"


def cache_root(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache_dir` when given, else DATA_DIR/.glr-cache."""
    return Path(cache_dir) if cache_dir else Path(data_dir) / DEFAULT_NAME


def kind_dir(root: str | os.PathLike, kind: str) -> Path:
    """The folder of one kind of cache under `root`."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; one of {', '.join(KINDS)}")
    return Path(root) / kind
