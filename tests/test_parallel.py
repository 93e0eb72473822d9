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
