"""Verify workers and the local-feature cache at real size: CPU per worker with BLAS pinned or not, and
bytes per image / inlier counts of the compact cache entries.

    .venv/bin/python benchmarks/verify_workers.py [--before d7f1bae] [--photos ../shared/realphotos-dev] [--write]

1. Workers. A synthetic competition (`glr synth`: 20 landmarks × 30 photos, 200 test queries,
   512-px JPEGs) and top-3 predictions per query; `verify` with candidates 3 × k 3 (= 1,800
   pairs), features already cached (a first run fills the cache), so the timed run is matching
   and RANSAC only. Each configuration runs in a fresh process that calls `verify` and reports
   its wall time and CPU seconds (`resource.getrusage`: RUSAGE_SELF for the main process,
   RUSAGE_CHILDREN for the spawned workers, reaped when the pool closes). "Before" is the code
   at `--before` (unpacked with `git archive`; the last revision whose `verify` ran with the old
   schema), where only OpenCV was limited to one thread per worker; "after" is this checkout
   (BLAS pinned with threadpoolctl, OpenCV and TensorFlow to one thread, per worker).
2. Cache. Every photo of `--photos` (real landmark photos, never copied) is extracted once with
   the default RootSIFT settings; every pair is matched with the default settings three times:
   from the extracted float32 features, from the old cache's form (float16 descriptors,
   renormalised) and from the new one (uint8 descriptors, uint16 locations). Bytes per image:
   the old entry (npz: float32 locations, float16 descriptors, float32 scales and scores) and
   the new one, as written.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

DRIVER = r'''
import json, os, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import pipeline
from pipeline.verify.inliers import verify

preds, comp, cache, out, workers = sys.argv[1:6]
kw = dict(candidates=3, k=3, cache_dir=cache, workers=int(workers), threshold=12.0)
if sys.argv[6] == "warm":
    verify(preds, comp, out + ".warm.parquet", **kw)
def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
s0, c0, t0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
res = verify(preds, comp, out, **kw)
table = res[0] if isinstance(res, tuple) else getattr(res, "table", res)
print(json.dumps({"wall": time.perf_counter() - t0, "self_cpu": cpu(resource.RUSAGE_SELF) - s0,
                  "children_cpu": cpu(resource.RUSAGE_CHILDREN) - c0, "pairs": int(len(table)),
                  "inliers": int(table["inliers"].sum()), "code": os.path.dirname(pipeline.__file__)}))
'''


def make_inputs(tmp: Path) -> tuple[Path, Path]:
    """The synthetic competition and its top-3 predictions (the true class first for landmark queries)."""
    import numpy as np
    import pandas as pd

    from pipeline.acquire.synth import make_competition
    from submissions.tables import write_predictions

    comp = tmp / "comp"
    make_competition(comp, seed=0, landmarks=20, per_landmark=30, test=200, size=512)
    classes = sorted(pd.read_csv(comp / "train.csv")["landmark_id"].unique())
    sol = pd.read_csv(comp / "solution.csv", dtype=str, keep_default_na=False)
    rng, rows = np.random.default_rng(0), []
    for qid, cell in zip(sol["id"], sol["landmarks"]):
        truth = int(cell.split()[0]) if cell.strip() else None
        cands = ([truth] if truth is not None else []) + [c for c in rng.permutation(classes) if c != truth]
        rows += [(qid, int(c), 1.0 - 0.1 * r, r) for r, c in enumerate(cands[:3])]
    preds = tmp / "preds.parquet"
    write_predictions(pd.DataFrame(rows, columns=["id", "landmark_id", "score", "rank"]), preds)
    return comp, preds


def run_driver(code_dir: Path, tmp: Path, comp: Path, preds: Path, cache: Path, workers: int, warm: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    out = tmp / f"out-{code_dir.name}-{workers}-{time.monotonic_ns()}.parquet"
    r = subprocess.run([PYTHON, "-c", DRIVER, str(preds), str(comp), str(cache), str(out), str(workers),
                        "warm" if warm else "timed"], capture_output=True, text=True, env=env, cwd=tmp)
    if r.returncode:
        raise SystemExit(f"driver failed ({code_dir}):\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(res["code"]).resolve() == (code_dir / "pipeline").resolve(), res["code"]
    return res


def workers_part(before: str, repeats: int) -> tuple[list[str], list[dict]]:
    tmp = Path(tempfile.mkdtemp(prefix="glr-verify-workers-"))
    old = tmp / "before"
    old.mkdir()
    archive = subprocess.run(["git", "archive", before], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    comp, preds = make_inputs(tmp)
    rows, results = [], []
    for label, code in ((f"before ({before}: OpenCV pinned, BLAS not)", old), ("after (BLAS, OpenCV, TF pinned)", REPO)):
        cache = tmp / f"cache-{code.name}"
        run_driver(code, tmp, comp, preds, cache, 2, warm=True)  # fills the feature cache
        for workers in (1, 2):
            best = None
            for _ in range(repeats):  # the least disturbed of `repeats` runs (shared machine)
                r = run_driver(code, tmp, comp, preds, cache, workers, warm=False)
                best = r if best is None or r["wall"] < best["wall"] else best
            worker_cpu = best["self_cpu"] if workers == 1 else best["children_cpu"]
            per_worker = worker_cpu / workers
            cores = per_worker / best["wall"]
            results.append({"label": label, "workers": workers, **best, "per_worker_cpu": per_worker,
                            "cores_per_worker": cores})
            rows.append(f"| {label} | {workers} | {best['pairs']:,} | {best['wall']:.1f} | "
                        f"{best['self_cpu']:.1f} | {best['children_cpu']:.1f} | {per_worker:.1f} | {cores:.2f} | "
                        f"{best['inliers']:,} |")
            print(rows[-1], flush=True)
    return rows, results


def old_entry_bytes(f) -> int:
    """Size of the old cache entry (np.savez: float32 locations, float16 descriptors, float32 scales/scores)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, locations=f.locations.astype(np.float32), descriptors=f.descriptors.astype(np.float16),
             scales=f.scales.astype(np.float32), scores=f.scores.astype(np.float32), work_scale=np.float32(1))
    return buf.getbuffer().nbytes


def old_stored_form(f):
    """What the old cache returned: float16 descriptors, renormalised to unit length."""
    import numpy as np

    d = f.descriptors.astype(np.float16).astype(np.float32)
    if len(d):
        d /= np.sqrt(np.einsum("ij,ij->i", d, d))[:, None]
    return f._replace(descriptors=d)


def cache_part(photos: Path) -> tuple[list[str], dict]:
    import cv2
    import numpy as np

    from benchmarks.real_pairs import all_pairs, load_labels, roc_auc
    from pipeline.verify.cache import _CODEC, encode, stored_form
    from pipeline.verify.features import make_config, make_extractor
    from pipeline.verify.matching import match_config, match_features

    cv2.setNumThreads(1)
    lab = load_labels(photos)
    files, labels = lab["file"].tolist(), lab["landmark"].tolist()
    ext = make_extractor(make_config("sift"))
    raw = [ext.extract_path(photos / f) for f in files]
    new_forms = [stored_form(f) for f in raw]
    forms = {"extracted (float32)": raw, "old cache (float16)": [old_stored_form(f) for f in raw],
             "new cache (uint8, uint16 locations)": new_forms,
             "new cache's locations only": [f._replace(locations=g.locations) for f, g in zip(raw, new_forms)]}
    pairs = all_pairs(labels)
    positive = np.array([labels[i] != "" and labels[i] == labels[j] for i, j in pairs])
    cfg = match_config("sift")
    counts, tentative = {}, {}
    for name, feats in forms.items():
        res = [match_features(feats[i], feats[j], cfg) for i, j in pairs]
        counts[name] = np.array([r["inliers"] for r in res])
        tentative[name] = [r["matches"] for r in res]
        print(name, "AUC", round(roc_auc(counts[name], positive), 4), flush=True)
    t_ref, t_new = tentative["extracted (float32)"], tentative["new cache (uint8, uint16 locations)"]
    t_changed = sum(not np.array_equal(a, b) for a, b in zip(t_ref, t_new))
    t_diff = float(np.mean([abs(len(a) - len(b)) for a, b in zip(t_ref, t_new)]))
    t_mean = float(np.mean([len(a) for a in t_ref]))
    old_b = np.mean([old_entry_bytes(f) for f in raw])
    new_b = np.mean([len(encode(f, _CODEC["sift"])) for f in raw])
    kp = np.mean([f.n for f in raw])
    max_comp = max(float(f.descriptors.max()) for f in raw if f.n)
    ref, old, new, _ = (counts[k] for k in forms)
    rows = [f"| {name} | {roc_auc(c, positive):.4f} | {int(c.sum()):,} | {int((c != ref).sum())} | "
            f"{int(np.abs(c - ref).max())} | {int((c != old).sum())} |" for name, c in counts.items()]
    info = {"photos": len(files), "pairs": len(pairs), "positives": int(positive.sum()), "old_bytes": old_b,
            "new_bytes": new_b, "keypoints": kp, "max_component": max_comp,
            "new_vs_old_max": int(np.abs(new - old).max()), "new_vs_old_mean": float(np.abs(new - old).mean()),
            "t_changed": t_changed, "t_diff": t_diff, "t_mean": t_mean,
            "new_vs_ref_mean": float(np.abs(new - ref).mean()),
            "total_change": float(new.sum() / ref.sum() - 1)}
    return rows, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="d7f1bae", help="revision whose verify is the 'before' (git archive)")
    ap.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "realphotos-dev")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = ap.parse_args()

    w_rows, w_res = workers_part(args.before, args.repeats)
    c_rows, c = cache_part(args.photos)
    after2 = next(r for r in w_res if r["workers"] == 2 and r["label"].startswith("after"))
    before2 = next(r for r in w_res if r["workers"] == 2 and r["label"].startswith("before"))
    load = os.getloadavg()[0]
    body = "\n".join([
        "## verify-workers (issue 11: workers pinned to one thread, compact local-feature cache)",
        "",
        f"**Workers** — 1,800 pairs of a synthetic competition (`glr synth`, 512-px JPEGs; candidates 3 × k 3 for "
        "200 queries), features already cached, so the timed run is matching + RANSAC. CPU seconds from "
        "`getrusage` (main process; spawned workers, reaped when the pool closes); cores per worker = worker CPU "
        f"/ workers / wall (the wall includes starting the workers). Best wall of {args.repeats} runs each; the "
        f"machine (2 cores) is shared with other jobs (load average {load:.1f} at the end), which caps every "
        "process's share of a core: the CPU seconds are the steadier figures, and cores per worker is a bound "
        "here, not what an idle machine would show for the unpinned code.",
        "",
        "| code | workers | pairs | wall s | main CPU s | workers' CPU s | CPU s per worker | cores per worker | "
        "total inliers |",
        "|---|---|---|---|---|---|---|---|---|",
        *w_rows,
        "",
        f"With 2 workers each worker now uses {after2['cores_per_worker']:.2f} cores' worth of CPU "
        f"(before: {before2['cores_per_worker']:.2f}) and {after2['per_worker_cpu']:.1f} CPU s "
        f"(before: {before2['per_worker_cpu']:.1f}); wall {after2['wall']:.1f} s (before: {before2['wall']:.1f} s). "
        "Workers = 1 runs in the main process (BLAS pinned there for the map's duration now). The total inliers "
        "differ between before and after because the cache stores descriptors differently (below).",
        "",
        f"**Cache entries** — {c['photos']} real landmark photos ({c['pairs']:,} pairs, {c['positives']} of the "
        f"same landmark), default RootSIFT ({c['keypoints']:.0f} keypoints per photo on average), every pair "
        "matched with the default settings from each form of the features:",
        "",
        "| features | ROC AUC | total inliers | pairs ≠ extracted | max abs diff | pairs ≠ old cache |",
        "|---|---|---|---|---|---|",
        *c_rows,
        "",
        f"The ranking is unchanged (AUC above); total inliers {100 * c['total_change']:+.2f}% against the extracted "
        f"features, mean |difference| {c['new_vs_ref_mean']:.3f} inliers per pair (vs the old cache: mean "
        f"{c['new_vs_old_mean']:.3f}, max {c['new_vs_old_max']}). Where counts differ: the uint16 locations alone "
        "change almost nothing (last row); the uint8 descriptors move ratio-test decisions at the margin — "
        f"the tentative matches of {c['t_changed']:,} pairs change, by {c['t_diff']:.2f} matches on average (of "
        f"{c['t_mean']:.0f}) — and a different tentative set draws other seeded RANSAC samples. Largest RootSIFT "
        f"component seen: {c['max_component']:.3f} (the uint8 scale of 512 clips at 0.498). uint16 descriptors "
        "would be closer still at about twice the bytes.",
        "",
        f"Bytes per image: old entry {c['old_bytes'] / 1000:.1f} KB (npz, float16 descriptors, scales and scores "
        f"kept), new {c['new_bytes'] / 1000:.1f} KB (uint16 locations, uint8 descriptors, deflated): "
        f"{c['old_bytes'] / c['new_bytes']:.1f}× smaller. At these keypoint counts, 850k images (the issue's "
        f"~220 GiB default run) take {850_000 * c['new_bytes'] / 2**30:.0f} GiB instead of "
        f"{850_000 * c['old_bytes'] / 2**30:.0f} GiB.",
    ])
    print(body)
    if args.write:
        from benchmarks._results import write_section

        write_section("verify-workers", body, "python benchmarks/verify_workers.py --write")


if __name__ == "__main__":
    main()
