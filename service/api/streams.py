"""Bidirectional streams that answer every request, many at once, for both APIs.

Requests on one stream may belong to many sessions; each gets its own task, so a slow session does not
hold up the others, while the session engine keeps each session's steps in order. Responses go out as
they complete. A `StreamGate` admits streams (a limit across both APIs) and drains them on shutdown: each
stream stops reading, answers what it has taken, and ends, so its client reconnects elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from service.errors import Overloaded, Unavailable
from service.metrics import Metrics

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class StreamGate:
    """How many streams are open, whether more may open, and the drain that ends them all."""

    def __init__(self, max_streams: int, metrics: Metrics) -> None:
        self._max_streams = max_streams
        self._metrics = metrics
        self._readers: set[asyncio.Task[None]] = set()
        self.open = 0
        self.draining = False

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a stream for as long as it is open; refuse it while draining or at the limit."""
        if self.draining:
            raise Unavailable("the server is shutting down; reconnect (any replica can continue the session)")
        if self.open >= self._max_streams:
            raise Overloaded(f"this replica has {self.open} open streams; retry with backoff or elsewhere")
        self.open += 1
        self._metrics.active_streams.inc()
        try:
            yield
        finally:
            self.open -= 1
            self._metrics.active_streams.dec()

    def watch(self, reader: asyncio.Task[None]) -> None:
        """A stream's request reader, to be stopped by `drain`."""
        self._readers.add(reader)

    def unwatch(self, reader: asyncio.Task[None]) -> None:
        self._readers.discard(reader)

    def drain(self) -> None:
        """Stop every open stream from reading more requests; each answers what it has and ends."""
        self.draining = True
        for reader in list(self._readers):
            reader.cancel()


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_END = object()


async def answer_all(
    requests: AsyncIterable[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    max_inflight: int,
    gate: StreamGate,
) -> AsyncIterator[Resp]:
    """Yield `handle(request)` for every request, in completion order.

    At most `max_inflight` requests are taken and not yet answered: past that, reading waits for the
    client to read its answers. If `handle` raises, the stream ends with that exception and the other
    requests' tasks are cancelled; a handler that must keep the stream open answers errors in-band.
    """
    responses: asyncio.Queue[object] = asyncio.Queue()
    slots = asyncio.Semaphore(max_inflight)
    tasks: set[asyncio.Task[None]] = set()

    async def answer(request: Req) -> None:
        try:
            responses.put_nowait(await handle(request))
        except Exception as err:  # noqa: BLE001 - handed to the stream, which ends with it
            responses.put_nowait(_Failed(err))

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except asyncio.CancelledError:
            if not gate.draining:
                raise
        except Exception as err:  # noqa: BLE001 - a broken request stream ends the response stream
            responses.put_nowait(_Failed(err))
            return
        finally:
            gate.unwatch(reader)
        await asyncio.gather(*tasks)
        responses.put_nowait(_END)

    reader = asyncio.create_task(read())
    gate.watch(reader)
    try:
        while (item := await responses.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
            slots.release()  # only once the client has taken the answer
    finally:
        for task in (reader, *tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *tasks, return_exceptions=True)
