"""Size-or-deadline batching: many sessions' steps of one model in one pass through the pipeline.

Steps queue up, alone or in groups (a message of many sessions' steps is one group); a collector takes the
first, then whatever else is queued, up to `max_batch_size` steps, waiting at most `max_batch_wait_us` for
more. A group larger than the room left is split: its tail goes first into the next batch. Up to
`max_concurrent_batches` batches are processed at once, so one batch can compute while the previous one
commits. Each group's results (or exceptions) go to the callback it was put with, one call per batch it
went into; a failing batch hands its exception to every step in it. No task, future or callback per step:
at thousands of steps a second, those are what an event loop spends its time on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from service.errors import Overloaded, Unavailable
from service.settings import BatchingSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
# Results for a group's items[start : start + len(results)], in order.
Done = Callable[[int, list[R | BaseException]], None]
# Queued: a group's items not yet taken, the index of the first in its group, its callback.
_Entry = tuple[list[T], int, Done[R]]


class Batcher(Generic[T, R]):
    """Feeds batches of items to `handler`, which returns one result (or exception) per item."""

    def __init__(
        self,
        name: str,
        handler: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        settings: BatchingSettings,
    ) -> None:
        self.name = name
        self._handler = handler
        self._settings = settings
        self._entries: deque[_Entry[T, R]] = deque()
        self._queued = 0  # items in _entries
        self._arrived: asyncio.Event | None = None
        self._collector: asyncio.Task[None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._holding = 0  # steps the collector has taken and not yet handed to a batch
        self._abandoned = 0  # steps given up on by a stop past its time limit
        self._closing = False

    def start(self) -> None:
        """Create the collector inside the running loop."""
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self._settings.max_concurrent_batches)
        self._collector = asyncio.create_task(self._collect(), name=f"batcher-{self.name}")

    def put_many(self, items: list[T], done: Done[R]) -> None:
        """Queue `items` as one group; `done` gets their results, a batch's share at a time. What cannot be
        queued (the batcher is stopping, or the queue is full) gets its refusal at once, through `done`."""
        if self._arrived is None or self._closing:
            stopping = Unavailable("the server is not accepting steps (stopping); retry on another replica")
            done(0, [stopping] * len(items))
            return
        room = max(self._settings.max_queue - self._queued, 0)
        taken = items if room >= len(items) else items[:room]
        if taken:  # queued before the rest hears its refusal, which might put more
            self._entries.append((taken, 0, done))
            self._queued += len(taken)
            self._arrived.set()
        if len(taken) < len(items):
            full = Overloaded(f"this replica has {self._settings.max_queue} steps queued; back off and retry")
            done(len(taken), [full] * (len(items) - len(taken)))

    def put(self, item: T, done: Callable[[R | BaseException], None]) -> None:
        """Queue one item; `done` gets its result (or its refusal, at once)."""
        self.put_many([item], lambda _, results: done(results[0]))

    async def submit(self, item: T) -> R:
        """`put`, and wait for the result."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.put(item, lambda result: settle(future, result))
        return await future

    async def _collect(self) -> None:
        assert self._arrived is not None and self._slots is not None
        wait_s = self._settings.max_batch_wait_us / 1e6
        limit = self._settings.max_batch_size
        batch: list[_Entry[T, R]] = []
        try:
            while True:
                await self._slots.acquire()
                await self._next()
                deadline = time.perf_counter() + wait_s
                while self._holding < limit:
                    if self._entries:
                        batch.append(self._take(limit - self._holding))
                        continue
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            await self._next()
                    except TimeoutError:
                        break
                task = asyncio.create_task(self._process(batch))
                batch, self._holding = [], 0
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
        except asyncio.CancelledError:  # stopped while collecting (only an abandoning stop holds steps)
            self._abandon_all(batch)
            raise

    async def _next(self) -> None:
        """Until something is queued."""
        assert self._arrived is not None
        while not self._entries:
            self._arrived.clear()
            await self._arrived.wait()

    def _take(self, room: int) -> _Entry[T, R]:
        """The first queued entry, or as much of it as fits in `room`; the rest stays first in line."""
        items, first, done = self._entries.popleft()
        if len(items) > room:
            self._entries.appendleft((items[room:], first + room, done))
            items = items[:room]
        self._queued -= len(items)
        self._holding += len(items)
        return items, first, done

    async def _process(self, batch: list[_Entry[T, R]]) -> None:
        assert self._slots is not None
        cancelled = False
        try:
            results = await self._handler([item for items, _, _ in batch for item in items])
        except asyncio.CancelledError:  # abandoned by `stop`: the outcome is unknown
            cancelled = True
        except BaseException as err:  # every step must hear about a failed batch
            results = [err] * sum(len(items) for items, _, _ in batch)
        finally:
            self._slots.release()
        if cancelled:
            self._abandon_all(batch)
            raise asyncio.CancelledError
        _deliver(self.name, batch, results)

    async def stop(self, timeout_s: float | None = None) -> int:
        """Refuse new steps, finish the batches in flight and those already queued, then stop. Past
        `timeout_s`, abandon what is left (each step gets UNAVAILABLE: it may or may not have landed, and
        a resend settles it); returns how many steps were abandoned."""
        self._closing = True
        abandoned = 0
        try:
            async with asyncio.timeout(timeout_s):
                while self._entries or self._holding or self._inflight:
                    await asyncio.sleep(0.001)
        except TimeoutError:
            abandoned = await self._abandon()
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        return abandoned

    async def _abandon(self) -> int:
        assert self._collector is not None
        self._collector.cancel()  # it abandons the batch it is collecting
        with contextlib.suppress(asyncio.CancelledError):
            await self._collector
        queued = list(self._entries)
        self._entries.clear()
        self._queued = 0
        self._abandon_all(queued)
        inflight = list(self._inflight)
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        return self._abandoned

    def _abandon_all(self, entries: list[_Entry[T, R]]) -> None:
        error = Unavailable("the server stopped before this step was confirmed; resend it (any replica) to settle it")
        count = sum(len(items) for items, _, _ in entries)
        self._abandoned += count
        results: list[R | BaseException] = [error] * count
        _deliver(self.name, entries, results)


def _deliver(name: str, batch: list[_Entry[T, R]], results: list[R | BaseException]) -> None:
    at = 0
    for items, first, done in batch:
        try:
            done(first, results[at : at + len(items)])
        except Exception:  # one group's failure must not cost the others their results
            log.exception("delivering results of batcher %s failed", name)
        at += len(items)


def settle(future: asyncio.Future[R], result: R | BaseException) -> None:
    """Give `future` its result or exception, unless its waiter has gone (cancelled)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def raise_if_cancelled() -> None:
    """Raise CancelledError if the running task is being cancelled. On Python 3.11 a cancellation that
    meets an expiring asyncio.timeout can come out as TimeoutError; a loop that catches timeouts and tries
    again must check, or a stop never ends it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
