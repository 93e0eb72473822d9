"""The `glr run --dry-run` plan for a GLDv2-shaped competition, and whether it fits 24 GB RAM / 500 GB disk.

Builds a competition folder with GLDv2's shape and no images (the plan reads only the CSVs):
train.csv with 1,580,470 rows of 16-hex ids over 81,313 classes with long-tailed sizes
(lognormal, median ≈ 9, largest class 6,272, as GLDv2's), and a 117,577-row
sample_submission.csv. Then plans the default config (three backbones at 96 px, final_fit =
all, local validation capped at 100,000 queries) for a machine with 24 GB of RAM and 500 GB of
free disk, and, if it does not fit, the plan with the option the planner names. Writes the
"gldv2-plan" section of RESULTS.md.

    .venv/bin/python benchmarks/gldv2_plan.py [--out /tmp/gldv2-plan]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import write_section  # noqa: E402
from pipeline.caches import human_bytes  # noqa: E402
from pipeline.run.costs import GB, Limits, dry_run  # noqa: E402

ROWS, CLASSES, TEST, MAX_CLASS = 1_580_470, 81_313, 117_577, 6_272
LIMITS = Limits(ram=24 * GB, ram_available=24 * GB, run_free=500 * GB, cache_free=500 * GB, same_disk=True)


def class_sizes(seed: int = 0) -> np.ndarray:
    """81,313 long-tailed class sizes summing to 1,580,470, median ≈ 9, max 6,272, min 2."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.rint(rng.lognormal(np.log(9), 1.25, CLASSES)), 2, MAX_CLASS).astype(np.int64)
    sizes[np.argmax(sizes)] = MAX_CLASS
    while (diff := ROWS - int(sizes.sum())) != 0:  # nudge random non-maximal classes to the exact total
        idx = rng.choice(np.flatnonzero((sizes > 2) & (sizes < MAX_CLASS)), min(abs(diff), CLASSES // 2),
                         replace=False)
        sizes[idx] += int(np.sign(diff))
    return sizes


def build(out: Path) -> dict:
    """The competition folder (CSVs only); returns its shape."""
    comp = out / "comp"
    comp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    sizes = class_sizes()
    lids = np.sort(rng.choice(203_094, CLASSES, replace=False))  # GLDv2's landmark ids go up to 203,093
    ids = np.char.mod("%016x", rng.choice(2 ** 62, ROWS + TEST, replace=False)).astype(str)
    pd.DataFrame({"id": ids[:ROWS], "landmark_id": np.repeat(lids, sizes)}).sample(frac=1, random_state=0) \
        .to_csv(comp / "train.csv", index=False)
    pd.DataFrame({"id": ids[ROWS:], "landmarks": ""}).to_csv(comp / "sample_submission.csv", index=False)
    return {"rows": ROWS, "classes": CLASSES, "test": TEST, "median": float(np.median(sizes)),
            "max": int(sizes.max()), "min": int(sizes.min())}


def plan(out: Path, options: tuple[str, ...] = ()) -> tuple[dict, list[str], float]:
    """The dry-run plan of the default config with `options` ("[section] key = value") set."""
    sections: dict[str, list[str]] = {"run": ['root = "runs"'], "data": ['data_dir = "comp"']}
    for opt in options:
        section, assignment = opt[1:].split("] ", 1)
        sections.setdefault(section, []).append(assignment)
    (out / "glr.toml").write_text("".join(f"[{k}]\n" + "".join(f"{a}\n" for a in v) for k, v in sections.items()))
    lines: list[str] = []
    t0 = time.perf_counter()
    result = dry_run(out / "glr.toml", limits=LIMITS, echo=lines.append)
    return result, lines, time.perf_counter() - t0


def _table(result: dict, lines: list[str], seconds: float) -> str:
    text = "\n".join(lines).replace(str(result["run_dir"]), "runs/glr").replace(str(result["cache_dir"]),
                                                                                  "comp/.glr-cache")
    return f"```\n{text}\n```\n\nPlanned in {seconds:.1f} s (the plan reads train.csv's landmark_id column only)."


def _totals(result: dict) -> str:
    t = result["totals"]
    return (f"Total: {t['seconds'] / 3600:.0f} h of compute on this 2-core machine, "
            f"{human_bytes(t['disk_run_bytes'] + t['disk_cache_bytes'])} of disk "
            f"({human_bytes(t['disk_cache_bytes'])} of it shared cache), peak RAM {human_bytes(t['ram_bytes'])} "
            f"({t['ram_stage']}).")


def scenario(out: Path, title: str, options: tuple[str, ...] = ()) -> list[str]:
    """One config's plan, its verdict, and (when it does not fit) the plan with the first option named."""
    result, lines, secs = plan(out, options)
    print("\n".join(lines))
    body = ["", f"### {title}", "", _table(result, lines, secs), "", _totals(result), ""]
    if result["fits"]:
        return body + ["**It fits** a machine with 24 GB RAM and 500 GB disk."]
    fixes = result["fixes"]
    body.append(f"**It does not fit**; any one of these makes it fit: {'; '.join(fixes) or 'none of the single changes tried'}.")
    if fixes:
        fixed, fixed_lines, fixed_secs = plan(out, options + (fixes[0],))
        print("\n".join(fixed_lines))
        body += ["", f"#### {title}, with {fixes[0]}", "", _table(fixed, fixed_lines, fixed_secs), "", _totals(fixed),
                 "", f"**{'It fits' if fixed['fits'] else 'It still does not fit'}** with `{fixes[0]}`."]
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/gldv2-plan", help="Folder for the CSV-only competition and configs.")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    shape = build(out)
    print(f"built {out / 'comp'} in {time.perf_counter() - t0:.1f} s: {shape}")
    body = [
        f"A GLDv2-shaped competition (CSV only, no images): {shape['rows']:,} training rows, "
        f"{shape['classes']:,} classes (median {shape['median']:.0f} images per class, max {shape['max']:,}, "
        f"min {shape['min']}), {shape['test']:,} test ids. The default config: vgg16, vgg19 and resnet50 at "
        "96 px, final_fit = all, local validation capped at 100,000 queries, verification with SIFT "
        "(3 candidates × 3 references). Limits: a machine with 24 GB of RAM and 500 GB of free disk "
        "(run folder and cache on it). Times use the stored rates (2 cores, bf16 CPU); disk is "
        "what the run adds, caches assumed empty. `images` is the images a stage reads (training: "
        "the selected images; verify: queries + distinct references).",
    ]
    body += scenario(out, "Default config (3 backbones, 96 px)")
    body += scenario(out, "The same at 224 px (a config that does not fit)", ("[train] image_size = 224",))
    write_section("gldv2-plan", "\n".join(body), "python benchmarks/gldv2_plan.py")


if __name__ == "__main__":
    main()
