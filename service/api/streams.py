"""Bidirectional streams that answer every request, many at once, for both APIs.

Requests on one stream may belong to many sessions; each is started at once, so a slow session does not
hold up the others, and answered in its session's order, as soon as it and its predecessors are done.
A `StreamGate` admits streams (a limit across both APIs) and drains them on shutdown: each stream stops
reading, answers what it has taken, and ends with UNAVAILABLE, so its client reconnects elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.errors import Drained, Overloaded, Unavailable
from service.metrics import Metrics

Req = TypeVar("Req")
Out = TypeVar("Out")
Resp = TypeVar("Resp")

# What starting a request gives: its future, and its weight against the stream's in-flight limit.
Submitted = tuple[asyncio.Future[Out], int]


DRAINED = (
    "the server is shutting down: this stream's steps read so far are answered above; send the rest again on a "
    "new stream (any replica can continue the session)"
)


class StreamGate:
    """How many streams are open, whether more may open, and the drain that ends them all."""

    def __init__(self, max_streams: int, metrics: Metrics) -> None:
        self._max_streams = max_streams
        self._metrics = metrics
        self._readers: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()  # set while draining once no stream is open
        self.open = 0
        self.draining = False
        self.held: str | None = None  # why new streams are refused for now (see `hold`)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a stream for as long as it is open; refuse it while draining or at the limit."""
        if self.draining:
            raise Unavailable("the server is shutting down; reconnect (any replica can continue the session)")
        if self.held is not None:
            raise Unavailable(self.held)
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

    def hold(self, why: str) -> None:
        """Refuse new streams (UNAVAILABLE, `why`) until `release`; open ones go on."""
        self.held = why

    def release(self) -> None:
        self.held = None

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


@dataclass(frozen=True, slots=True)
class _Answer:
    response: object
    weight: int  # the time steps it answers: what its delivery gives back to the stream's budget


class _Budget:
    """The time steps a stream may have taken and not yet delivered. Reading waits while the budget is
    spent; a message read is charged all of its weight, so one message may overshoot by its own size (a
    message larger than the budget still goes through, alone)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._room = asyncio.Event()
        self._room.set()

    async def wait_room(self) -> None:
        while self._used >= self._limit:
            self._room.clear()
            await self._room.wait()

    def charge(self, steps: int) -> None:
        self._used += steps

    def refund(self, steps: int) -> None:
        self._used -= steps
        if self._used < self._limit:
            self._room.set()


_END = object()


class _Answers(Generic[Req, Out, Resp]):
    """One stream's requests taken, started, and answered in order per key (see `answer_all`)."""

    def __init__(
        self,
        submit: Callable[[Req], Submitted[Out]],
        respond: Callable[[Req, asyncio.Future[Out], float], Resp],
        max_inflight: int,
        order_key: Callable[[Req], Hashable],
    ) -> None:
        self._submit = submit
        self._respond = respond
        self._order_key = order_key
        self.responses: asyncio.Queue[object] = asyncio.Queue()
        self.budget = _Budget(max_inflight)
        self.futures: set[asyncio.Future[Out]] = set()
        # Per key: (request, its future, when it was taken, its weight), in the order they came.
        self._queued: dict[Hashable, deque[tuple[Req, asyncio.Future[Out], float, int]]] = {}
        self._answered = asyncio.Event()  # set whenever nothing taken is unanswered
        self._answered.set()
        self.closed = False  # the stream has ended: no answer can be sent any more

    def take(self, request: Req) -> None:
        future, weight = self._submit(request)
        self.budget.charge(weight)
        key = self._order_key(request)
        self.futures.add(future)
        self._answered.clear()
        waiting = self._queued.get(key)
        if waiting is None:
            waiting = self._queued[key] = deque()
        waiting.append((request, future, time.perf_counter(), weight))
        future.add_done_callback(lambda _: self._flush(key))

    def _flush(self, key: Hashable) -> None:
        """Queue the answers of `key` that are ready, in the order their requests came."""
        if self.closed:  # the client went away: its steps still land, their answers have nowhere to go
            return
        waiting = self._queued.get(key)
        while waiting and waiting[0][1].done():
            request, future, taken, weight = waiting.popleft()
            self.futures.discard(future)
            try:
                answer: object = _Answer(self._respond(request, future, taken), weight)
            except Exception as err:  # noqa: BLE001 - handed to the stream, which ends with it
                answer = _Failed(err)
            self.responses.put_nowait(answer)
        if waiting is not None and not waiting:
            del self._queued[key]
        if not self.futures:
            self._answered.set()

    async def read(self, requests: AsyncIterable[Req], gate: StreamGate) -> None:
        iterator = aiter(requests)
        end: object = _END
        try:
            while True:
                # Room first: between reading a request and taking it there is no await, so a drain
                # (which cancels this task while it waits) never drops a request it has read.
                await self.budget.wait_room()
                request = await anext(iterator, _END)
                if request is _END:
                    break
                self.take(request)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            if not gate.draining:
                raise
            # Once what was read is answered, the stream ends as a drain does: UNAVAILABLE, so that a client
            # still writing knows its later steps were not read (an OK end would leave it to guess).
            end = _Failed(Drained(DRAINED))
        except Exception as err:  # noqa: BLE001 - a broken request stream ends the response stream
            self.responses.put_nowait(_Failed(err))
            return
        finally:
            reader = asyncio.current_task()
            assert reader is not None
            gate.unwatch(reader)  # reading is over: a drain from now on must not cancel the answers
        await self._answered.wait()
        self.responses.put_nowait(end)


async def answer_all(
    requests: AsyncIterable[Req],
    submit: Callable[[Req], Submitted[Out]],
    respond: Callable[[Req, asyncio.Future[Out], float], Resp],
    max_inflight: int,
    gate: StreamGate,
    order_key: Callable[[Req], Hashable],
) -> AsyncIterator[Resp]:
    """Yield an answer for every request: `submit(request)` starts it and says what it weighs,
    `respond(request, future, taken)` turns its finished future into the response (taken: when it was
    read, `time.perf_counter()`). Requests with the same `order_key` (a session) are answered in the
    order they came, the others as they finish; no task is made per request.

    At most `max_inflight` time steps are taken and not yet delivered (a request's weight: the time steps
    it holds, see `time_steps`; one message may overshoot by its own size): past that, reading waits for
    the client to read its answers. Memory per stream is bounded in time steps, however many each message
    carries. The weight comes from `submit`, which reads the request anyway: a message of many sessions'
    steps is read once, not once to weigh it and again to start it.

    If `respond` raises, the stream ends with that exception (a handler that must keep the stream open
    answers errors in-band). A request, once taken, is answered even when a drain stops the reading; once
    the stream has ended (the client went away), the steps still land and their answers are dropped.
    """
    answers = _Answers(submit, respond, max_inflight, order_key)
    reader = asyncio.create_task(answers.read(requests, gate))
    gate.watch(reader)
    try:
        while (item := await answers.responses.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            assert isinstance(item, _Answer)
            yield item.response  # type: ignore[misc]
            answers.budget.refund(item.weight)  # only once the client has taken the answer
    finally:
        answers.closed = True
        reader.cancel()
        for future in answers.futures:
            future.cancel()  # a step in flight still lands: the engine does not depend on its waiter
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, return_exceptions=True)


def weighed(
    submit: Callable[[Req], asyncio.Future[Out]], weight: Callable[[Req], int]
) -> Callable[[Req], Submitted[Out]]:
    """A `submit` for `answer_all` from one that starts a request and one that weighs it."""

    def start(request: Req) -> Submitted[Out]:
        return submit(request), weight(request)

    return start


def time_steps(shape: Sequence[int], limit: int) -> int:
    """What a request of `shape` ([T, F], or [B, T, F]: rows × time steps) weighs against a stream's
    in-flight limit, between 1 and `limit`: memory follows time steps, inputs and outputs alike. A shape
    that does not parse weighs 1 (it is refused when started)."""
    if len(shape) not in (2, 3) or min(shape) < 1:
        return 1
    rows = shape[0] * shape[1] if len(shape) == 3 else shape[0]
    return min(rows, limit)


def failed(error: BaseException) -> asyncio.Future[Any]:
    """A finished future holding `error`: what `submit` returns for a request it could not start."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future
