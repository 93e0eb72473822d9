"""Peak RSS and images/s of `glr predict` with an 81,313-class head (GLDv2's class count), by test-set size.

    .venv/bin/python benchmarks/predict_memory.py [--images 1000 10000] [--size 32] [--backbone vgg16]
        [--old /tmp/old --old-images 1000 2000] [--write]

Builds a run folder (an untrained `--backbone` with an 81,313-class head at `--size` px: model.keras,
labels.json, manifest.json, what `load_run_model` reads) and a competition whose train.csv has one row
per class and whose test set is `max(--images)` placeholder JPEGs (only paths and decoding matter
here). Each size runs in a fresh subprocess — `pipeline.model.predict.predict`, what `glr predict`
runs, with `--top-k 5`, `--batch-size 64` and `--embeddings` on — and its peak RSS comes from the
kernel (`os.wait4` → ru_maxrss of that child). images/s is predict's own figure (decode + inference
+ top-k, model loading excluded).

`--old PATH` measures a checkout of an earlier commit the same way (e.g. the code before streaming:
`git worktree add /tmp/old 553373d`; never stash in the shared tree). The old code holds the full
probability matrix several times over (~1.8 MB per image at 81k classes), so keep `--old-images`
small on a shared machine: 10,000 images would need ~18 GB.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

CLASSES = 81_313
CHILD = """
import json, sys
from pipeline.model.predict import predict
r = predict(sys.argv[1], sys.argv[2], out=sys.argv[3], top_k=5, batch_size=64, embeddings=sys.argv[4])
print(json.dumps(r.stats()))
"""


def build_run(run: Path, backbone: str, size: int) -> None:
    """A run folder predict accepts: an untrained model with an 81,313-class head and its label map."""
    from pipeline.model.backbones import build_model

    run.mkdir(parents=True)
    build_model(backbone, CLASSES, size, "none").save(run / "model.keras")
    (run / "labels.json").write_text(json.dumps({str(i): i for i in range(CLASSES)}))
    (run / "manifest.json").write_text(json.dumps({"backbone": backbone, "image_size": size}))


def build_competition(comp: Path, images: int, size: int) -> list[str]:
    """train.csv with one image per class; `images` test JPEGs (one noise image, many paths)."""
    from PIL import Image

    from pipeline.acquire.competition import hashed_relpath

    rng = np.random.default_rng(0)
    comp.mkdir(parents=True)
    train_ids = [f"{rng.integers(1 << 63):016x}" for _ in range(CLASSES)]
    pd.DataFrame({"id": train_ids, "landmark_id": np.arange(CLASSES)}).to_csv(comp / "train.csv", index=False)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    ids = [f"{i:016x}" for i in range(images)]
    for i in ids:
        p = comp / "test" / hashed_relpath(i)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(buf.getvalue())
    return ids


def measure(code: Path, run: Path, comp: Path, ids: list[str], n: int, work: Path) -> dict:
    """Predict the first `n` test images with the code at `code` in a fresh process: its peak RSS and stats."""
    pd.DataFrame({"id": ids[:n], "landmarks": ""}).to_csv(comp / "sample_submission.csv", index=False)
    env = {**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "2"}
    out, emb = work / f"p{n}.parquet", work / f"e{n}.npy"
    log_out, log_err = work / "stdout.txt", work / "stderr.txt"
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(run), str(comp), str(out), str(emb)], cwd=code,
                             env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage: its peak RSS
    p.returncode = os.waitstatus_to_exitcode(status)
    text, err = log_out.read_text(), log_err.read_text()
    if p.returncode != 0:
        raise SystemExit(f"predict of {n} images with {code} failed:\n{err[-3000:]}")
    stats = json.loads(text.strip().splitlines()[-1])
    rows = len(pd.read_parquet(out))
    assert rows == 5 * n, (rows, n)
    for f in (out, emb, emb.with_name(emb.stem + ".ids.txt")):
        f.unlink()
    return {"images": n, "peak_rss_mb": usage.ru_maxrss / 1024, "images_per_s": stats["images_per_s"],
            "cpu_s": usage.ru_utime + usage.ru_stime}


def describe(args, rows: list[dict], table: list[str]) -> str:
    """The section's text: the setup, the table, the spread after and the growth per image before."""
    after = [r for r in rows if r["code"] == "after"]
    before = sorted((r for r in rows if r["code"] == "before"), key=lambda r: r["images"])
    old = ""
    if args.old is not None:
        rev = subprocess.run(["git", "-C", str(args.old), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        old = f" (commit {rev})" if rev else ""
    text = (f"{args.backbone}, untrained, {args.size} px, top-k 5, batch 64, embeddings on; each size in a fresh "
            "process (peak RSS from the kernel, images/s from predict: decode + inference + top-k, on a machine "
            "shared with other jobs, so images/s is indicative only; process CPU s, the child's user + system "
            "time including start-up and model loading, is steadier). "
            f"before{old} = the code that kept every batch's N×C probabilities and took top-k at the end; "
            "after = top-k inside the compiled step, embeddings streamed to a memory-mapped .npy.\n\n"
            + "\n".join(table))
    if after:
        spread = max(r["peak_rss_mb"] for r in after) - min(r["peak_rss_mb"] for r in after)
        text += (f"\n\nAfter: peak RSS spread {spread:,.0f} MB from {min(r['images'] for r in after):,} to "
                 f"{max(r['images'] for r in after):,} images — flat, memory does not grow with images × classes.")
    if len(before) >= 2:
        per = (before[-1]["peak_rss_mb"] - before[0]["peak_rss_mb"]) / (before[-1]["images"] - before[0]["images"])
        text += (f" Before: {per:.2f} MB more per image, i.e. ~{per * 10:.0f} GB at 10,000 images and "
                 f"~{per * 117.577:.0f} GB for GLDv2's ~117k test queries (not run here).")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--old", type=Path, help="a checkout of the code before streaming, measured the same way")
    ap.add_argument("--old-images", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--write", action="store_true", help="write the predict-memory section of RESULTS.md")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="glr-predict-mem-") as tmp:
        work = Path(tmp)
        build_run(work / "run", args.backbone, args.size)
        ids = build_competition(work / "comp", max(args.images + (args.old_images if args.old else [])), args.size)
        rows = []
        for label, code, sizes in (("before", args.old, args.old_images), ("after", ROOT, args.images)):
            if code is None:
                continue
            for n in sizes:
                r = {"code": label, **measure(code.resolve(), work / "run", work / "comp", ids, n, work)}
                print(json.dumps(r), flush=True)
                rows.append(r)
    lines = ["| code | images | peak RSS | images/s | process CPU s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['code']} | {r['images']:,} | {r['peak_rss_mb']:,.0f} MB | {r['images_per_s']:,.0f} | "
              f"{r['cpu_s']:,.0f} |" for r in rows]
    print("\n".join(lines))
    if args.write:
        from benchmarks._results import write_section

        body = ("## predict-memory — `glr predict` peak RSS with an 81,313-class head (issue 11)\n\n"
                + describe(args, rows, lines))
        cmd = "python benchmarks/predict_memory.py " + " ".join(a for a in sys.argv[1:])
        write_section("predict-memory", body, cmd)


if __name__ == "__main__":
    main()
