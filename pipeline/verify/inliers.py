"""The verify run: count RANSAC inliers for every planned (query, candidate class, reference) pair.

`verify` writes the inliers table (DESIGN.md): one row per (query, candidate class, reference
image). Pairs are planned by `pipeline.verify.references`, features are computed once per image
(`pipeline.verify.cache`), pairs are matched (`pipeline.verify.matching`) in parallel processes,
finished chunks are saved in a parts folder beside the output so an interrupted run resumes, and
the table records its settings fingerprint in its Parquet metadata so that a re-run with the same
settings reuses its rows and computes only pairs it lacks (different settings recompute all).
`merge` joins the tables of sharded runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.options import VERIFY
from pipeline.verify.matching import MatchConfig, match_config, match_features
from submissions.errors import UserError

_V = VERIFY.default  # every option's default is the schema's

PAIR = ["id", "landmark_id", "ref_id"]  # the key of an inliers row


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` wrote (`table`) and how many of its pairs it computed or reused from an earlier run."""

    table: pd.DataFrame
    computed_pairs: int
    reused_pairs: int


# -- parallel matching --------------------------------------------------------------------------

_state: dict = {}


def _init_match_worker(features_dir, config, match_cfg) -> None:
    """Each matching process (or this one when serial): its caches (references get the larger memory:
    chunks are ordered so that one worker meets the same references again) and matching config."""
    from pipeline.verify.cache import FeatureCache

    _state.update(query=FeatureCache(features_dir, config, memory_mb=16),
                  ref=FeatureCache(features_dir, config, memory_mb=128), match=match_cfg,
                  delf=config.name == "delf")


def _features(cache, key: str):
    feats = cache.get(key)
    if feats is None:  # extracted before matching began: removed (glr cache prune?) or damaged since
        raise UserError(f"{cache.path(key)}: local-feature cache entry gone or damaged during the run; "
                        "run glr verify again (it extracts the entry again and resumes)")
    return feats


def _match_chunk(pairs: list[tuple]) -> list[tuple[str, int, str, int]]:
    """Worker: inlier count for each (query, class, ref, query key, ref key); 0 where an image could not
    be read (its key is None)."""
    qc, rc, cfg = _state["query"], _state["ref"], _state["match"]
    out = []
    for qid, lid, rid, qkey, rkey in pairs:
        n = 0
        if isinstance(qkey, str) and isinstance(rkey, str):
            n = match_features(_features(qc, qkey), _features(rc, rkey), cfg, delf=_state["delf"])["inliers"]
        out.append((qid, lid, rid, n))
    return out


META_KEY = "glr.verify"  # Parquet key-value metadata of the inliers table written by `verify`


def settings_fingerprint(data_dir: str | os.PathLike, config, match_cfg: MatchConfig) -> tuple[dict, str]:
    """(settings, short hash) of everything a pair's inlier count depends on besides the pair itself.

    Extractor and its relevant config, matching/RANSAC config (ratio, mutual, model, method,
    threshold as resolved for the extractor, iterations, confidence, seed), the feature cache's
    format (v: quantised descriptors) and the competition folder the ids are resolved in.
    Which pairs are planned (candidates, k, refs, shard) is not part of it: rows are keyed by pair.
    """
    from pipeline.verify.cache import FORMAT

    if match_cfg.threshold is None:
        match_cfg = match_cfg.for_extractor(config.name)
    settings = {"v": 2, "feature_format": FORMAT, "features": config.relevant(), "match": dataclasses.asdict(match_cfg),
                "data_dir": str(Path(data_dir).resolve())}
    blob = json.dumps(settings, sort_keys=True, default=list)
    return json.loads(blob), hashlib.sha1(blob.encode()).hexdigest()


def _parts_dir(out: Path, fingerprint: str, images: str) -> Path:
    """Finished chunks of an interrupted run: they count only for the same settings and image files."""
    return out.parent / f".{out.name}.parts-{hashlib.sha1((fingerprint + images).encode()).hexdigest()[:10]}"


def table_settings(path: str | os.PathLike) -> dict | None:
    """The settings record `verify` stored in an inliers table's metadata (None: none, or unreadable)."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(META_KEY.encode())
        return json.loads(raw) if raw else None
    except Exception:  # not Parquet, truncated, not ours: treated as "no reusable table"
        return None


def _concat_pairs(*frames: pd.DataFrame) -> pd.DataFrame:
    """Rows of several inliers frames, one per pair (a pair seen twice: the later frame wins)."""
    return pd.concat(frames, ignore_index=True).drop_duplicates(PAIR, keep="last")


def images_digest(comp, table: pd.DataFrame) -> str:
    """Digest of the identity (name, inode, size, mtime) of every image a table's pairs read: its
    queries (test split) and references (train split). A count is reused only while it is unchanged,
    so an image replaced in place is never matched from stale features or counts."""
    from pipeline.verify.cache import image_keys

    h = hashlib.blake2b(digest_size=16)
    for split, column in (("test", "id"), ("train", "ref_id")):
        ids = sorted(table[column].astype(str).unique().tolist())
        for i, key in zip(ids, image_keys(comp.image_paths(ids, split))):
            h.update(f"{split}\0{i}\0{key}\n".encode())
    return h.hexdigest()


def _reusable_rows(out: Path, fingerprint: str, comp) -> pd.DataFrame | None:
    """Rows of an existing `out` written by `verify` with the same settings from the same image files,
    else None."""
    from submissions.tables import read_inliers

    if not out.is_file():
        return None
    info = table_settings(out)
    if not info or info.get("fingerprint") != fingerprint:
        return None  # other settings (or not written by verify): its counts do not apply
    try:
        rows = read_inliers(out)
    except UserError as e:
        warnings.warn(f"{out}: existing table not reused ({e}); its pairs are recomputed", stacklevel=3)
        return None
    if info.get("images") != images_digest(comp, rows):
        return None  # an image changed since (or a table from before images were recorded): recount all
    return rows


def _read_parts(parts: Path) -> pd.DataFrame:
    """The rows of every finished chunk in the parts folder (a pair seen twice: last wins)."""
    from submissions.tables import empty_inliers

    frames = []
    for p in sorted(parts.glob("chunk-*.parquet")):
        try:
            frames.append(pd.read_parquet(p))
        except Exception:  # cannot happen with atomic writes, but never let one file block a resume
            warnings.warn(f"{p}: unreadable part file ignored (its pairs are recomputed)", stacklevel=2)
    if not frames:
        return empty_inliers()
    return _concat_pairs(*frames)


def _plan(preds: pd.DataFrame, comp, *, candidates: int, k: int, refs: str, seed: int, shard,
          embeddings, ref_embeddings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the queries' predictions restricted to `shard`, the planned pairs)."""
    from pipeline.model.embeddings import read_embeddings
    from pipeline.parallel import in_shard, parse_shard
    from pipeline.verify.references import plan_pairs

    shard_t = parse_shard(shard)
    if shard_t is not None:
        preds = preds[preds["id"].isin(in_shard(preds["id"].unique(), shard_t))]
    emb = read_embeddings(embeddings) if embeddings else None
    remb = read_embeddings(ref_embeddings) if ref_embeddings else None
    return preds, plan_pairs(preds, comp.train, candidates=candidates, k=k, refs=refs, seed=seed, embeddings=emb,
                             ref_embeddings=remb)


def _extract_missing(comp, folder: Path, config, todo: pd.DataFrame, workers: int) -> tuple[dict, dict]:
    """Make sure the features of the queries and references `todo` needs are cached (only those; one pool,
    one line saying how many and how big) → ({query id: entry key}, {reference id: entry key}), None for an
    unreadable image (0 inliers, a warning)."""
    from pipeline.verify.cache import extract_images

    paths = {(split, i): comp.image_path(i, split) for split, column in (("test", "id"), ("train", "ref_id"))
             for i in todo[column].unique().tolist()}
    keys, errors, _ = extract_images(folder, config, paths, workers=workers, desc="features")
    for (split, i), err in errors.items():
        warnings.warn(f"{'query' if split == 'test' else 'reference'} {i}: 0 inliers ({err})", stacklevel=3)
    return ({i: k for (split, i), k in keys.items() if split == "test"},
            {i: k for (split, i), k in keys.items() if split == "train"})


def _chunks(preds: pd.DataFrame, todo: pd.DataFrame, chunk_size: int) -> list[list[tuple]]:
    """`todo`'s pairs (with the query's and reference's entry keys) in chunks of about `chunk_size`, never
    splitting one query's pairs; queries sorted by their top class so that one worker's chunks share references."""
    first_class = preds[preds["rank"] == preds.groupby("id")["rank"].transform("min")].set_index("id")["landmark_id"]
    order = todo.assign(_c=todo["id"].map(first_class)).sort_values(["_c", "id"], kind="stable")
    chunks, cur = [], []
    for t in zip(order["id"], order["landmark_id"].astype(int), order["ref_id"], order["qkey"], order["rkey"]):
        if len(cur) >= chunk_size and t[0] != cur[-1][0]:
            chunks.append(cur)
            cur = []
        cur.append(t)
    return chunks + ([cur] if cur else [])


def _match_into_parts(chunks: list, parts: Path, init_args: tuple, workers: int) -> None:
    """Match every chunk in parallel; each finished chunk is saved at once as a part file (resume)."""
    from pipeline.parallel import map_chunks
    from pipeline.progress import progress
    from submissions.tables import write_inliers

    parts.mkdir(parents=True, exist_ok=True)
    n_pairs = sum(map(len, chunks))
    with map_chunks(_match_chunk, chunks, workers, _init_match_worker, init_args) as results:
        bar = progress(range(n_pairs), total=n_pairs, desc="verify", unit="pair")
        for rows in results:
            write_inliers(pd.DataFrame(rows, columns=[*PAIR, "inliers"]), parts / f"chunk-{uuid.uuid4().hex}.parquet")
            for _ in rows:
                next(bar, None)


def verify(preds: str | os.PathLike | pd.DataFrame, data_dir: str | os.PathLike, out: str | os.PathLike, *,
           extractor: str = _V("extractor"), candidates: int = _V("candidates"), k: int = _V("k"),
           refs: str = _V("refs"), embeddings: str | os.PathLike | None = None,
           ref_embeddings: str | os.PathLike | None = None, workers: int = _V("workers"),
           shard: str | tuple[int, int] | None = None, cache_dir: str | os.PathLike | None = None,
           seed: int = _V("seed"), max_side: int = _V("max_side"), n_features: int = _V("n_features"),
           delf_handle: str = _V("delf_handle"), ratio: float = _V("ratio"), mutual: bool = _V("mutual"),
           model: str = _V("model"), method: str = _V("method"), threshold: float = _V("threshold"),
           chunk_size: int = _V("chunk_size")) -> VerifyResult:
    """Verify each query's top candidate classes against reference training images; write the inliers table.

    Queries are the ids of `preds` (test split), restricted to `shard` ('i/n' by crc32 of the id).
    Features come from the cache under `cache_dir` (the cache root, default DATA_DIR/.glr-cache;
    `pipeline.verify.cache`), extracted once per image file and only for the images of pairs to compute.
    `workers` 0 = one process per available core; `threshold` None = the extractor's default.
    Finished chunks of pairs are kept in `.<out>.parts-<hash>/` next to `out`, so re-running after
    an interruption only computes the missing pairs. An existing `out` written with the same
    settings (`settings_fingerprint`: extractor config, matching/RANSAC config, data folder) lends
    its counts for the pairs of this run's plan, so a re-run, or one with more candidates / queries,
    computes only the pairs not yet counted; with other settings every pair is recomputed. The
    table written holds exactly this run's planned pairs. A query or reference whose image is
    missing or unreadable gets 0 inliers and a warning naming its id; counts are reused only while
    every image of the earlier table is the same file (name, inode, size, mtime), so fixing or
    replacing an image recounts. Returns the table written to `out` with the numbers of pairs
    computed and reused (also stored in the table's metadata).
    """
    from pipeline.acquire.competition import Competition
    from pipeline.verify.cache import features_dir
    from pipeline.verify.features import make_config
    from submissions.tables import read_predictions, validate_inliers, validate_predictions, write_inliers

    out = Path(out)
    preds = validate_predictions(preds) if isinstance(preds, pd.DataFrame) else read_predictions(preds)
    comp = Competition(data_dir)
    config = make_config(extractor, max_side=max_side, n_features=n_features, handle=delf_handle)
    mcfg = match_config(extractor, ratio=ratio, mutual=mutual, model=model, method=method, threshold=threshold,
                        seed=seed)
    folder = features_dir(data_dir, cache_dir)
    preds, plan = _plan(preds, comp, candidates=candidates, k=k, refs=refs, seed=seed, shard=shard,
                        embeddings=embeddings, ref_embeddings=ref_embeddings)

    settings, fingerprint = settings_fingerprint(comp.root, config, mcfg)
    images = images_digest(comp, plan)  # the table written holds exactly the plan's pairs: its digest too
    parts = _parts_dir(out, fingerprint, images)
    done = _read_parts(parts)
    previous = _reusable_rows(out, fingerprint, comp)
    if previous is not None and len(previous):  # a finished run with the same settings: keep its counts
        done = _concat_pairs(previous, done)
    done_keys = set(zip(done["id"], done["landmark_id"], done["ref_id"]))
    todo = plan[np.array([t not in done_keys for t in zip(plan["id"], plan["landmark_id"], plan["ref_id"])], bool)]

    qkeys, rkeys = _extract_missing(comp, folder, config, todo, workers)  # features, once per image file
    if len(todo):
        todo = todo.assign(qkey=todo["id"].map(qkeys), rkey=todo["ref_id"].map(rkeys))
        init_args = (str(folder), config, mcfg)
        _match_into_parts(_chunks(preds, todo, chunk_size), parts, init_args, workers)
        done = _concat_pairs(done, _read_parts(parts))

    result = plan.merge(done, on=PAIR, how="left", validate="one_to_one")
    if result["inliers"].isna().any():  # cannot happen: every planned pair was computed above
        raise RuntimeError("internal error: some planned pairs have no inlier count")
    result = validate_inliers(result)
    stats = {"computed_pairs": int(len(todo)), "reused_pairs": int(len(plan) - len(todo))}
    record = {"fingerprint": fingerprint, "settings": settings, "images": images, **stats}
    write_inliers(result, out, {META_KEY: json.dumps(record, sort_keys=True)})
    if parts.exists():
        shutil.rmtree(parts, ignore_errors=True)
    return VerifyResult(result, **stats)


def merge(parts: list[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Join shard outputs of `glr verify --shard` into one inliers table (a pair seen twice: last wins)."""
    from submissions.tables import read_inliers, write_inliers

    if not parts:
        raise UserError("glr merge: give at least one inliers table to merge")
    table = _concat_pairs(*(read_inliers(p) for p in parts))
    table = table.sort_values(PAIR, kind="stable").reset_index(drop=True)
    write_inliers(table, out)
    return table
