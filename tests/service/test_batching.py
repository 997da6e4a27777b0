"""Size-or-deadline batching: every waiter hears its own result, on failure and on shutdown too."""

from __future__ import annotations

import asyncio
import random

import pytest

from service.batching import Batcher
from service.errors import Overloaded, Unavailable
from service.settings import BatchingSettings


async def test_results_reach_their_own_callers_in_batches_of_at_most_the_limit():
    sizes = []

    async def double(items):
        sizes.append(len(items))
        await asyncio.sleep(random.random() / 1000)
        return [item * 2 for item in items]

    batcher = Batcher("t", double, BatchingSettings(max_batch_size=4, max_batch_wait_us=1000))
    batcher.start()
    payloads = random.Random(1).sample(range(10_000), 50)
    results = await asyncio.gather(*(batcher.submit(p) for p in payloads))
    assert results == [p * 2 for p in payloads]
    assert max(sizes) <= 4 and sum(sizes) == 50 and max(sizes) > 1
    await batcher.stop()


async def test_a_failed_batch_fails_every_waiter():
    async def broken(items):
        raise RuntimeError("runtime fell over")

    batcher = Batcher("t", broken, BatchingSettings(max_batch_size=8, max_batch_wait_us=5000))
    batcher.start()
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    await batcher.stop()


async def test_stop_finishes_what_the_collector_holds_and_then_refuses():
    async def double(items):
        return [item * 2 for item in items]

    batcher = Batcher("t", double, BatchingSettings(max_batch_size=8, max_batch_wait_us=300_000))
    batcher.start()
    waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0.02)  # taken by the collector, which waits for more
    await batcher.stop()
    assert [await w for w in waiting] == [0, 2, 4]
    with pytest.raises(Unavailable, match="not accepting steps"):
        await batcher.submit(9)


async def test_a_full_queue_is_resource_exhausted():
    release = asyncio.Event()

    async def slow(items):
        await release.wait()
        return items

    batcher = Batcher("t", slow, BatchingSettings(max_batch_size=1, max_queue=2, max_concurrent_batches=1))
    batcher.start()
    held = [asyncio.ensure_future(batcher.submit(0))]
    await asyncio.sleep(0.01)  # step 0 computing (and holding the only batch slot)
    held += [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]  # two queued: the queue is full
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="back off and retry"):
        await batcher.submit(99)
    release.set()
    try:
        assert await asyncio.gather(*held) == [0, 1, 2]
    finally:
        await batcher.stop()


async def test_a_group_larger_than_a_batch_is_split_and_each_part_answers_its_own_items():
    sizes = []

    async def double(items):
        sizes.append(len(items))
        return [item * 2 for item in items]

    batcher = Batcher("t", double, BatchingSettings(max_batch_size=4, max_batch_wait_us=0))
    batcher.start()
    landed: dict[int, int] = {}
    parts = []

    def done(first, results):
        parts.append((first, len(results)))
        landed.update(zip(range(first, first + len(results)), results, strict=True))

    batcher.put_many(list(range(10)), done)
    batcher.put(100, lambda result: landed.update({100: result}))
    for _ in range(100):
        if len(landed) == 11:
            break
        await asyncio.sleep(0.005)
    await batcher.stop()
    assert landed == {**{i: 2 * i for i in range(10)}, 100: 200}
    assert parts == [(0, 4), (4, 4), (8, 2)] and max(sizes) == 4
    assert sizes[-1] == 3  # the group's tail went first; the step queued after it shared its batch


async def test_a_group_that_overflows_the_queue_is_refused_only_for_what_does_not_fit():
    release = asyncio.Event()

    async def slow(items):
        await release.wait()
        return items

    batcher = Batcher("t", slow, BatchingSettings(max_batch_size=1, max_queue=3, max_concurrent_batches=1))
    batcher.start()
    held = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)  # step 0 computing (and holding the only batch slot)
    landed: dict[int, object] = {}
    batcher.put_many(["a", "b", "c", "d", "e"], lambda first, results: landed.update(enumerate(results, first)))
    assert set(landed) == {3, 4} and all(isinstance(landed[i], Overloaded) for i in (3, 4))  # at once
    release.set()
    for _ in range(100):
        if len(landed) == 5:
            break
        await asyncio.sleep(0.005)
    await batcher.stop()
    assert await held == 0
    assert [landed[i] for i in range(3)] == ["a", "b", "c"]
