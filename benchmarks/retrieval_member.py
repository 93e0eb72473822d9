"""Does a retrieval member earn its place? `glr demo` (three classifiers + one ArcFace/kNN member, from
scratch) on several seeds: each member's GAP and top-1 accuracy on the local-validation queries, the
ensemble's, and a paired bootstrap of the ensemble against the best single member (`glr gap --compare`).

    .venv/bin/python benchmarks/retrieval_member.py --seeds 0 1 2 [--write]

The validation queries are held out of every model's training (the split models predict them), and
the ensemble has no tuned weights (equal weights): nothing here is fitted on these queries.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_section  # noqa: E402

RESAMPLES = 1000


def one_seed(seed: int, root: Path) -> dict:
    """Run the demo with `seed` in `root`; the figures of its validation part."""
    from pipeline.run.engine import read_manifest
    from submissions.format import write_submission_file
    from submissions.metric import gap_report

    t0 = time.perf_counter()
    glr = Path(sys.executable).with_name("glr")
    res = subprocess.run([str(glr), "demo", "--out", str(root), "--seed", str(seed), "-q"], capture_output=True,
                         text=True)
    if res.returncode != 0:
        sys.exit(f"glr demo --seed {seed} failed:\n{res.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    run = root / "run"
    manifest = read_manifest(run)
    models = [m["name"] for m in manifest["config"]["models"]]
    kinds = {m["name"]: m.get("kind", "classifier") for m in manifest["config"]["models"]}
    solution, sample = run / "localval" / "solution.csv", run / "localval"
    subs = {}
    for name, preds in [(m, run / "preds" / f"{m}.val.parquet") for m in models] + [("ensemble", run / "ens.val.parquet")]:
        subs[name] = root / f"{name}.val.csv"
        write_submission_file(preds, sample, subs[name])
    scores = {n: gap_report(p, solution) for n, p in subs.items()}
    best = max(models, key=lambda m: scores[m]["gap"])
    cmp = gap_report(subs["ensemble"], solution, bootstrap=RESAMPLES, seed=seed, compare=subs[best])["compare"]
    return {"seed": seed, "seconds": seconds, "models": models, "kinds": kinds, "best": best, "compare": cmp,
            "gap": {n: s["gap"] for n, s in scores.items()}, "accuracy": {n: s["accuracy"] for n, s in scores.items()},
            "classes": manifest["stages"]["localval"]["metrics"]["train_classes"],
            "queries": manifest["stages"]["localval"]["metrics"]["queries"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--write", action="store_true", help="update the 'retrieval-member' section of RESULTS.md")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="glr-retrieval-") as tmp:
        for seed in args.seeds:
            r = one_seed(seed, Path(tmp) / f"demo-{seed}")
            rows.append(r)
            c = r["compare"]
            print(f"seed {seed}: " + ", ".join(f"{n} {g:.4f}" for n, g in r["gap"].items())
                  + f"; ensemble vs {r['best']}: {c['delta']:+.4f} [{c['delta_ci'][0]:+.4f}, {c['delta_ci'][1]:+.4f}], "
                  f"p = {c['p_value']:.4f} ({r['seconds']:.0f} s)", flush=True)
    models = rows[0]["models"]
    label = {m: f"{m} (kNN)" if rows[0]["kinds"][m] == "retrieval" else m for m in models}
    body = ["Local-validation queries of `glr demo` (12 landmarks × 30 photos, 64 px, from scratch: three classifiers "
            "and one retrieval member, vgg16 + ArcFace + GeM, 64-D, kNN k = 10 among the split's training images), "
            f"{rows[0]['queries']} queries per seed ({rows[0]['classes']} training classes, so top-1 chance ≈ "
            f"{1 / rows[0]['classes']:.2f} on the landmark queries). GAP (top-1 accuracy on the landmark queries):", "",
            "| seed | " + " | ".join(label[m] for m in models) + " | ensemble (equal weights) | ensemble − best "
            f"member [95% CI], p ({RESAMPLES} paired resamples) |",
            "|---" * (len(models) + 3) + "|"]
    for r in rows:
        c = r["compare"]
        cells = [f"{r['gap'][m]:.4f} ({r['accuracy'][m]:.2f})" for m in models + ["ensemble"]]
        body.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {c['delta']:+.4f} vs {label[r['best']]} "
                    f"[{c['delta_ci'][0]:+.4f}, {c['delta_ci'][1]:+.4f}], p = {c['p_value']:.3f} |")
    body += ["", "p: the share of paired resamples of the queries in which the ensemble does not beat the best single "
             "member (`glr gap ens.csv solution.csv --compare best.csv --bootstrap 1000`). Each demo ran in "
             + ", ".join(f"{r['seconds']:.0f}" for r in rows) + " s on this shared 2-core machine."]
    print("\n".join(body))
    if args.write:
        write_section("retrieval-member", "\n".join(body),
                      "python benchmarks/retrieval_member.py --seeds " + " ".join(map(str, args.seeds)) + " --write")


if __name__ == "__main__":
    main()
