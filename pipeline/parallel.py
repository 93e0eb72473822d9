"""Parallel maps and sharding, shared by every stage that spreads work over threads or processes.

- `bounded_map`: a thread pool for I/O-bound work (downloads, image checks) that never queues
  more than a window of calls, so a million items never become a million futures.
- `map_chunks`: spawned worker processes for CPU-bound work (feature extraction, matching), with
  one OpenCV/BLAS/TensorFlow thread each (processes are the parallelism: a worker that let BLAS
  use every core would oversubscribe them); the pool is always torn down, even on an interruption.
- `resolve_workers`: the one place where `workers = 0` becomes "one per available core";
  `memory`: the machine's total and available RAM.
- `stable_shard` / `parse_shard` / `in_shard`: split image ids into `i/n` shards by crc32, so
  every machine and every run agrees on which shard an id belongs to.
"""
from __future__ import annotations

import contextlib
import os
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


def memory() -> dict:
    """{"total", "available"} bytes of RAM (/proc/meminfo, else sysconf)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    total = out.get("MemTotal") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"total": total, "available": out.get("MemAvailable", total)}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int) -> int:
    """`workers` processes, 0 meaning one per available core."""
    workers = int(workers)
    if workers < 0:
        raise UserError(f"--workers must be 0 (one per core) or more, got {workers}")
    return workers or available_cores()


# environment of spawned workers, read by BLAS/OpenMP/TensorFlow when they load (before any initializer runs)
_ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "BLIS_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1",
                   "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
_pinned = False  # True in a spawned worker: one thread per library (TensorFlow reads it, pipeline.verify.features)
_limits = None  # threadpoolctl's limiter, kept alive for the worker's lifetime


def in_pinned_worker() -> bool:
    """Whether this process is a `map_chunks` worker pinned to one thread per library."""
    return _pinned


def init_single_thread_worker() -> None:
    """Each worker process: one OpenCV thread and one BLAS/OpenMP thread (processes are the parallelism)."""
    global _pinned, _limits
    import cv2
    import numpy  # noqa: F401 - load BLAS first, so that threadpoolctl sees it
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(1)
    _limits = threadpool_limits(limits=1)
    _pinned = True


def _worker_init(initializer: Callable | None, initargs: tuple) -> None:
    init_single_thread_worker()
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """In this process, for the duration: one OpenCV thread and one BLAS thread (restored after)."""
    import cv2
    from threadpoolctl import threadpool_limits

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        cv2.setNumThreads(before)


@contextlib.contextmanager
def _one_thread_env() -> Iterator[None]:
    """os.environ with the one-thread variables while workers are spawned (they inherit it), restored after."""
    saved = {k: os.environ.get(k) for k in _ONE_THREAD_ENV}
    os.environ.update(_ONE_THREAD_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def map_chunks(fn: Callable, chunks: list, workers: int, initializer: Callable | None = None,
               initargs: tuple = ()) -> Iterator[Iterator]:
    """Yield the results of `fn` over `chunks`: in order in this process when `workers` is 1 (or there is
    one chunk), else as they finish in spawned processes (OpenCV's and BLAS's thread pools are not
    fork-safe); `workers` 0 = one per available core, never more than there are chunks. Every worker,
    and this process while it maps serially, uses one OpenCV and one BLAS thread, and is set up by
    `initializer(*initargs)`; the pool is terminated on exit, error or interruption."""
    workers = min(resolve_workers(workers), max(1, len(chunks)))
    if workers <= 1:
        with single_threaded():
            if initializer is not None:
                initializer(*initargs)
            yield map(fn, chunks)
        return
    import multiprocessing as mp

    with _one_thread_env():
        pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(initializer, initargs))
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
