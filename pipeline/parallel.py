"""Parallel maps and sharding, shared by every stage that spreads work over threads or processes.

- `bounded_map`: a thread pool for I/O-bound work (downloads, image checks) that never queues
  more than a window of calls, so a million items never become a million futures.
- `map_chunks`: spawned worker processes for CPU-bound work (feature extraction, matching), with
  one OpenCV/BLAS thread each; the pool is always torn down, even on an interruption.
- `stable_shard` / `parse_shard` / `in_shard`: split image ids into `i/n` shards by crc32, so
  every machine and every run agrees on which shard an id belongs to.
"""
from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from submissions.errors import UserError

_END = object()


def bounded_map(fn: Callable, items: Iterable, workers: int, window: int | None = None) -> Iterator:
    """Yield `fn(item)` for every item, in completion order, from a thread pool.

    At most `window` (default 4×workers, ≥ 64) calls are queued at once, so a million items
    never become a million futures; pending calls are cancelled if the consumer stops.
    """
    window = window or max(4 * workers, 64)
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="glr") as pool:
        pending: set = set()
        try:
            while True:
                while len(pending) < window:
                    nxt = next(it, _END)
                    if nxt is _END:
                        break
                    pending.add(pool.submit(fn, nxt))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()


def init_single_thread_worker() -> None:
    """Each worker process: one OpenCV/BLAS thread (processes are the parallelism)."""
    import cv2

    cv2.setNumThreads(1)


@contextlib.contextmanager
def map_chunks(fn: Callable, chunks: list, workers: int, initializer: Callable = init_single_thread_worker,
               initargs: tuple = ()) -> Iterator[Iterator]:
    """Yield the results of `fn` over `chunks`: in order in this process when `workers` <= 1, else as
    they finish in `workers` spawned processes (OpenCV's and BLAS's thread pools are not fork-safe),
    each set up by `initializer(*initargs)`; the pool is terminated on exit, error or interruption."""
    if workers <= 1:
        yield map(fn, chunks)
        return
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs)
    try:
        yield pool.imap_unordered(fn, chunks)
    finally:
        pool.terminate()
        pool.join()


def stable_shard(image_id: str, n: int) -> int:
    """Shard of an id: crc32 (stable across runs and machines, unlike Python's hash())."""
    return zlib.crc32(str(image_id).encode("utf-8")) % n


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'i/n' → (i, n) with 0 ≤ i < n, naming the option on error."""
    if shard is None or isinstance(shard, tuple):
        return shard
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise UserError(f"--shard {shard!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {shard!r}: need 0 <= i < n")
    return i, n


def in_shard(ids: Iterable[str], shard: tuple[int, int] | None) -> list[str]:
    """The ids of `ids` that fall in `shard` (all of them when None), in their order."""
    if shard is None:
        return list(ids)
    i, n = shard
    return [x for x in ids if stable_shard(x, n) == i]
