"""pipeline.parallel: bounded thread map, process chunk map, crc32 shards."""
from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest

from pipeline.parallel import bounded_map, in_shard, map_chunks, parse_shard, stable_shard
from submissions.errors import UserError


def test_bounded_map_yields_every_result_and_never_queues_more_than_its_window():
    lock, state = threading.Lock(), {"submitted": 0, "done": 0, "max_ahead": 0}

    def items():
        for i in range(200):
            with lock:
                state["submitted"] += 1
                state["max_ahead"] = max(state["max_ahead"], state["submitted"] - state["done"])
            yield i

    def square(i):
        time.sleep(0.0005)
        with lock:
            state["done"] += 1
        return i * i

    assert sorted(bounded_map(square, items(), workers=4, window=8)) == [i * i for i in range(200)]
    assert state["max_ahead"] <= 8 + 1  # the window, plus the item being handed over


def test_bounded_map_stops_when_the_consumer_stops():
    calls = []
    results = bounded_map(lambda i: calls.append(i) or i, range(10_000), workers=2, window=4)
    assert next(results) in range(10)
    results.close()  # pending calls are cancelled; the pool shuts down
    assert len(calls) < 100


def _double(chunk: list[int]) -> list[int]:
    return [2 * x for x in chunk]


@pytest.mark.parametrize("workers", [1, 2])
def test_map_chunks_serial_and_in_processes(workers):
    chunks = [[1, 2], [3], [4, 5, 6]]
    with map_chunks(_double, chunks, workers) as results:
        got = sorted(sum(results, []))
    assert got == [2, 4, 6, 8, 10, 12]


def test_shards_are_stable_and_partition():
    ids = [f"{i:016x}" for i in range(200)]
    assert [stable_shard(i, 4) for i in ids[:5]] == [stable_shard(i, 4) for i in ids[:5]]
    assert stable_shard("abc", 7) == zlib.crc32(b"abc") % 7  # documented: crc32, not hash()
    counts = np.bincount([stable_shard(i, 4) for i in ids], minlength=4)
    assert counts.sum() == 200 and counts.min() > 25
    parts = [in_shard(ids, (i, 4)) for i in range(4)]
    assert sorted(sum(parts, [])) == sorted(ids) and in_shard(ids, None) == ids
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None and parse_shard((0, 2)) == (0, 2)
    for bad in ("4/4", "x", "1-4", "-1/2"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_workers_zero_is_one_per_available_core():
    import os

    from pipeline.parallel import available_cores, resolve_workers

    assert available_cores() == len(os.sched_getaffinity(0))
    assert resolve_workers(0) == available_cores() and resolve_workers(3) == 3
    with pytest.raises(UserError, match="--workers"):
        resolve_workers(-1)


def _thread_settings(chunk):
    """In a worker: (BLAS threads, OpenCV threads, pinned flag, the env TensorFlow reads)."""
    import os

    import cv2
    from threadpoolctl import threadpool_info

    from pipeline.parallel import in_pinned_worker

    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    return [(tuple(blas), cv2.getNumThreads(), in_pinned_worker(), os.environ.get("TF_NUM_INTRAOP_THREADS"))]


def test_workers_and_serial_maps_use_one_blas_and_opencv_thread_and_serial_restores():
    import os

    import cv2
    from threadpoolctl import threadpool_info, threadpool_limits

    from pipeline.parallel import _ONE_THREAD_ENV

    env_before = {k: os.environ.get(k) for k in _ONE_THREAD_ENV}
    with threadpool_limits(limits=2):  # as on a 2-core machine, whatever this one has
        with map_chunks(_thread_settings, [0, 1], 2) as results:
            got = sum(results, [])
        assert got and all(blas and set(blas) == {1} and cv2_n == 1 and pinned and tf == "1"
                           for blas, cv2_n, pinned, tf in got), got
        assert {k: os.environ.get(k) for k in _ONE_THREAD_ENV} == env_before  # set only while spawning
        before_cv2 = cv2.getNumThreads()
        before_blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        with map_chunks(_thread_settings, [0], 1) as results:  # serial: this process, pinned for the map
            [[(blas, cv2_n, pinned, _)]] = list(results)
        assert set(blas) == {1} and cv2_n == 1 and not pinned  # TensorFlow here is not reconfigured
        assert cv2.getNumThreads() == before_cv2  # restored after the map
        assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before_blas

