"""Size-or-deadline batching: many sessions' steps of one model in one pass through the pipeline.

Steps queue up; a collector takes the first, then whatever else is queued, up to `max_batch_size`, waiting
at most `max_batch_wait_us` for more. Up to `max_concurrent_batches` batches are processed at once, so one
batch can compute while the previous one commits. Each step's result (or exception) goes to the callback
it was put with; a failing batch hands its exception to every step in it. No task or future per step:
at thousands of steps a second, those are what an event loop spends its time on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from service.errors import Overloaded, Unavailable
from service.settings import BatchingSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Done = Callable[[R | BaseException], None]


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
        self._queue: asyncio.Queue[tuple[T, Done[R]]] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._holding = 0  # steps the collector has taken and not yet handed to a batch
        self._abandoned = 0  # steps given up on by a stop past its time limit
        self._closing = False

    def start(self) -> None:
        """Create the queue and the collector inside the running loop."""
        self._queue = asyncio.Queue(self._settings.max_queue)
        self._slots = asyncio.Semaphore(self._settings.max_concurrent_batches)
        self._collector = asyncio.create_task(self._collect(), name=f"batcher-{self.name}")

    def put(self, item: T, done: Done[R]) -> None:
        """Queue `item`; `done` gets its result. Raises (Unavailable, Overloaded) if it cannot be queued."""
        if self._queue is None or self._closing:
            raise Unavailable("the server is not accepting steps (stopping); retry on another replica")
        try:
            self._queue.put_nowait((item, done))
        except asyncio.QueueFull:
            raise Overloaded(f"this replica has {self._settings.max_queue} steps queued; back off and retry") from None

    async def submit(self, item: T) -> R:
        """`put`, and wait for the result."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.put(item, lambda result: settle(future, result))
        return await future

    async def _collect(self) -> None:
        assert self._queue is not None and self._slots is not None
        wait_s = self._settings.max_batch_wait_us / 1e6
        limit = self._settings.max_batch_size
        batch: list[tuple[T, Done[R]]] = []
        try:
            while True:
                await self._slots.acquire()
                batch = [await self._queue.get()]
                self._holding = 1
                deadline = time.perf_counter() + wait_s
                while len(batch) < limit:
                    if not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                        self._holding += 1
                        continue
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):  # not wait_for: it can lose an item it got
                            item = await self._queue.get()
                    except TimeoutError:
                        break
                    batch.append(item)
                    self._holding += 1
                task = asyncio.create_task(self._process(batch))
                batch, self._holding = [], 0
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
        except asyncio.CancelledError:  # stopped while collecting (only an abandoning stop holds steps)
            self._abandon_all(batch)
            raise

    async def _process(self, batch: list[tuple[T, Done[R]]]) -> None:
        assert self._slots is not None
        cancelled = False
        try:
            results = await self._handler([item for item, _ in batch])
        except asyncio.CancelledError:  # abandoned by `stop`: the outcome is unknown
            cancelled = True
        except BaseException as err:  # every step must hear about a failed batch
            results = [err] * len(batch)
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
                if self._queue is not None:
                    while not self._queue.empty() or self._holding or self._inflight:
                        await asyncio.sleep(0.001)
        except TimeoutError:
            abandoned = await self._abandon()
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        return abandoned

    async def _abandon(self) -> int:
        assert self._queue is not None and self._collector is not None
        self._collector.cancel()  # it abandons the batch it is collecting
        with contextlib.suppress(asyncio.CancelledError):
            await self._collector
        self._abandon_all([self._queue.get_nowait() for _ in range(self._queue.qsize())])
        inflight = list(self._inflight)
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        return self._abandoned

    def _abandon_all(self, items: list[tuple[T, Done[R]]]) -> None:
        error = Unavailable("the server stopped before this step was confirmed; resend it (any replica) to settle it")
        self._abandoned += len(items)
        results: list[R | BaseException] = [error] * len(items)
        _deliver(self.name, items, results)


def _deliver(name: str, batch: list[tuple[T, Done[R]]], results: list[R | BaseException]) -> None:
    for (_, done), result in zip(batch, results, strict=True):
        try:
            done(result)
        except Exception:  # one callback's failure must not cost the others their results
            log.exception("delivering a result of batcher %s failed", name)


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
