"""Throughput and peak memory of `glr knn`'s exact blocked search, beside a plain numpy matmul.

    .venv/bin/python benchmarks/knn.py [--index 1000000] [--queries 2000] [--dim 512] [--k 20]
        [--blocks 16384 65536] [--query-block 1024] [--full-queries 100000] [--write]

Writes `--index` and `--queries` random unit vectors (float32) as embeddings files (.npy + .ids.txt,
what `glr embed` writes) under a temporary folder, then for each index block size runs
`pipeline.model.knn.search` — what `glr knn` runs before it scores classes — in a fresh
subprocess, reading both files memory-mapped as `glr knn` does. Each child reports its wall time,
CPU time and peak RSS (VmHWM from /proc: its own high-water mark; ru_maxrss would carry the
parent's over the exec); the RSS after imports and opening the files
is reported too, so what the search adds is visible. Beside it, the same child times a plain
numpy matmul of one block's shape (query block × dim × index block, into a reused output buffer as
the search does, best of 3) and the machine's
matmul on one large square-ish product: the ratio says how close the search comes to the BLAS
peak. The issue's size (1M × 100k × 512) is extrapolated linearly in the number of queries from the
measured run (the work per query is the same: one pass over the index).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CHILD = """
import json, sys, time
import numpy as np

def hwm_mb():  # this process's own peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a child inherits)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

from pipeline.model.embeddings import read_embeddings
from pipeline.model.knn import search
qpath, xpath, k, block, qblock = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
_, q = read_embeddings(qpath)
_, x = read_embeddings(xpath)
rss0 = hwm_mb()
c0, t0 = time.process_time(), time.perf_counter()
s, i = search(q, x, k, block_size=block, query_block=qblock)
secs, cpu = time.perf_counter() - t0, time.process_time() - c0
rss1 = hwm_mb()
a = np.asarray(q[:qblock], np.float32)
b = np.asarray(x[:block], np.float32)
buf = np.empty((len(a), len(b)), np.float32)  # into a reused buffer, as the search does: the stricter baseline
c1 = time.process_time()
best = min((lambda t: (np.matmul(a, b.T, out=buf), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(3))
mm_cpu = (time.process_time() - c1) / 3
print(json.dumps({"seconds": secs, "cpu_s": cpu, "rss_before_mb": rss0, "peak_rss_mb": rss1,
                  "block_matmul_s": best, "block_matmul_cpu_s": mm_cpu, "block_flops": 2.0 * len(a) * len(b) * a.shape[1],
                  "flops": 2.0 * len(q) * len(x) * q.shape[1], "check": float(s[:, 0].mean())}))
"""


def make_files(folder: Path, n_index: int, n_queries: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """Random unit vectors as two embeddings files (benchmarks/knn_ann.py's, never all in RAM)."""
    from benchmarks.knn_ann import make_files as make

    return make(folder, "random", n_index, n_queries, dim, cluster_size=1, seed=seed)


def measure(qpath: Path, xpath: Path, k: int, block: int, qblock: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(qpath), str(xpath), str(k), str(block), str(qblock)],
                       capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def square_matmul_gflops(n: int = 4096, dim: int = 512) -> float:
    """The machine's float32 matmul rate on a large product (best of 3), the peak a search can approach."""
    import time

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((n, dim), np.float32), rng.standard_normal((4 * n, dim), np.float32)
    best = min((lambda t: (a @ b.T, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(3))
    return 2.0 * n * 4 * n * dim / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--blocks", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--query-block", type=int, default=1024)
    ap.add_argument("--full-queries", type=int, default=100_000, help="Query count to extrapolate to.")
    ap.add_argument("--write", action="store_true", help="Write the 'knn' section of benchmarks/RESULTS.md.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="glr-knn-bench-") as tmp:
        xpath, qpath = make_files(Path(tmp), args.index, args.queries, args.dim)
        peak = square_matmul_gflops(dim=args.dim)
        rows = []
        for block in args.blocks:
            m = measure(qpath, xpath, args.k, block, args.query_block)
            m["block"] = block
            rows.append(m)
            print(json.dumps(m), flush=True)

    lines = [
        f"Exact cosine kNN (`pipeline.model.knn.search`, what `glr knn` runs), {args.index:,} index × "
        f"{args.queries:,} queries × {args.dim} dims, random unit vectors (float32 files read memory-mapped), "
        f"k = {args.k}, query block {args.query_block} rows; each row a fresh process. Plain numpy matmul of "
        f"a large product on this machine: **{peak:.1f} GFLOP/s**.",
        "",
        "| index block | wall s | CPU s | search GFLOP/s | matmul of one block, GFLOP/s | search / matmul "
        "| same per CPU-second | RSS before search, MB | peak RSS, MB | 1M × 100k extrapolated, min |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in rows:
        rate = m["flops"] / m["seconds"] / 1e9
        block_rate = m["block_flops"] / m["block_matmul_s"] / 1e9
        cpu_ratio = (m["flops"] / m["cpu_s"]) / (m["block_flops"] / m["block_matmul_cpu_s"])
        full_min = m["seconds"] * (args.full_queries / args.queries) * (1_000_000 / args.index) / 60
        lines.append(f"| {m['block']:,} | {m['seconds']:.1f} | {m['cpu_s']:.1f} | {rate:.1f} | {block_rate:.1f} | "
                     f"{rate / block_rate:.2f} | {cpu_ratio:.2f} | {m['rss_before_mb']:.0f} | {m['peak_rss_mb']:.0f} | "
                     f"{full_min:.0f} |")
    body = "\n".join(lines) + (
        "\n\nThe machine is shared (other jobs ran beside it): wall-clock rates are lower bounds, and the "
        "per-CPU-second ratio (GFLOP per CPU-second of the search over that of the block matmul) is the one "
        "contention moves least. "
        "The RSS before the search holds the interpreter, pandas and the index's 1M ids (read by "
        "`read_embeddings`). Peak RSS follows the block (the similarity block is 4 B × query block × index block, cut with "
        "`np.partition` on the first block of each query block), not the index: the index file is read block "
        "by block with plain reads, so its pages stay in the page cache and not in the process. "
        f"The extrapolation to {args.full_queries:,} queries is linear in the queries (each query block is one "
        "pass over the index); the result arrays grow by 12 B × k per query (24 MB at 100k × 20).")
    print(body)
    if args.write:
        from benchmarks._results import write_section

        cmd = "python benchmarks/knn.py " + " ".join(sys.argv[1:]).replace("--write", "").strip()
        write_section("knn", body, cmd.strip() + " --write")


if __name__ == "__main__":
    main()
