"""A streaming client for the native API, with resume.

One `StreamClient` holds one bidirectional stream and multiplexes any number of sessions over it. When
the stream breaks or ends (a server restarted, a replica drained or killed), it reconnects and resends
every unanswered step. Seq numbers and input digests make that safe: the server answers a step it
already applied with the stored outputs, and a start with the same start id is the same start.

    async with StreamClient("localhost:8500") as client:
        session = client.session("charlm-lstm")
        reply = await session.step(x)          # x: [T, F] float32

Nothing waits forever: a step whose stream cannot be re-established within `reconnect_timeout_s` fails
with `ConnectionError` (the session's state is then unknown for that step: call `step` again with the
same input, which the server applies or answers as a replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import re
import secrets
import time
import uuid
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc
import numpy as np

from service.api.convert import FLOAT32, tensor_to_array
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

# Stream failures that resending cannot cure; every other one is retried on a new stream.
_FATAL = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}

# Reconnect quickly after a replica goes away (gRPC's defaults back off to two minutes), and find a dead
# peer without waiting for TCP (servers permit pings this frequent: see service/server.py).
CHANNEL_OPTIONS = [
    # Reconnect soon after a drain or a lost server. (Not grpc.min_reconnect_backoff_ms: gRPC also takes it
    # for the least time a connect attempt is given, and a busy server that answers its handshake later than
    # that would fail calls waiting on the attempt.)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # A connection of its own: channels to one target otherwise share one, and so one worker process of
    # a server running several (they share the port; the kernel spreads connections, not streams).
    ("grpc.use_local_subchannel_pool", 1),
    # An answer may be larger than its request (a StepBatch's outputs): gRPC's 4 MiB default would refuse it.
    ("grpc.max_receive_message_length", -1),
]


@dataclass(frozen=True)
class ClientTls:
    """What a client needs to reach a server that speaks TLS (PEM files): the CA that signed the server's
    certificate (None: the system's roots) and, for mutual TLS, the client's own certificate and key.
    `server_name` overrides the name checked against the server's certificate (reaching a server by an
    address its certificate does not name)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate and its key go together: give both, or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def open_channel(
    target: str, tls: ClientTls | None = None, options: Sequence[tuple[str, Any]] = (), token: str | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to `target`, over TLS when `tls` is given, with CHANNEL_OPTIONS; with `token`,
    every call on it carries `authorization: Bearer TOKEN` (a server with tenants)."""
    chosen = [*CHANNEL_OPTIONS, *options]
    interceptors = _bearer_interceptors(token) if token else None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=chosen, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=[*chosen, *tls.options()], interceptors=interceptors
    )


class _Bearer:
    """Adds the bearer token to a call's metadata. (Call credentials would do the same over TLS only: gRPC
    refuses them on a plaintext channel, and a test or a sidecar-terminated TLS may be plaintext.)"""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def _intercept(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


# gRPC files an interceptor under the first call kind it is an instance of: one class per kind.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    intercept_unary_unary = _Bearer._intercept


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    intercept_unary_stream = _Bearer._intercept


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    intercept_stream_unary = _Bearer._intercept


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    intercept_stream_stream = _Bearer._intercept


def _bearer_interceptors(token: str) -> list[Any]:
    return [kind(token) for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)]


class MessageTooLarge(ValueError):
    """A message past the limit of the server a stream reached, smaller than the client's own: not sent."""


class StepError(Exception):
    """The server refused a step; the session's state is unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str, expected_seq: int = 0) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.expected_seq = expected_seq


@dataclass(frozen=True)
class StepReply:
    session_id: str
    seq: int
    version: int
    outputs: dict[str, np.ndarray]
    replayed: bool
    latency_s: float


_CODES = {status.value[0]: status for status in grpc.StatusCode}

Req = TypeVar("Req", pb.StepRequest, pb.StepBatch)
Resp = TypeVar("Resp", pb.StepResponse, pb.StepBatchResult)


class StreamBalance:
    """Which of several streams should carry the next message: the one whose answers promise to come
    soonest, its latency times the messages waiting on it plus this one. A stream to a busier server
    worker (or replica) answers more slowly and is given less, so a client's load follows the capacity
    behind its connections, not how the kernel happened to spread them.

    A stream's latency is a moving average of its answers, but never less than how long its oldest
    waiting message has waited: a stream that stopped answering (a hung peer, a refused stream) loses its
    share as its wait grows, measured or not. The average halves for every `half_life_s` since a stream's
    last answer, so one slow answer (a restart waited out) does not sideline it for good, and its next
    answer counts on what is left of it. A stream never measured, with nothing waiting, counts as fast; among
    those, the first goes first."""

    def __init__(
        self,
        streams: int,
        *,
        weight: float = 0.25,
        half_life_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.waiting: list[list[float]] = [[] for _ in range(streams)]  # per stream: when each message went
        self.latency_s = [0.0] * streams  # the moving average, as of `measured_at`
        self.measured_at = [0.0] * streams
        self._weight = weight  # of the newest answer in the moving average
        self._half_life_s = half_life_s

    def pick(self, skip: Collection[int] = ()) -> int:
        """The stream for the next message, other than those in `skip` (unless that is all of them)."""
        now = self._clock()
        allowed = [i for i in range(len(self.waiting)) if i not in skip] or range(len(self.waiting))
        return min(allowed, key=lambda i: self._cost(i, now))

    def _cost(self, i: int, now: float) -> tuple[float, int]:
        waiting = self.waiting[i]
        if waiting:
            latency = max(self._faded(i, waiting[0]), now - waiting[0])
        else:
            latency = self._faded(i, now)
        return latency * (len(waiting) + 1), len(waiting)

    def _faded(self, i: int, at: float) -> float:
        """Stream `i`'s average as it stands at `at`: halved for every half-life since its last answer."""
        return self.latency_s[i] * math.pow(0.5, max(0.0, at - self.measured_at[i]) / self._half_life_s)

    def sent(self, i: int) -> float:
        """A message went on stream `i`; returns its ticket for `answered`."""
        ticket = self._clock()
        self.waiting[i].append(ticket)
        return ticket

    def answered(self, i: int, ticket: float, *, measured: bool = True) -> None:
        """The message of `ticket` on stream `i` is done: answered, or failed for want of a stream
        (`measured`: its time counts), or given up by its caller (it does not)."""
        self.waiting[i].remove(ticket)
        now = self._clock()
        if measured:  # on the average as it stood when the message went: an old slow answer weighs little
            seconds, old = now - ticket, self._faded(i, ticket)
            self.latency_s[i] = seconds if old == 0 else old + self._weight * (seconds - old)
            self.measured_at[i] = now


class _Connected:
    """`async with`: connect() on entry, close() on exit."""

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _Resumable(_Connected, Generic[Req, Resp]):
    """One bidirectional stream kept open while requests wait, each request resent on a new stream until
    it is answered, or until no stream could be had for `reconnect_timeout_s`."""

    def __init__(
        self,
        target: str,
        *,
        reconnect_timeout_s: float = 30.0,
        max_backoff_s: float = 2.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        tls: ClientTls | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self._reconnect_timeout_s = reconnect_timeout_s
        self._max_backoff_s = max_backoff_s
        self._max_message_bytes = self._own_max_message_bytes = max_message_bytes
        self._tls, self._token = tls, token
        self._channel = open_channel(target, tls, token=token)
        self.stub = pb_grpc.RnnServeStub(self._channel)
        self._call: grpc.aio.StreamStreamCall[Req, Resp] | None = None
        self._pending: dict[Hashable, tuple[Req, asyncio.Future[Resp]]] = {}
        self._written: dict[Hashable, int] = {}  # pending requests written: on which stream (`attempts`)
        self._refused_limit: int | None = None  # a server's message limit, from its refusal of a message
        self._headers: dict[str, Any] | None = None  # the current stream's, once read
        self._lock = asyncio.Lock()  # writes to the stream, and swapping the stream, one at a time
        self._work = asyncio.Event()  # a request is waiting for a stream
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self.attempts = 0  # streams opened
        self.reconnects = 0  # streams opened after one had broken or ended
        self.last_error: BaseException | None = None
        self._moving = False  # `move` ended the stream: not an error

    def _open(self) -> grpc.aio.StreamStreamCall[Req, Resp]:
        raise NotImplementedError

    def _key(self, message: Req | Resp) -> Hashable:
        """What pairs an answer with its request."""
        raise NotImplementedError

    async def _placed(self, call: grpc.aio.StreamStreamCall[Req, Resp]) -> bool:
        """Whether to keep a new stream where its connection landed (else it is opened again on a new
        connection, before anything is sent on it)."""
        return True

    def _left(self) -> None:
        """The stream this client held has ended."""

    async def _reopen(self) -> None:
        """A new connection in place of this client's one (nothing is in flight on it)."""
        old = self._channel
        self._channel = open_channel(self.target, self._tls, token=self._token)
        self.stub = pb_grpc.RnnServeStub(self._channel)
        await old.close()

    async def connect(self) -> None:
        """Start the task that keeps a stream open while requests wait; connecting happens on demand."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name=f"rnnserve-stream-{self.target}")

    async def close(self) -> None:
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._call is not None:
            self._call.cancel()
        self._fail_pending(ConnectionError("client closed"))
        await self._channel.close()

    async def _exchange(self, request: Req) -> Resp:
        """Send a request and wait for its answer, across reconnects; ConnectionError if none came."""
        if self._closed or self._supervisor is None:
            raise ConnectionError(f"the client for {self.target} is {'closed' if self._closed else 'not connected'}")
        size = request.ByteSize()
        if size > self._max_message_bytes:
            raise self._too_large(size)
        future: asyncio.Future[Resp] = asyncio.get_running_loop().create_future()
        key, entry = self._key(request), (request, future)
        try:  # from here on, however this call ends (cancelled under the lock too), its request goes
            async with self._lock:
                if self._closed:  # closed while this call waited for the lock: close() has failed the others
                    raise ConnectionError(f"the client for {self.target} is closed")
                if key in self._pending:  # its answer could only go to one of them: the other would wait for ever
                    raise ValueError(
                        f"a request answered as {key!r} is already waiting on this client; send a session's "
                        "steps one at a time (one Session object a session)"
                    )
                self._pending[key] = entry
                self._work.set()
                if self._call is not None:
                    if size > _SMALLEST_SERVER_LIMIT:  # could be past the server's own limit
                        await self._read_headers(self._call)
                    if size > self._max_message_bytes:
                        raise self._too_large(size)
                    # On a broken stream the supervisor resends it.
                    if await _write(self._call, request) and self._pending.get(key) is entry:
                        self._written[key] = self.attempts
            return await future
        finally:
            if self._pending.get(key) is entry:
                del self._pending[key]
                self._written.pop(key, None)

    async def _supervise(self) -> None:
        """Keep a stream open while requests wait: open, resend what is unanswered, read; on a break,
        back off and open again, until the reconnect timeout passes without a stream (then the waiting
        requests fail, and the next request tries afresh)."""
        failures = 0
        while True:
            await self._work.wait()
            broken_since = time.monotonic()
            while self._pending:
                remaining = broken_since + self._reconnect_timeout_s - time.monotonic()
                if remaining <= 0:
                    self._fail_pending(ConnectionError(f"no stream to {self.target}: {self.last_error}"))
                    break
                answered = await self._one_stream(remaining)
                if answered:
                    failures, broken_since = 0, time.monotonic()
                elif isinstance(self.last_error, grpc.aio.AioRpcError) and self.last_error.code() in _FATAL:
                    self._fail_pending(self.last_error)
                    break
                else:
                    failures += 1
                    delay = min(self._max_backoff_s, 0.05 * 2**failures) * random.uniform(0.5, 1.0)
                    await asyncio.sleep(min(delay, max(0.0, remaining)))
            if not self._pending:
                self._work.clear()

    async def _why(self) -> str:
        """What gRPC knows of the failed connection (refused, a TLS handshake or certificate that failed),
        from one call that does not wait for a connection."""
        try:
            await self.stub.ListModels(pb.ListModelsRequest(), timeout=1.0, wait_for_ready=False)
        except grpc.aio.AioRpcError as err:
            return f": {err.details()}"
        except Exception:  # noqa: BLE001 - only an explanation: none, then
            return ""
        return ""

    async def _one_stream(self, connect_within_s: float) -> bool:
        """One stream: open (on a new connection while `_placed` says to), resend the unanswered requests,
        read answers until it ends. Whether any answer came back on it."""
        placed = await self._place(connect_within_s)
        if placed is None:
            return False
        call, answered = placed, False
        try:
            await self._resend(call)
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:  # the server ended it (a drain)
                    self.last_error = ConnectionError(f"{self.target} ended the stream")
                    return answered
                answered = True
                entry = self._pending.get(self._key(response))
                if entry is not None and not entry[1].done():
                    entry[1].set_result(response)
        except grpc.aio.AioRpcError as err:
            self._broke(err)
            return answered
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this client is closing
                raise
            self._note_cancelled()
            return answered
        finally:
            async with self._lock:
                if self._call is call:
                    self._call = None
                self._moving = False
                # The next stream may reach another server: its headers will say its limits.
                self._headers, self._max_message_bytes = None, self._limit_unless_told()
            call.cancel()
            self._left()

    async def _resend(self, call: grpc.aio.StreamStreamCall[Req, Resp]) -> None:
        """Make `call` this client's stream and write the unanswered requests on it, in the order first sent
        (past the server's limits, where a large one could be, none: `_refuse_larger`)."""
        async with self._lock:
            if self._headers is None and any(r.ByteSize() > _SMALLEST_SERVER_LIMIT for r, _ in self._pending.values()):
                await self._read_headers(call)  # before anything is written
            if self.attempts:
                self.reconnects += 1
            self._call = call
            self.attempts += 1
            self._refuse_larger()
            for key, entry in list(self._pending.items()):
                if self._pending.get(key) is not entry:  # its caller gave up meanwhile
                    continue
                if not await _write(call, entry[0]):
                    break
                if self._pending.get(key) is entry:
                    self._written[key] = self.attempts

    async def _place(self, connect_within_s: float) -> grpc.aio.StreamStreamCall[Req, Resp] | None:
        """A new stream once connected, opened again on a new connection while `_placed` says to, within
        the time given to connect (then it stays where it is); None if no connection could be had."""
        deadline = time.monotonic() + connect_within_s
        if not await self._connected(connect_within_s):
            return None
        call, self._headers = self._open(), None
        try:
            while time.monotonic() < deadline and not await self._placed(call):
                call.cancel()
                await self._reopen()
                if not await self._connected(deadline - time.monotonic()):
                    return None
                call, self._headers = self._open(), None
        except BaseException:  # closing: the stream goes, and its place
            call.cancel()
            self._left()
            raise
        return call

    async def _connected(self, within_s: float) -> bool:
        """Whether the channel connected within `within_s` (else `last_error` says why not)."""
        try:
            async with asyncio.timeout(within_s):
                await self._channel.channel_ready()
        except TimeoutError:
            self.last_error = TimeoutError(f"{self.target} did not accept a connection{await self._why()}")
            return False
        return True

    def _note_cancelled(self) -> None:
        """gRPC cancels a call whose write was cancelled (a caller that gave up while its message was being
        written), or `move` did: the stream is gone, not this task; the unanswered requests go on a new one."""
        if not self._moving:
            self.last_error = ConnectionError(f"the stream to {self.target} was cancelled under a write")

    @property
    def open(self) -> bool:
        return self._call is not None

    @property
    def max_message_bytes(self) -> int:
        """The largest message this client sends: its own limit, or a server's that turned out smaller."""
        return self._max_message_bytes

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def move(self) -> bool:
        """End the stream if nothing is in flight on it: the next request opens (and places) a new one.
        Whether it was ended."""
        async with self._lock:
            if self._pending or self._call is None:
                return False
            self._moving = True
            self._call.cancel()
            self._call = None  # a request from now on waits for the new stream
            return True

    async def _read_headers(self, call: grpc.aio.StreamStreamCall[Req, Resp]) -> dict[str, Any]:
        """The headers the server sent as the stream `call` started ({} where none came within a moment),
        read once a stream; its limits, where it names them, are this client's while the stream lasts (the
        smaller of its own and the server's: `_refuse_larger`)."""
        if self._headers is None:
            self._headers = await stream_headers(call)  # {}: its refusals will say what it takes
            limit = _header_limit(self._headers, "rnnserve-max-message-bytes", _SMALLEST_SERVER_LIMIT)
            self._max_message_bytes = min(self._own_max_message_bytes, limit) if limit else self._limit_unless_told()
            self._headers_read(self._headers)
        return self._headers

    def _limit_unless_told(self) -> int:
        """This client's message limit where a server's headers name none: its own, or a server's that
        refused a larger message (a server older than these headers, or a proxy in the way)."""
        return min(self._own_max_message_bytes, self._refused_limit or self._own_max_message_bytes)

    def _headers_read(self, headers: dict[str, Any]) -> None:
        """What else a client takes from a new stream's headers."""

    def _broke(self, err: grpc.aio.AioRpcError) -> None:
        """The stream ended with `err`; where that is the server refusing a message past its size limit,
        this client keeps to that limit and the messages past it fail (see `_refuse_larger`)."""
        self.last_error = err
        if (limit := _receive_limit(err)) is not None:
            self._refused_limit = min(self._refused_limit or limit, limit)
            self._max_message_bytes = min(self._max_message_bytes, limit)
            self._refuse_larger()

    def _refuse_larger(self) -> None:
        """Fail the waiting requests past the server's message limit where it is below this client's:
        resent, they would only break stream after stream. One written on an earlier stream and not answered
        may have been applied (ConnectionError); one never written, or written on this stream, whose server
        refuses it, was not (ValueError)."""
        for key, (request, future) in list(self._pending.items()):
            if request.ByteSize() <= self._max_message_bytes:
                continue
            del self._pending[key]
            sent = self._written.pop(key, self.attempts) < self.attempts
            if not future.done():
                future.set_exception(self._too_large(request.ByteSize(), sent))

    def _too_large(self, size: int, sent: bool = False) -> ValueError | ConnectionError:
        limit = self._max_message_bytes
        if limit == self._own_max_message_bytes:
            return ValueError(f"a message of {size} bytes exceeds the {limit}-byte limit; send shorter chunks")
        server = f"the {limit}-byte limit of the server at {self.target}"
        if sent:
            return ConnectionError(
                f"a message of {size} bytes was sent, not answered before its stream broke, and exceeds {server} "
                "now reached: it may or may not have been applied. A BatchClient call made again is cut to fit "
                "and replays what was applied; a Session should read its last_seq (GetSession) and resume"
            )
        return MessageTooLarge(
            f"a message of {size} bytes exceeds {server} (this client keeps to it while its stream lasts); send "
            "shorter chunks, and set max_message_bytes to match the server's"
        )

    def _fail_pending(self, err: BaseException) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(err)
        self._pending.clear()
        self._written.clear()


class StreamClient(_Resumable[pb.StepRequest, pb.StepResponse]):
    """Sessions' steps, one message each, on one stream (`Stream`)."""

    def _open(self) -> grpc.aio.StreamStreamCall[pb.StepRequest, pb.StepResponse]:
        return self.stub.Stream()

    def _key(self, message: pb.StepRequest | pb.StepResponse) -> Hashable:
        return (message.model, message.session_id, message.seq)

    def session(self, model: str, session_id: str | None = None, *, version: int = 0) -> Session:
        return Session(self, model, session_id or uuid.uuid4().hex, version)

    async def send(self, request: pb.StepRequest) -> StepReply:
        """Send one step and wait for its answer; raises StepError if the server refused it, and
        ConnectionError if no stream could be had within the reconnect timeout."""
        started = time.perf_counter()
        response = await self._exchange(request)
        reply = _reply(response, time.perf_counter() - started)
        if isinstance(reply, StepError):
            raise reply
        return reply


class _BatchStream(_Resumable[pb.StepBatch, pb.StepBatchResult]):
    """One `StreamBatch` stream of a BatchClient, on a connection of its own, placed by `spread`."""

    def __init__(self, target: str, spread: Spread, **options: Any) -> None:
        super().__init__(target, **options)
        self._spread = spread
        self.max_steps: int | None = None  # a StepBatch's most steps, as the server's headers say

    def _headers_read(self, headers: dict[str, Any]) -> None:
        self.max_steps = _header_limit(headers, "rnnserve-max-steps-per-message", 1)

    def _open(self) -> grpc.aio.StreamStreamCall[pb.StepBatch, pb.StepBatchResult]:
        return self.stub.StreamBatch()

    def _key(self, message: pb.StepBatch | pb.StepBatchResult) -> Hashable:
        return message.id

    async def _placed(self, call: grpc.aio.StreamStreamCall[pb.StepBatch, pb.StepBatchResult]) -> bool:
        self._spread.leave(self)
        return self._spread.keep(self, _worker_in(await self._read_headers(call)))

    def _left(self) -> None:
        self._spread.leave(self)


async def worker_of_stream(call: grpc.aio.StreamStreamCall[Any, Any]) -> str | None:
    """The server process a new stream reached, from the headers rnnserve sends as a stream starts (host
    and process id); None where none came within a moment (another server, or a refused stream)."""
    return _worker_in(await stream_headers(call))


async def stream_headers(call: grpc.aio.StreamStreamCall[Any, Any]) -> dict[str, Any]:
    """The headers a server sent as a stream started; {} where none came within a moment (a refused
    stream, or a server that sends them only with its first answer)."""
    try:
        async with asyncio.timeout(2.0):
            return dict(await call.initial_metadata() or ())
    except (TimeoutError, grpc.aio.AioRpcError):
        return {}


def _worker_in(headers: dict[str, Any]) -> str | None:
    worker = headers.get("rnnserve-worker")
    return None if worker is None else f"{headers.get('rnnserve-host', '')}/{worker}"


def _header_limit(headers: dict[str, Any], name: str, least: int) -> int | None:
    """A limit a server names in its headers; None where it names none, or one no rnnserve server has (below
    `least`: a header from something else in the way, which must not make a client refuse everything)."""
    value = str(headers.get(name, ""))
    return int(value) if value.isascii() and value.isdigit() and int(value) >= least else None


class Spread:
    """Where a client's streams are: each kept on a server process none of the others is on, or, once
    `tries` new connections in a row have found no process without one, on one holding fewest. The kernel
    gives each connection to one of a server's worker processes at random (four connections to two
    workers land on one of them one time in eight); a stream that lands where it is not wanted is opened
    again on a new connection, at most `4 × tries` times, before anything is sent on it."""

    def __init__(self, tries: int = 8) -> None:
        self.tries = tries
        self._held: dict[object, str] = {}
        self._all_seen = False  # whether the client has likely met every process there is
        self._misses: dict[object, int] = {}

    def keep(self, stream: object, worker: str | None) -> bool:
        """Whether `stream`, whose connection reached `worker` (None: unknown), should stay there."""
        if worker is None:
            self._misses.pop(stream, None)
            return True
        held = list(self._held.values())
        on_it, fewest = held.count(worker), min((held.count(w) for w in held), default=0)
        misses = 0 if on_it == 0 else self._misses.get(stream, 0) + 1
        if misses == 0:
            self._all_seen = False  # a process without a stream (a new one, or one whose streams ended)
        elif misses >= self.tries:
            self._all_seen = True  # that many connections in a row found no process without a stream
        if misses == 0 or (self._all_seen and on_it == fewest) or misses > 4 * self.tries:
            self._misses.pop(stream, None)
            self._held[stream] = worker
            return True
        self._misses[stream] = misses
        return False

    def leave(self, stream: object) -> None:
        self._held.pop(stream, None)

    def workers(self) -> list[str]:
        return list(self._held.values())

    def crowded(self) -> bool:
        """Whether two streams share a process."""
        return len(set(self._held.values())) < len(self._held)

    def to_move(self, found: str) -> list[object]:
        """The streams one of which, moved to `found` (a process a new connection reached), evens them out:
        those of the process holding most, if it holds at least two more than `found`. Where `found` holds
        none, placing the moved one looks for a process without a stream again before settling (`keep`);
        where it holds some, it settles on one holding fewest, as it does once all have been seen."""
        held = list(self._held.values())
        if not held:
            return []
        most = max(held, key=held.count)  # the first such, in the order the streams were placed
        if held.count(most) < held.count(found) + 2:
            return []
        self._all_seen = found in held  # without a stream there: look for one such; else settle on fewest
        return [stream for stream, worker in self._held.items() if worker == most]


class BatchClient(_Connected):
    """Many sessions' steps per message (`StreamBatch`), for gateways: each call steps a set of sessions
    of one model, numbering, starting and resending their steps as a `Session` does.

        async with BatchClient("localhost:8500") as gateway:
            replies = await gateway.step("glucose-lstm", {"sensor-1": x1, "sensor-2": x2})
            replies["sensor-1"].outputs["forecast"]   # or a StepError for a refused step

    Calls may run at once (for different sessions). They are spread over `streams` streams, each on a
    connection of its own (so over a server's worker processes, and replicas behind a load balancer; a
    stream that lands on a process another of them is on is opened again elsewhere while there are
    processes without one: `Spread`), each call on the stream whose answers promise to come soonest
    (`StreamBalance`). A stream connects when first used.
    """

    def __init__(
        self,
        target: str,
        *,
        streams: int = 4,
        rebalance_s: float = 5.0,
        max_steps_per_message: int = 1024,
        **options: Any,
    ) -> None:
        """`options` as for StreamClient: reconnect_timeout_s, max_backoff_s, max_message_bytes, tls, token.
        `rebalance_s`: how often, while two of the streams share a server process, a connection is opened to
        look for a process holding fewer of them (0: never; see `_rebalance`).
        `max_steps_per_message`: a call of more sessions goes as several messages (the server's
        `max_steps_per_message`, 1,024 by default, refuses larger ones); so does one past `max_message_bytes`.
        A server's own smaller limits, which it names in a stream's headers, are kept to once a stream is open."""
        if streams < 1:
            raise ValueError(f"streams must be 1 or more, got {streams}")
        if max_steps_per_message < 1:
            raise ValueError(f"max_steps_per_message must be 1 or more, got {max_steps_per_message}")
        self.target = target
        self._max_steps = max_steps_per_message
        self._rebalance_s = rebalance_s
        self._rebalancer: asyncio.Task[None] | None = None
        self.moves = 0  # streams ended to be placed again (`_rebalance`)
        self._leaving: set[int] = set()  # streams being moved: no new call goes on them
        self._spread = Spread()
        self._streams = [_BatchStream(target, self._spread, **options) for _ in range(streams)]
        self._tls, self._token = options.get("tls"), options.get("token")
        self._unary: grpc.aio.Channel | None = None  # for `stub`, opened when first asked for
        self._balance = StreamBalance(streams)
        self._sessions: dict[tuple[str, str], _SessionState] = {}
        self._ids = itertools.count(1)

    async def connect(self) -> None:
        for stream in self._streams:
            await stream.connect()
        if self._rebalance_s > 0 and len(self._streams) > 1 and self._rebalancer is None:
            self._rebalancer = asyncio.create_task(self._rebalance(), name=f"rnnserve-rebalance-{self.target}")

    async def close(self) -> None:
        if self._rebalancer is not None:
            self._rebalancer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebalancer
        for stream in self._streams:
            await stream.close()
        if self._unary is not None:
            await self._unary.close()

    async def _rebalance(self) -> None:
        """Streams are placed as they open, so streams that opened while a process was missing (a worker
        restarting after a crash: its streams reconnected to the others) stay crowded once it is back.
        Every `rebalance_s` while two streams share a process: one connection opened to see where the
        kernel puts it, and if moving a stream there evens them out (`Spread.to_move`), one such stream is
        given no new call and ended once its calls are answered (`_move`); the next call opens it again, and
        `Spread` places it."""
        idle_probes = 0  # probes in a row that found nothing to move: past 4, each doubles the wait (to 16 ×)
        while True:
            await asyncio.sleep(self._rebalance_s * 2 ** min(max(0, idle_probes - 4), 4))
            if not self._spread.crowded():
                idle_probes = 0
                continue
            try:
                found = await self._probe()
            except Exception:  # noqa: BLE001 - only a look: the streams' own errors are what counts
                found = None
            movable = self._spread.to_move(found) if found is not None else []
            if not movable:
                idle_probes += 1
                continue
            idle_probes = 0
            streams = [stream for stream in self._streams if stream in movable]
            await self._move(min(streams, key=lambda stream: stream.in_flight))

    async def _move(self, stream: _BatchStream) -> None:
        """End `stream` to be placed afresh: no new call goes on it meanwhile, and it ends once the calls on
        it are answered (a busy gateway is never idle on its own)."""
        k = self._streams.index(stream)
        self._leaving.add(k)
        try:
            deadline = time.monotonic() + max(10.0, 10 * self._rebalance_s)
            while stream.open and time.monotonic() < deadline:
                if await stream.move():
                    self.moves += 1
                    return
                await asyncio.sleep(0.005)
        finally:
            self._leaving.discard(k)

    async def _probe(self) -> str | None:
        """The server process a new connection reaches (None: one that does not say)."""
        channel = open_channel(self.target, self._tls, token=self._token)
        try:
            async with asyncio.timeout(max(1.0, self._rebalance_s)):
                await channel.channel_ready()
                call = pb_grpc.RnnServeStub(channel).StreamBatch()
                try:
                    return await worker_of_stream(call)
                finally:
                    call.cancel()
        finally:
            await channel.close()

    @property
    def stub(self) -> pb_grpc.RnnServeStub:
        """The API's unary calls (GetSession, ListModels, ...), on a connection of their own: the streams'
        connections are replaced as they are placed."""
        if self._unary is None:
            self._unary = open_channel(self.target, self._tls, token=self._token)
            self._stub = pb_grpc.RnnServeStub(self._unary)
        return self._stub

    @property
    def last_error(self) -> BaseException | None:
        """Why a stream last broke or could not be had, on any of this client's connections."""
        return next((s.last_error for s in self._streams if s.last_error is not None), None)

    @property
    def workers(self) -> list[str]:
        """The server processes ("host/pid") this client's open streams are on."""
        return self._spread.workers()

    @property
    def attempts(self) -> int:
        """Streams opened, over all of this client's connections."""
        return sum(stream.attempts for stream in self._streams)

    @property
    def reconnects(self) -> int:
        """Streams opened after one had broken or ended, over all of this client's connections."""
        return sum(stream.reconnects for stream in self._streams)

    def acked_seq(self, model: str, session_id: str) -> int:
        state = self._sessions.get((model, session_id))
        return state.acked_seq if state else 0

    def resume(self, model: str, session_id: str, last_seq: int, start_id: int = 0, *, version: int = 0) -> None:
        """Continue a session this client did not start (a gateway that restarted), as Session.resume."""
        self._session_state(model, session_id, version).resume(last_seq, start_id)

    def restart(self, model: str, session_id: str, *, version: int = 0) -> None:
        """Make the session's next step a new start (seq 1, a new start_id): after it ended, or after a
        refusal that says to start it again. A call already under way for the session finishes first."""
        state = _SessionState(version)
        if (old := self._sessions.get((model, session_id))) is not None:
            state.order = old.order  # still one call at a time for the session
        self._sessions[model, session_id] = state

    async def step(
        self, model: str, inputs: dict[str, np.ndarray], *, end: Iterable[str] = (), version: int | None = None
    ) -> dict[str, StepReply | StepError]:
        """One step for each session in `inputs` (x: [T, F] float32), in one message (in several, sent at
        once, past `max_steps_per_message` sessions or `max_message_bytes`); the sessions in `end` end with
        it. A refused step leaves its session where it was: call again with the same input to resend it.
        Raises ConnectionError if no stream could be had within the reconnect timeout for any of its
        messages; then no session of the call moves on, and calling again with the same inputs resends every
        step (those applied are answered as replays; a call for some of the same sessions made meanwhile
        with other inputs is refused for them, as not a resend).

        `version`: the model version the sessions this call starts run on (0: the newest loaded); a session
        stays on the version it started on, so it counts only until a session's first step is acknowledged
        (a start refused for a version not loaded can be sent again with another). None: the version given
        to `restart` or `resume`, else the newest."""
        ending = set(end)
        states = [self._session_state(model, session_id, version or 0) for session_id in inputs]
        held: list[_SessionState] = []
        try:
            for state in sorted(states, key=id):  # one call at a time per session: each seq follows the last
                await state.order.acquire()
                held.append(state)
            if version is not None:
                for state in states:
                    if not state.acked_seq:  # not started yet (a started session keeps its version)
                        state.version = version
            batch = pb.StepBatch()  # each step written in place: a request made apart is copied into it
            add = batch.steps.add
            for (session_id, x), state in zip(inputs.items(), states, strict=True):
                state.fill(add(), model, session_id, x, session_id in ending)
            results = await self._send_all(self._messages(batch))
            replies: dict[str, StepReply | StepError] = {}
            responses = (
                item for result, latency in results for item in zip(result.responses, itertools.repeat(latency))
            )
            for (response, latency), state in zip(responses, states, strict=True):
                reply = replies[response.session_id] = _reply(response, latency)
                if isinstance(reply, StepReply):
                    state.acknowledged(reply)
            return replies
        finally:  # those taken only: a call cancelled while it waited for a lock holds no others
            for state in held:
                state.order.release()

    def _session_state(self, model: str, session_id: str, version: int) -> _SessionState:
        state = self._sessions.get((model, session_id))
        if state is None:  # made only when new (it draws a start_id)
            state = self._sessions[model, session_id] = _SessionState(version)
        return state

    def _messages(self, batch: pb.StepBatch) -> list[pb.StepBatch]:
        """The call's steps in order, cut into messages of at most `max_steps_per_message` steps and
        `max_message_bytes` bytes; ValueError, before anything is sent, for a step that alone exceeds it.
        `batch` itself where it fits (the usual call), weighed whole (its id unset)."""
        # Each the client's own, or a server's that turned out smaller (its streams' headers say).
        limit = min(stream.max_message_bytes for stream in self._streams)
        steps = min([self._max_steps] + [stream.max_steps for stream in self._streams if stream.max_steps])
        room = budget = limit - _BATCH_ID_BYTES
        if len(batch.steps) <= steps and batch.ByteSize() <= budget:
            return [batch]
        parts: list[list[pb.StepRequest]] = [[]]
        for request in batch.steps:
            size = request.ByteSize()
            size += 1 + _varint_bytes(size)  # the field's tag and length
            if size > budget:
                raise ValueError(
                    f"the step of session {request.session_id!r} takes {size} bytes, more than a message of "
                    f"{limit} bytes holds; send it in shorter chunks"
                )
            if len(parts[-1]) == steps or size > room:
                parts.append([])
                room = budget
            parts[-1].append(request)
            room -= size
        return [pb.StepBatch(steps=part) for part in parts]

    async def _send_fitted(self, batch: pb.StepBatch) -> list[tuple[pb.StepBatchResult, float]]:
        """One message of a call; cut again and sent in pieces, all at once, where the server it
        reached takes less than the message was cut for (a server's limits are known once a stream to it is
        open): a message past its byte limit is refused before it is sent, and one past its step limit is
        refused step by step, whole; its pieces carry the same steps, so a step of it that a replica applied
        before a failover comes back as a replay."""
        try:
            answered = await self._send(batch)
        except MessageTooLarge:
            pieces = self._messages(batch)
            if len(pieces) == 1:
                raise
        else:
            steps = min((stream.max_steps for stream in self._streams if stream.max_steps), default=None)
            too_many = steps is not None and len(batch.steps) > steps
            refused = all(r.error.code == _RESOURCE_EXHAUSTED for r in answered[0].responses)
            if not (too_many and refused) or len(pieces := self._messages(batch)) == 1:
                return [answered]
        return await self._send_all(pieces)

    async def _send_all(self, parts: list[pb.StepBatch]) -> list[tuple[pb.StepBatchResult, float]]:
        """Every message at once (their sessions differ), each run to its end before any session moves on
        (see `step`): then the first failure is raised."""
        if len(parts) == 1:
            return await self._send_fitted(parts[0])
        outcomes = await asyncio.gather(*(self._send_fitted(part) for part in parts), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [piece for outcome in outcomes for piece in outcome]  # type: ignore[union-attr]

    async def _send(self, batch: pb.StepBatch) -> tuple[pb.StepBatchResult, float]:
        """One message, numbered for as long as it is in flight, on the stream whose answers promise to come
        soonest; its answer and latency. Its id is unset again after, so it is weighed as it was cut."""
        k = self._balance.pick(self._leaving)
        ticket = self._balance.sent(k)
        started = time.perf_counter()
        measured = False
        batch.id = next(self._ids)
        try:
            result = await self._streams[k]._exchange(batch)
            measured = True
        except ConnectionError:  # no stream could be had: its time counts, and the stream is given less
            measured = True
            raise
        finally:
            self._balance.answered(k, ticket, measured=measured)
            batch.id = 0
        return result, time.perf_counter() - started


class _SessionState:
    """Where a client's session stands: its last acknowledged seq and version, and its start."""

    def __init__(self, version: int) -> None:
        self.acked_seq = 0
        self.version = version
        self.start_id = secrets.randbits(64) | 1  # names this session's start: a resend is not a restart
        self.started = False  # whether start_id is the stored session's (then every step names it)
        self.order = asyncio.Lock()  # one step at a time: each seq follows the last acknowledged one

    def next(self, model: str, session_id: str, x: np.ndarray, end: bool) -> pb.StepRequest:
        return self.fill(pb.StepRequest(), model, session_id, x, end)

    def fill(self, step: pb.StepRequest, model: str, session_id: str, x: np.ndarray, end: bool) -> pb.StepRequest:
        """`step` made this session's next one."""
        seq = self.acked_seq + 1
        named = self.start_id if seq == 1 or self.started else 0
        return _fill_step(step, model, session_id, seq, x, version=self.version, start_id=named, end=end)

    def acknowledged(self, reply: StepReply) -> None:
        self.acked_seq, self.version = reply.seq, reply.version
        self.started = self.started or reply.seq == 1  # its own start (a start is always seq 1)

    def resume(self, last_seq: int, start_id: int) -> None:
        self.acked_seq = last_seq
        self.start_id, self.started = (start_id, True) if start_id else (self.start_id, False)


def step_request(
    model: str, session_id: str, seq: int, x: np.ndarray, *, version: int = 0, start_id: int = 0, end: bool = False
) -> pb.StepRequest:
    """Step `seq` of a session (seq 1 starts it); `start_id` names the start every step belongs to."""
    return _fill_step(pb.StepRequest(), model, session_id, seq, x, version=version, start_id=start_id, end=end)


def _fill_step(
    step: pb.StepRequest,
    model: str,
    session_id: str,
    seq: int,
    x: np.ndarray,
    *,
    version: int = 0,
    start_id: int = 0,
    end: bool = False,
) -> pb.StepRequest:
    """`step_request`, written into `step`: a new message (or one just added to a batch's steps), whose fields
    hold their defaults (those that stay so are not written: each write costs)."""
    data = np.ascontiguousarray(x, dtype=FLOAT32)
    step.model, step.session_id, step.seq = model, session_id, seq
    if version:
        step.version = version
    if seq == 1:
        step.start = True
    if start_id:
        step.start_id = start_id
    if end:
        step.end = True
    tensor = step.input
    tensor.shape[:] = data.shape
    tensor.raw = data.tobytes()
    return step


# gRPC's words when a server refuses a message past its receive limit (a server started with a smaller
# max_message_bytes than the client's); they end with "(<size> vs. <limit>)".
_TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")


def _receive_limit(err: grpc.aio.AioRpcError) -> int | None:
    """The server's message limit, where `err` is its refusal of a message past it."""
    if err.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    found = _TOO_LARGE.search(err.details() or "")
    return int(found.group(2)) if found else None


_BATCH_ID_BYTES = 11  # a StepBatch's id field, at most
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_SMALLEST_SERVER_LIMIT = 1024  # no rnnserve server takes a max_message_bytes below it


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _reply(response: pb.StepResponse, latency_s: float) -> StepReply | StepError:
    if response.HasField("error"):
        return StepError(_CODES[response.error.code], response.error.message, response.expected_seq)
    tensors = response.outputs
    # By name, not `items()`: a protobuf map's items() iterate in Python, at more cost than the rest.
    outputs = {name: tensor_to_array(tensors[name], name, scalar_ok=True) for name in tensors}
    return StepReply(response.session_id, response.seq, response.version, outputs, response.replayed, latency_s)


async def _write(call: grpc.aio.StreamStreamCall[Req, Resp], request: Req) -> bool:
    """Write to a stream that may have just ended; False if it has (the step then waits for the next)."""
    try:
        await call.write(request)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        return False
    except asyncio.CancelledError:  # the call was cancelled under the write (a close), not this task
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return False
    return True


class Session:
    """One session's steps, numbered for you. The first step starts the session."""

    def __init__(self, client: StreamClient, model: str, session_id: str, version: int = 0) -> None:
        self.client = client
        self.model = model
        self.session_id = session_id
        self._state = _SessionState(version)

    @property
    def acked_seq(self) -> int:
        return self._state.acked_seq

    @property
    def version(self) -> int:
        return self._state.version

    def resume(self, last_seq: int, start_id: int = 0) -> None:
        """Continue a session this object did not start (a gateway that restarted): from `last_seq`, and,
        given the session's `start_id` (GetSession says both), only as that start."""
        self._state.resume(last_seq, start_id)

    async def step(self, x: np.ndarray, *, end: bool = False) -> StepReply:
        async with self._state.order:
            reply = await self.client.send(self._state.next(self.model, self.session_id, x, end))
            self._state.acknowledged(reply)
            return reply
