"""Bidirectional streams that answer every request, many at once, for both APIs.

Requests on one stream may belong to many sessions; each gets its own task, so a slow session does not
hold up the others, while the session engine keeps each session's steps in order. Responses go out as
they complete. A `StreamGate` admits streams (a limit across both APIs) and drains them on shutdown: each
stream stops reading, answers what it has taken, and ends, so its client reconnects elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

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
        self._closed = asyncio.Event()  # set while draining once no stream is open
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
            if self.draining and self.open == 0:
                self._closed.set()

    def watch(self, reader: asyncio.Task[None]) -> None:
        """A stream's request reader, to be stopped by `drain`."""
        self._readers.add(reader)

    def unwatch(self, reader: asyncio.Task[None]) -> None:
        self._readers.discard(reader)

    def drain(self) -> None:
        """Stop every open stream from reading more requests; each answers what it has and ends."""
        self.draining = True
        if self.open == 0:
            self._closed.set()
        for reader in list(self._readers):
            reader.cancel()

    async def wait_closed(self, timeout_s: float) -> bool:
        """After `drain`: wait until every stream has ended; False if some were still open at the timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._closed.wait()
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_END = object()


class _Answers(Generic[Req, Resp]):
    """One stream's requests taken, handled concurrently, and answered (see `answer_all`)."""

    def __init__(
        self,
        handle: Callable[[Req], Awaitable[Resp]],
        max_inflight: int,
        order_key: Callable[[Req], Hashable],
    ) -> None:
        self._handle = handle
        self._order_key = order_key
        self.responses: asyncio.Queue[object] = asyncio.Queue()
        self.slots = asyncio.Semaphore(max_inflight)
        self.tasks: set[asyncio.Task[None]] = set()
        self._queued: dict[Hashable, asyncio.Future[None]] = {}  # per key: done once its latest answer is queued

    def take(self, request: Req) -> None:
        key = self._order_key(request)
        done = asyncio.get_running_loop().create_future()
        after, self._queued[key] = self._queued.get(key), done
        task = asyncio.create_task(self._answer(request, key, after, done))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(
        self, request: Req, key: Hashable, after: asyncio.Future[None] | None, done: asyncio.Future[None]
    ) -> None:
        try:
            try:
                response: object = await self._handle(request)
            except Exception as err:  # noqa: BLE001 - handed to the stream, which ends with it
                response = _Failed(err)
            if after is not None:
                await after  # the same session's earlier answer goes first
            self.responses.put_nowait(response)
        finally:
            done.set_result(None)
            if self._queued.get(key) is done:
                del self._queued[key]

    async def read(self, requests: AsyncIterable[Req], gate: StreamGate) -> None:
        iterator = aiter(requests)
        try:
            while True:
                # The slot first: between reading a request and taking it there is no await, so a
                # drain (which cancels this task while it waits) never drops a request it has read.
                await self.slots.acquire()
                request = await anext(iterator, _END)
                if request is _END:
                    break
                self.take(request)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            if not gate.draining:
                raise
        except Exception as err:  # noqa: BLE001 - a broken request stream ends the response stream
            self.responses.put_nowait(_Failed(err))
            return
        finally:
            reader = asyncio.current_task()
            assert reader is not None
            gate.unwatch(reader)  # reading is over: a drain from now on must not cancel the answers
        await asyncio.gather(*self.tasks)
        self.responses.put_nowait(_END)


async def answer_all(
    requests: AsyncIterable[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    max_inflight: int,
    gate: StreamGate,
    order_key: Callable[[Req], Hashable],
) -> AsyncIterator[Resp]:
    """Yield `handle(request)` for every request: requests with the same `order_key` (a session) in the
    order they came, the others as they complete.

    At most `max_inflight` requests are taken and not yet answered: past that, reading waits for the
    client to read its answers. If `handle` raises, the stream ends with that exception and the other
    requests' tasks are cancelled; a handler that must keep the stream open answers errors in-band.
    A request, once taken, is answered even when a drain stops the reading.
    """
    answers = _Answers(handle, max_inflight, order_key)
    reader = asyncio.create_task(answers.read(requests, gate))
    gate.watch(reader)
    try:
        while (item := await answers.responses.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
            answers.slots.release()  # only once the client has taken the answer
    finally:
        for task in (reader, *answers.tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *answers.tasks, return_exceptions=True)
