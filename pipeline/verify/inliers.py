"""Geometric verification: match local features of a query against reference images, count RANSAC inliers.

Matching is vectorised (one BLAS matrix product per pair for float descriptors; OpenCV's
brute-force Hamming matcher for ORB), with Lowe's ratio test (+ optional mutual check) for
SIFT/ORB and DELF's own rule (nearest neighbour within L2 distance 0.8) for DELF. Geometry is
checked by OpenCV (`estimateAffine2D` by default; homography, fundamental matrix, MAGSAC as
options), seeded before every call so a pair always gives the same count. `skimage_inliers`
is the study's reference path, kept only for tests and benchmarks.

`verify` writes the inliers table (DESIGN.md): one row per (query, candidate class, reference
image). Features are computed once per image (cache), pairs are matched in parallel processes,
finished chunks are saved in a parts folder beside the output so an interrupted run resumes, and
the table records its settings fingerprint in its Parquet metadata so that a re-run with the same
settings reuses its rows and computes only pairs it lacks (different settings recompute all).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.verify.features import Features, in_shard, make_config, make_extractor, parse_shard
from submissions.errors import UserError

MODELS = ("affine", "homography", "fundamental")
METHODS = ("ransac", "magsac")
REFS = ("first", "random", "nearest")
_MIN_POINTS = {"affine": 3, "homography": 4, "fundamental": 8}


@dataclass(frozen=True)
class MatchConfig:
    """How two feature sets are matched and verified (defaults chosen in benchmarks/real_pairs.py)."""

    ratio: float = 0.85  # sift/orb: Lowe's ratio test on descriptor distances
    mutual: bool = True  # sift/orb: keep only mutual nearest neighbours
    delf_distance: float = 0.8  # delf: nearest neighbour accepted within this L2 distance
    model: str = "affine"  # affine | homography | fundamental
    method: str = "ransac"  # ransac | magsac (OpenCV USAC_MAGSAC)
    threshold: float = 12.0  # reprojection threshold in working-image pixels
    max_iters: int = 2000  # real photos: same AUC as 10000 (total inliers -0.4%), 5x cheaper on negatives
    confidence: float = 0.9999  # high, so adaptive termination does not stop at a weaker model
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise UserError(f"unknown --model {self.model!r}; choose one of: {', '.join(MODELS)}")
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not 0 < self.ratio <= 1:
            raise UserError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.threshold <= 0:
            raise UserError(f"--threshold must be positive, got {self.threshold}")


# -- matching -----------------------------------------------------------------------------------


def _top2(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: index of the best, best and second-best value (larger is better), in O(n·m)."""
    rows = np.arange(scores.shape[0])
    best = scores.argmax(axis=1)
    v1 = scores[rows, best].copy()
    scores[rows, best] = -np.inf  # scores is a scratch matrix owned by the caller
    v2 = scores.max(axis=1) if scores.shape[1] > 1 else np.full_like(v1, -np.inf)
    scores[rows, best] = v1
    return best, v1, v2


def match_descriptors(da: np.ndarray, db: np.ndarray, *, ratio: float | None = 0.85, mutual: bool = False,
                      max_distance: float | None = None) -> np.ndarray:
    """Tentative matches (M×2 int index pairs a→b): nearest neighbour + ratio test / distance bound.

    Float descriptors: squared L2 distances from one matrix product (‖a‖² + ‖b‖² − 2a·b).
    uint8 descriptors (ORB): Hamming distances via OpenCV's brute-force matcher.
    """
    if len(da) == 0 or len(db) == 0:
        return np.zeros((0, 2), np.int64)
    if da.dtype == np.uint8:
        return _match_hamming(da, db, ratio=ratio, mutual=mutual, max_distance=max_distance)
    da = np.asarray(da, np.float32)
    db = np.asarray(db, np.float32)
    na = np.einsum("ij,ij->i", da, da)
    nb = np.einsum("ij,ij->i", db, db)
    scores = da @ db.T  # the one O(n·m·d) step: BLAS sgemm
    if np.abs(nb - 1).max() < 1e-5:  # unit descriptors (RootSIFT, DELF): d² = ‖a‖² + 1 − 2a·b
        best, v1, v2 = _top2(scores)
        d1, d2 = na + 1 - 2 * v1, na + 1 - 2 * v2
        col_best = scores.max(axis=0) if mutual else None
    else:  # any other float descriptors: score = a·b − ‖a‖²/2 − ‖b‖²/2 = −d²/2 (rows and columns)
        scores -= 0.5 * nb[None, :]
        scores -= 0.5 * na[:, None]
        best, v1, v2 = _top2(scores)
        d1, d2 = -2 * v1, -2 * v2
        col_best = scores.max(axis=0) if mutual else None
    d1, d2 = np.maximum(d1, 0), np.maximum(d2, 0)  # squared distances
    keep = np.ones(len(da), bool)
    if max_distance is not None:
        keep &= d1 < max_distance**2
    if ratio is not None and ratio < 1:
        keep &= d1 < (ratio**2) * d2
    if mutual:  # a's best b has a as its best too (column maxima: contiguous, SIMD-friendly)
        keep &= v1 >= col_best[best]
    idx = np.flatnonzero(keep)
    return np.stack([idx, best[idx]], axis=1)


def _match_hamming(da, db, *, ratio, mutual, max_distance) -> np.ndarray:
    import cv2

    bf = cv2.BFMatcher(cv2.NORM_HAMMING)
    knn = bf.knnMatch(da, db, k=2)
    q = np.array([m[0].queryIdx for m in knn if m], np.int64)
    t = np.array([m[0].trainIdx for m in knn if m], np.int64)
    d1 = np.array([m[0].distance for m in knn if m], np.float32)
    d2 = np.array([m[1].distance if len(m) > 1 else np.inf for m in knn if m], np.float32)
    keep = np.ones(len(q), bool)
    if ratio is not None and ratio < 1:
        keep &= d1 < ratio * d2
    if max_distance is not None:
        keep &= d1 <= max_distance
    if mutual and len(q):
        back = bf.match(db, da)
        rev = np.full(len(db), -1, np.int64)
        rev[[m.queryIdx for m in back]] = [m.trainIdx for m in back]
        keep &= rev[t] == q
    return np.stack([q[keep], t[keep]], axis=1)


def ransac_inliers(src: np.ndarray, dst: np.ndarray, config: MatchConfig = MatchConfig()) -> np.ndarray:
    """Boolean inlier mask of the matched points under the configured model (seeded OpenCV)."""
    import cv2

    n = len(src)
    if n < _MIN_POINTS[config.model]:
        return np.zeros(n, bool)
    src = np.ascontiguousarray(src, np.float32).reshape(-1, 1, 2)
    dst = np.ascontiguousarray(dst, np.float32).reshape(-1, 1, 2)
    cv2.setRNGSeed(int(config.seed))  # same pair → same count, on every run and machine
    method = cv2.USAC_MAGSAC if config.method == "magsac" else cv2.RANSAC
    try:
        if config.model == "affine":
            model, mask = cv2.estimateAffine2D(src, dst, method=method, ransacReprojThreshold=config.threshold,
                                               maxIters=config.max_iters, confidence=config.confidence,
                                               refineIters=10)
        elif config.model == "homography":
            model, mask = cv2.findHomography(src, dst, method, config.threshold, maxIters=config.max_iters,
                                             confidence=config.confidence)
        else:
            model, mask = cv2.findFundamentalMat(src, dst, cv2.USAC_MAGSAC if config.method == "magsac"
                                                 else cv2.FM_RANSAC, config.threshold, config.confidence,
                                                 config.max_iters)
    except cv2.error:  # degenerate configurations (all points collinear, ...)
        return np.zeros(n, bool)
    if model is None or mask is None:
        return np.zeros(n, bool)
    return mask.reshape(-1).astype(bool)


def skimage_inliers(src: np.ndarray, dst: np.ndarray, *, threshold: float = 12.0, max_trials: int = 1000,
                    seed: int = 0) -> np.ndarray:
    """The study's reference: `skimage.measure.ransac` with `AffineTransform` (slow; tests/benchmarks only)."""
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    if len(src) < 3:
        return np.zeros(len(src), bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, mask = ransac((np.asarray(src, float), np.asarray(dst, float)), AffineTransform, min_samples=3,
                         residual_threshold=threshold, max_trials=max_trials, rng=seed)
    return np.zeros(len(src), bool) if mask is None else np.asarray(mask, bool)


def match_features(fa: Features, fb: Features, config: MatchConfig = MatchConfig(), *,
                   delf: bool | None = None) -> dict:
    """Match two feature sets and verify geometrically → {inliers, tentative, matches, inlier_mask}.

    `delf` (default: guessed from the 40-D descriptors) selects DELF's distance rule.
    """
    if delf is None:
        delf = fa.descriptors.ndim == 2 and fa.descriptors.shape[1] == 40 and fa.descriptors.dtype != np.uint8
    if delf:
        matches = match_descriptors(fa.descriptors, fb.descriptors, ratio=None, max_distance=config.delf_distance)
    else:
        matches = match_descriptors(fa.descriptors, fb.descriptors, ratio=config.ratio, mutual=config.mutual)
    if len(matches):
        mask = ransac_inliers(fa.work_locations[matches[:, 0]], fb.work_locations[matches[:, 1]], config)
    else:
        mask = np.zeros(0, bool)
    return {"inliers": int(mask.sum()), "tentative": int(len(matches)), "matches": matches, "inlier_mask": mask}


def match_config(**options) -> MatchConfig:
    """MatchConfig from keyword options where None means "the default"."""
    return MatchConfig(**{k: v for k, v in options.items() if v is not None})


def match_pair(img_a: str | os.PathLike, img_b: str | os.PathLike, *, extractor: str = "sift",
               max_side: int | None = None, n_features: int | None = None, delf_handle: str | None = None,
               ratio: float | None = None, mutual: bool | None = None, model: str | None = None,
               method: str | None = None, threshold: float | None = None, seed: int = 0,
               plot: str | os.PathLike | None = None) -> dict:
    """Inlier count of two image files (debugging `glr match`); with `plot`, a PNG of inlier matches."""
    from pipeline.images import ImageReadError

    ext = make_extractor(make_config(extractor, max_side=max_side, n_features=n_features, handle=delf_handle))
    cfg = match_config(ratio=ratio, mutual=mutual, model=model, method=method, threshold=threshold, seed=seed)
    t0 = time.perf_counter()
    try:
        fa, fb = ext.extract_path(img_a), ext.extract_path(img_b)
    except ImageReadError as e:
        raise UserError(str(e)) from None
    t1 = time.perf_counter()
    res = match_features(fa, fb, cfg, delf=extractor == "delf")
    t2 = time.perf_counter()
    out = {"inliers": res["inliers"], "tentative_matches": res["tentative"], "keypoints_a": fa.n,
           "keypoints_b": fb.n, "extract_ms": round((t1 - t0) * 1000, 2), "match_ms": round((t2 - t1) * 1000, 2),
           "extractor": extractor, "model": cfg.model, "method": cfg.method}
    if plot:
        from pipeline.verify.plot import plot_matches

        good = res["matches"][res["inlier_mask"]]
        out["plot"] = str(plot_matches(img_a, img_b, fa.locations[good[:, 0]], fb.locations[good[:, 1]], plot,
                                       title=f"{res['inliers']} inliers / {res['tentative']} matches"))
    return out


# -- choosing references ------------------------------------------------------------------------


def _class_rng(seed: int, landmark_id: int) -> np.random.Generator:
    lid = int(landmark_id)
    return np.random.default_rng([int(seed), lid & 0xFFFFFFFF, (lid >> 32) & 0xFFFFFFFF])


def plan_pairs(preds: pd.DataFrame, train: pd.DataFrame, *, candidates: int = 3, k: int = 3,
               refs: str = "random", seed: int = 0, embeddings: tuple[list[str], np.ndarray] | None = None,
               ref_embeddings: tuple[list[str], np.ndarray] | None = None) -> pd.DataFrame:
    """(id, landmark_id, ref_id) for each query's top-`candidates` classes and `k` references per class.

    first: the class's first k training images; random: k drawn per class with a seed (the same
    for every query, so reference features are reused); nearest: the k closest to the query by
    global embeddings (cosine), topped up at random when fewer members have embeddings.
    """
    if refs not in REFS:
        raise UserError(f"unknown --refs {refs!r}; choose one of: {', '.join(REFS)}")
    if candidates < 1 or k < 1:
        raise UserError("--candidates and --k must be at least 1")
    top = preds[preds["rank"] < candidates].sort_values(["id", "rank"], kind="stable")
    top = top.drop_duplicates(["id", "landmark_id"])
    members = train.groupby("landmark_id", sort=False)["id"].agg(list).to_dict()
    missing_classes = sorted(set(top["landmark_id"]) - set(members))
    if missing_classes:
        shown = ", ".join(map(str, missing_classes[:5])) + (" …" if len(missing_classes) > 5 else "")
        warnings.warn(f"{len(missing_classes)} candidate class(es) have no training images and are not verified: {shown}",
                      stacklevel=2)

    chosen: dict[int, list[str]] = {}

    def fixed(lid: int) -> list[str]:
        if lid not in chosen:
            ids = members[lid]
            if refs == "first" or len(ids) <= k:
                chosen[lid] = ids[:k]
            else:
                pick = _class_rng(seed, lid).choice(len(ids), size=k, replace=False)
                chosen[lid] = [ids[i] for i in pick]
        return chosen[lid]

    q_index = r_index = None
    if refs == "nearest":
        if embeddings is None or ref_embeddings is None:
            raise UserError("--refs nearest needs --embeddings (queries) and --ref-embeddings (training images), "
                            "written by `glr predict --embeddings`")
        q_ids, q_vec = embeddings
        r_ids, r_vec = ref_embeddings
        q_index = {x: i for i, x in enumerate(q_ids)}
        r_index = {x: i for i, x in enumerate(r_ids)}
        if q_vec.shape[1] != r_vec.shape[1]:
            raise UserError(f"--embeddings has {q_vec.shape[1]}-D vectors but --ref-embeddings {r_vec.shape[1]}-D")
        no_q = [x for x in top["id"].unique() if x not in q_index]
        if no_q:
            warnings.warn(f"{len(no_q)} query id(s) have no embedding (e.g. {no_q[0]}); their references are random",
                          stacklevel=2)

    out_id, out_lid, out_ref = [], [], []
    for qid, lid in zip(top["id"].tolist(), top["landmark_id"].tolist()):
        if lid not in members:
            continue
        if refs == "nearest" and qid in q_index and len(members[lid]) > k:
            ids = members[lid]
            have = [i for i in ids if i in r_index]
            if have:
                sims = r_vec[[r_index[i] for i in have]] @ q_vec[q_index[qid]]
                order = np.argsort(-sims, kind="stable")[:k]
                sel = [have[i] for i in order]
                if len(sel) < k:
                    sel += [i for i in fixed(lid) if i not in sel][: k - len(sel)]
                    if len(sel) < k:
                        sel += [i for i in ids if i not in sel][: k - len(sel)]
            else:
                sel = fixed(lid)
        else:
            sel = fixed(lid)
        if qid in sel:  # a query that is itself a training image (own validation split) is no reference
            sel = [i for i in sel if i != qid] + [i for i in members[lid] if i != qid and i not in sel][:1]
        out_id += [qid] * len(sel)
        out_lid += [lid] * len(sel)
        out_ref += sel
    return pd.DataFrame({"id": pd.Series(out_id, dtype=str), "landmark_id": pd.Series(out_lid, dtype="int64"),
                         "ref_id": pd.Series(out_ref, dtype=str)})


# -- parallel matching --------------------------------------------------------------------------

_state: dict = {}


def _init_match_worker(cache_dir, config, match_cfg, bad_query, bad_ref) -> None:
    import cv2

    from pipeline.verify.cache import FeatureCache

    cv2.setNumThreads(1)
    _state.update(
        query=FeatureCache(cache_dir, config, "test", memory_items=64),
        ref=FeatureCache(cache_dir, config, "train", memory_items=2048),
        match=match_cfg, delf=config.name == "delf", bad_query=set(bad_query), bad_ref=set(bad_ref),
    )


def _match_chunk(pairs: list[tuple[str, int, str]]) -> list[tuple[str, int, str, int]]:
    """Worker: inlier count for each (query, class, ref); 0 where an image could not be read."""
    qc, rc, cfg = _state["query"], _state["ref"], _state["match"]
    out = []
    for qid, lid, rid in pairs:
        n = 0
        if qid not in _state["bad_query"] and rid not in _state["bad_ref"]:
            fq, fr = qc.get(qid), rc.get(rid)
            if fq is not None and fr is not None:
                n = match_features(fq, fr, cfg, delf=_state["delf"])["inliers"]
        out.append((qid, lid, rid, n))
    return out


META_KEY = b"glr.verify"  # Parquet key-value metadata of the inliers table written by `verify`


def settings_fingerprint(data_dir: str | os.PathLike, config, match_cfg: MatchConfig) -> tuple[dict, str]:
    """(settings, short hash) of everything a pair's inlier count depends on besides the pair itself.

    Extractor and its relevant config, matching/RANSAC config (ratio, mutual, model, method,
    threshold, iterations, confidence, seed) and the competition folder the ids are resolved in.
    Which pairs are planned (candidates, k, refs, shard) is not part of it: rows are keyed by pair.
    """
    settings = {"v": 1, "features": config.relevant(), "match": dataclasses.asdict(match_cfg),
                "data_dir": str(Path(data_dir).resolve())}
    blob = json.dumps(settings, sort_keys=True, default=list)
    return json.loads(blob), hashlib.sha1(blob.encode()).hexdigest()


def _parts_dir(out: Path, fingerprint: str) -> Path:
    return out.parent / f".{out.name}.parts-{fingerprint[:10]}"


def table_settings(path: str | os.PathLike) -> dict | None:
    """The settings record `verify` stored in an inliers table's metadata (None: none, or unreadable)."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
        return json.loads(raw) if raw else None
    except Exception:  # not Parquet, truncated, not ours: treated as "no reusable table"
        return None


def _reusable_rows(out: Path, fingerprint: str) -> pd.DataFrame | None:
    """Rows of an existing `out` written by `verify` with the same settings, else None."""
    from submissions.tables import read_inliers

    if not out.is_file():
        return None
    info = table_settings(out)
    if not info or info.get("fingerprint") != fingerprint:
        return None  # other settings (or not written by verify): its counts do not apply
    try:
        return read_inliers(out)
    except UserError as e:
        warnings.warn(f"{out}: existing table not reused ({e}); its pairs are recomputed", stacklevel=3)
        return None


def _write_table(table: pd.DataFrame, out: Path, record: dict) -> None:
    """Write the inliers table atomically with `record` (settings, fingerprint, counts) in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from submissions.files import atomic_path
    from submissions.tables import validate_inliers

    t = pa.Table.from_pandas(validate_inliers(table), preserve_index=False)
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), META_KEY: json.dumps(record, sort_keys=True).encode()})
    with atomic_path(out, suffix=".parquet") as tmp:
        pq.write_table(t, tmp)


def _read_parts(parts: Path) -> pd.DataFrame:
    frames = []
    for p in sorted(parts.glob("chunk-*.parquet")):
        try:
            frames.append(pd.read_parquet(p))
        except Exception:  # cannot happen with atomic writes, but never let one file block a resume
            warnings.warn(f"{p}: unreadable part file ignored (its pairs are recomputed)", stacklevel=2)
    if not frames:
        return pd.DataFrame({"id": pd.Series(dtype=str), "landmark_id": pd.Series(dtype="int64"),
                             "ref_id": pd.Series(dtype=str), "inliers": pd.Series(dtype="int32")})
    return pd.concat(frames, ignore_index=True).drop_duplicates(["id", "landmark_id", "ref_id"], keep="last")


def verify(preds: str | os.PathLike | pd.DataFrame, data_dir: str | os.PathLike, out: str | os.PathLike, *,
           extractor: str = "sift", candidates: int = 3, k: int = 3, refs: str = "random",
           embeddings: str | os.PathLike | None = None, ref_embeddings: str | os.PathLike | None = None,
           workers: int = 1, shard: str | tuple[int, int] | None = None, cache_dir: str | os.PathLike | None = None,
           seed: int = 0, max_side: int | None = None, n_features: int | None = None,
           delf_handle: str | None = None, ratio: float | None = None, mutual: bool | None = None,
           model: str | None = None, method: str | None = None, threshold: float | None = None,
           chunk_size: int = 64) -> pd.DataFrame:
    """Verify each query's top candidate classes against reference training images; write the inliers table.

    Queries are the ids of `preds` (test split), restricted to `shard` ('i/n' by crc32 of the id).
    Features come from the cache (default `<data_dir>/.glr-features/`), extracted once per image.
    Finished chunks of pairs are kept in `.<out>.parts-<hash>/` next to `out`, so re-running after
    an interruption only computes the missing pairs. An existing `out` written with the same
    settings (`settings_fingerprint`: extractor config, matching/RANSAC config, data folder) lends
    its counts for the pairs of this run's plan, so a re-run, or one with more candidates / queries,
    computes only the pairs not yet counted; with other settings every pair is recomputed. The
    table written holds exactly this run's planned pairs. A query or reference whose image is
    missing or unreadable gets 0 inliers and a warning naming its id (that 0 is reused too: delete
    `out` after fixing images). Returns the table written to `out`, with
    `attrs["computed_pairs"]` and `attrs["reused_pairs"]` (also stored in the table's metadata).
    """
    from pipeline.acquire.competition import Competition
    from pipeline.model.embeddings import read_embeddings
    from pipeline.verify.cache import FeatureCache, default_cache_dir, extract_many, map_chunks
    from pipeline.progress import progress
    from submissions.tables import read_predictions, validate_inliers, validate_predictions, write_inliers

    out = Path(out)
    preds = validate_predictions(preds) if isinstance(preds, pd.DataFrame) else read_predictions(preds)
    comp = Competition(data_dir)
    config = make_config(extractor, max_side=max_side, n_features=n_features, handle=delf_handle)
    mcfg = match_config(ratio=ratio, mutual=mutual, model=model, method=method, threshold=threshold, seed=seed)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(data_dir)
    shard_t = parse_shard(shard)
    if shard_t is not None:
        preds = preds[preds["id"].isin(in_shard(preds["id"].unique(), shard_t))]
    emb = read_embeddings(embeddings) if embeddings else None
    remb = read_embeddings(ref_embeddings) if ref_embeddings else None
    plan = plan_pairs(preds, comp.train, candidates=candidates, k=k, refs=refs, seed=seed, embeddings=emb,
                      ref_embeddings=remb)

    settings, fingerprint = settings_fingerprint(comp.root, config, mcfg)
    parts = _parts_dir(out, fingerprint)
    done = _read_parts(parts)
    previous = _reusable_rows(out, fingerprint)
    if previous is not None and len(previous):  # a finished run with the same settings: keep its counts
        done = pd.concat([previous, done], ignore_index=True).drop_duplicates(["id", "landmark_id", "ref_id"],
                                                                               keep="last")
    done_keys = set(zip(done["id"], done["landmark_id"], done["ref_id"]))
    todo = plan[np.array([t not in done_keys for t in zip(plan["id"], plan["landmark_id"], plan["ref_id"])], bool)]

    # 1. features, once per image (cached on disk; shared by all pairs and all runs)
    qids = todo["id"].unique().tolist()
    rids = todo["ref_id"].unique().tolist()
    qcache, rcache = FeatureCache(cache_dir, config, "test", 0), FeatureCache(cache_dir, config, "train", 0)
    bad_q = extract_many(cache_dir, config, "test", [(i, comp.image_path(i, "test")) for i in qids
                                                     if not qcache.path(i).exists()],
                         workers=workers, desc="query features")
    bad_r = extract_many(cache_dir, config, "train", [(i, comp.image_path(i, "train")) for i in rids
                                                      if not rcache.path(i).exists()],
                         workers=workers, desc="reference features")
    for i, err in bad_q.items():
        warnings.warn(f"query {i}: 0 inliers ({err})", stacklevel=2)
    for i, err in bad_r.items():
        warnings.warn(f"reference {i}: 0 inliers ({err})", stacklevel=2)

    # 2. matching, chunked by query (queries sorted by their top class so chunks share references)
    if len(todo):
        first_class = preds[preds["rank"] == preds.groupby("id")["rank"].transform("min")].set_index("id")["landmark_id"]
        order = todo.assign(_c=todo["id"].map(first_class)).sort_values(["_c", "id"], kind="stable")
        tuples = list(zip(order["id"], order["landmark_id"].astype(int), order["ref_id"]))
        chunks, cur = [], []
        for i, t in enumerate(tuples):  # never split one query's pairs across chunks
            if len(cur) >= chunk_size and t[0] != cur[-1][0]:
                chunks.append(cur)
                cur = []
            cur.append(t)
        if cur:
            chunks.append(cur)
        parts.mkdir(parents=True, exist_ok=True)
        init_args = (str(cache_dir), config, mcfg, list(bad_q), list(bad_r))
        if workers <= 1:
            _init_match_worker(*init_args)
        with map_chunks(_match_chunk, chunks, workers, _init_match_worker, init_args) as results:
            bar = progress(range(len(tuples)), total=len(tuples), desc="verify", unit="pair")
            for rows in results:
                write_inliers(pd.DataFrame(rows, columns=["id", "landmark_id", "ref_id", "inliers"]),
                              parts / f"chunk-{uuid.uuid4().hex}.parquet")
                for _ in rows:
                    next(bar, None)
        fresh = _read_parts(parts)
        done = pd.concat([done, fresh], ignore_index=True).drop_duplicates(["id", "landmark_id", "ref_id"],
                                                                            keep="last")

    result = plan.merge(done, on=["id", "landmark_id", "ref_id"], how="left", validate="one_to_one")
    if result["inliers"].isna().any():  # cannot happen: every planned pair was computed above
        raise RuntimeError("internal error: some planned pairs have no inlier count")
    result = validate_inliers(result)
    stats = {"computed_pairs": int(len(todo)), "reused_pairs": int(len(plan) - len(todo))}
    _write_table(result, out, {"fingerprint": fingerprint, "settings": settings, **stats})
    if parts.exists():
        shutil.rmtree(parts, ignore_errors=True)
    result.attrs.update(stats)
    return result


def merge(parts: list[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Join shard outputs of `glr verify --shard` into one inliers table (a pair seen twice: last wins)."""
    from submissions.tables import read_inliers, write_inliers

    if not parts:
        raise UserError("glr merge: give at least one inliers table to merge")
    frames = [read_inliers(p) for p in parts]
    table = pd.concat(frames, ignore_index=True).drop_duplicates(["id", "landmark_id", "ref_id"], keep="last")
    table = table.sort_values(["id", "landmark_id", "ref_id"], kind="stable").reset_index(drop=True)
    write_inliers(table, out)
    return table
