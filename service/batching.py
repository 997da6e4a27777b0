"""Size-or-deadline batching: many sessions' steps of one model version in one runtime call.

Steps queue up; a collector takes the first, then whatever else is queued, up to `max_batch_size`, waiting
at most `max_batch_wait_us` for more. Up to `max_concurrent_batches` batches are processed at once, so one
batch can compute while the previous one commits. A failing batch sets its exception on every waiting
future.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from service.errors import Overloaded, Unavailable
from service.settings import BatchingSettings

T = TypeVar("T")
R = TypeVar("R")


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
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._holding = 0  # steps the collector has taken and not yet handed to a batch
        self._closing = False

    def start(self) -> None:
        """Create the queue and the collector inside the running loop."""
        self._queue = asyncio.Queue(self._settings.max_queue)
        self._slots = asyncio.Semaphore(self._settings.max_concurrent_batches)
        self._collector = asyncio.create_task(self._collect(), name=f"batcher-{self.name}")

    async def submit(self, item: T) -> R:
        if self._queue is None or self._closing:
            raise Unavailable(f"model {self.name} is not accepting steps (stopping); retry on another replica")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise Overloaded(
                f"model {self.name} has {self._settings.max_queue} steps queued; back off and retry"
            ) from None
        return await future

    async def _collect(self) -> None:
        assert self._queue is not None and self._slots is not None
        wait_s = self._settings.max_batch_wait_us / 1e6
        limit = self._settings.max_batch_size
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
            self._holding = 0
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _process(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        assert self._slots is not None
        try:
            results = await self._handler([item for item, _ in batch])
        except BaseException as err:  # every waiter must hear about a failed batch
            results = [err] * len(batch)
        finally:
            self._slots.release()
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller went away (cancelled RPC)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def stop(self) -> None:
        """Refuse new steps, finish the batches in flight and those already queued, then stop."""
        self._closing = True
        if self._queue is not None:
            while not self._queue.empty() or self._holding or self._inflight:
                await asyncio.sleep(0.001)
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
