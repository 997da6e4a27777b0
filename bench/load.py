"""The load generator: S sessions x T steps over K streams, either protocol, ping-pong or open loop.

Each stream is one bidirectional gRPC call carrying its share of the sessions (session i on stream
i mod K). Ping-pong: every session sends its next step as soon as the previous one is answered (so S
steps are in flight at once). Open loop: steps are due at a fixed total rate, round robin over the
sessions; a step whose session is still waiting goes out when it is answered, and its latency counts
from when it was due (no coordinated omission). Latencies go into an HDR histogram (microseconds).

A failed step (an in-band error) is counted by code and sent again, so every session still ends at T.
Fan-in (`per_message` > 1): sessions go in groups, one StreamBatch message per group per step, and the
histogram holds the latency of each message. A group may keep several messages in flight (`in_flight`),
as a gateway does that forwards the next readings before the last are answered: its messages then all go
on one stream, which answers them in order.
The client is lean on purpose (prebuilt inputs, no task per step): what it measures is the server.
With `sdk`, fan-in goes through `service.client.BatchClient` instead, as a gateway built on it would: a
call per group, the groups' calls at once; its CPU per step is then what the SDK costs a gateway.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

from service.api import kserve_messages as kv
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.api.wire import varint
from service.client import CHANNEL_OPTIONS, BatchClient, Spread, StepError, StreamBalance, worker_of_stream

MAX_LATENCY_US = 120_000_000
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
STREAM_BATCH_METHOD = "/rnnserve.v1.RnnServe/StreamBatch"


class BatchEncoder:
    """A group's StepBatch messages, encoded here: each session's step is its fixed fields (model, version,
    session id, input), encoded once, then its seq and start flag. Building a message of 256 steps as
    protobuf objects cost the load generator about 4 µs a step, a tenth of what the machine spends on a
    step, and it shares the machine with the server it measures. The server parses the same fields."""

    def __init__(self, model: str, version: int, sessions: list[str], tensor: pb.Tensor) -> None:
        self._fixed = [
            pb.StepRequest(model=model, version=version, session_id=sid, input=tensor).SerializeToString()
            for sid in sessions
        ]
        self._heads: dict[int, list[bytes]] = {}  # by the tail's length: each step's tag, length and fixed fields

    def encode(self, seq: int, batch_id: int) -> bytes:
        tail = b"\x20" + varint(seq) + (b"\x28\x01" if seq == 1 else b"")  # seq (4), start (5)
        heads = self._heads.get(len(tail))
        if heads is None:  # steps (1): each a length-delimited StepRequest
            heads = self._heads[len(tail)] = [b"\x0a" + varint(len(f) + len(tail)) + f for f in self._fixed]
        return tail.join(heads) + tail + b"\x10" + varint(batch_id)  # id (2)


def _as_is(message: bytes) -> bytes:
    return message


@dataclass(frozen=True)
class LoadSpec:
    target: str
    sessions: int
    steps: int  # per session, the start included
    streams: int = 1
    protocol: str = "native"  # native | triton
    model: str = "charlm-lstm"
    version: int = 0  # 0: the newest version the server loads
    features: int = 84
    chunk: int = 1  # time steps per request
    rate: float | None = None  # open loop: steps per second in all; None: ping-pong
    per_message: int = 1  # >1: fan-in, that many sessions' steps per StreamBatch message (native, ping-pong)
    in_flight: int = 1  # fan-in: messages a group sends before its first unanswered one is answered
    spread: bool = True  # connections reopened until they spread evenly over the server's worker processes
    sdk: bool = False  # fan-in through `BatchClient` (which spreads its streams itself), not the lean encoder

    def __post_init__(self) -> None:
        if self.per_message > 1 and (self.protocol != "native" or self.rate is not None):
            raise ValueError(
                "fan-in (--per-message > 1) sends StreamBatch messages: native protocol, ping-pong only; "
                "drop --protocol triton and --rate, or send one step per message"
            )
        if self.in_flight > 1 and self.per_message == 1:
            raise ValueError("--in-flight applies to fan-in: send it with --per-message > 1")
        if self.sdk and (self.per_message == 1 or self.in_flight > 1 or self.chunk > 1):
            raise ValueError(
                "--sdk drives fan-in through BatchClient, one call per group at a time: send it with "
                "--per-message > 1, without --in-flight or --chunk"
            )
        if min(self.per_message, self.sessions, self.steps, self.streams, self.chunk, self.in_flight) < 1:
            raise ValueError("--per-message, --sessions, --steps, --streams, --chunk and --in-flight must be 1 or more")


@dataclass
class LoadResult:
    spec: LoadSpec
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, MAX_LATENCY_US, 3))
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: dict[str, str] = field(default_factory=dict)  # fan-in: the first message of each code
    workers: Counter[str] = field(default_factory=Counter)  # fan-in: streams per server worker process
    connections: list[int] = field(default_factory=list)  # connections per worker process, after `spread`
    steps: int = 0
    seconds: float = 0.0

    def refused(self, code: str, message: str) -> None:
        """A fan-in step answered with an error: counted by code, the first message of each kept."""
        self.errors[code] += 1
        self.first_errors.setdefault(code, message)

    def summary(self) -> dict[str, Any]:
        h = self.histogram
        return {
            "protocol": self.spec.protocol,
            "sessions": self.spec.sessions,
            "streams": self.spec.streams,
            "steps": self.steps,
            "chunk": self.spec.chunk,
            "rate": self.spec.rate,
            "per_message": self.spec.per_message,
            "in_flight": self.spec.in_flight,
            "sdk": self.spec.sdk,
            "seconds": self.seconds,
            "steps_per_s": self.steps / self.seconds if self.seconds else 0.0,
            "p50_us": h.get_value_at_percentile(50),
            "p90_us": h.get_value_at_percentile(90),
            "p99_us": h.get_value_at_percentile(99),
            "p999_us": h.get_value_at_percentile(99.9),
            "max_us": h.get_max_value(),
            "errors": dict(self.errors),
            **({"first_errors": self.first_errors} if self.first_errors else {}),
            "streams_per_worker": sorted(self.workers.values(), reverse=True),
            "connections_per_worker": self.connections,
        }


async def worker_of(channel: grpc.aio.Channel) -> str | None:
    """The server process a connection reached ("host/pid", as `BatchClient` reads it; None where the
    server names none, or sends no headers before the first message)."""
    call = pb_grpc.RnnServeStub(channel).StreamBatch()
    try:
        return await worker_of_stream(call)
    finally:
        call.cancel()


async def spread(target: str, channels: list[grpc.aio.Channel]) -> list[int]:
    """Reopen connections (in place in `channels`) until they fall evenly on the server's worker processes,
    as `BatchClient` places its streams (`Spread`); returns the connections per worker. The kernel gives
    each connection to a worker at random, and four connections on two workers fall 4:0 one time in
    eight: a load's figure would measure the draw."""
    placement = Spread()
    for i in range(len(channels)):
        while True:
            worker = await worker_of(channels[i])
            if worker is None:  # a server that does not say (the echo server): nothing to spread on
                return []
            if placement.keep(i, worker):
                break
            await channels[i].close()
            channels[i] = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            await asyncio.wait_for(channels[i].channel_ready(), 60)
    return sorted(Counter(placement.workers()).values(), reverse=True)


class _FanIn:
    """Fan-in: StreamBatch calls, one per channel given, carrying the sessions in groups of `per_message`,
    each group a message. Every group sends its next batch as soon as its last one is answered, on the
    call a `StreamBalance` picks (as `BatchClient` does); with `in_flight` > 1 it keeps that many messages
    unanswered, all on one call (group g on call g mod K, so its steps are applied in order). Latency is
    per message."""

    def __init__(
        self, spec: LoadSpec, channels: list[grpc.aio.Channel], sessions: list[str], result: LoadResult
    ) -> None:
        self.spec = spec
        self.result = result
        self.groups = [sessions[i : i + spec.per_message] for i in range(0, len(sessions), spec.per_message)]
        self.seq = [1] * len(self.groups)  # of the group's next message
        # Per group, its messages not yet answered: when each was sent, and the balance's ticket.
        self.unanswered: list[deque[tuple[float, float]]] = [deque() for _ in self.groups]
        self.ended = [False] * len(self.groups)
        x = np.random.default_rng(len(sessions)).random((spec.chunk, spec.features)).astype(np.float32)
        tensor = pb.Tensor(shape=x.shape, raw=x.tobytes())
        self.encoders = [BatchEncoder(spec.model, spec.version, group, tensor) for group in self.groups]
        self.calls = [
            channel.stream_stream(
                STREAM_BATCH_METHOD, request_serializer=_as_is, response_deserializer=pb.StepBatchResult.FromString
            )()
            for channel in channels
        ]
        self.writing = [asyncio.Lock() for _ in self.calls]  # one write at a time on a call (readers share them)
        self.balance = StreamBalance(len(self.calls))
        self.finished = 0
        self.done = asyncio.Event()

    async def send(self, g: int) -> None:
        message = self.encoders[g].encode(self.seq[g], g)
        self.seq[g] += 1
        k = self.balance.pick() if self.spec.in_flight == 1 else g % len(self.calls)
        self.unanswered[g].append((time.perf_counter(), self.balance.sent(k)))
        async with self.writing[k]:
            await self.calls[k].write(message)

    async def run(self) -> None:
        """Until every group is done; a stream that fails or ends first ends the run with its error."""
        for _ in range(min(self.spec.in_flight, self.spec.steps)):
            for g in range(len(self.groups)):
                await self.send(g)
        readers = [asyncio.create_task(self.read(k)) for k in range(len(self.calls))]
        finished = asyncio.create_task(self.done.wait())
        try:
            await asyncio.wait([finished, *readers], return_when=asyncio.FIRST_COMPLETED)
            if not self.done.is_set():
                failed = next(reader for reader in readers if reader.done())
                raise failed.exception() or ConnectionError("the server ended a fan-in stream before its load")
        finally:
            for task in (finished, *readers):
                task.cancel()
            await asyncio.gather(finished, *readers, return_exceptions=True)
            for k, call in enumerate(self.calls):
                async with self.writing[k]:
                    if not call.done():
                        await call.done_writing()

    async def read(self, k: int) -> None:
        call = self.calls[k]
        self.result.workers[await worker_of_stream(call) or "?"] += 1
        async for result in call:
            g = result.id
            sent_at, ticket = self.unanswered[g].popleft()  # a group's messages are answered in order
            self.balance.answered(k, ticket)
            self.result.histogram.record_value(max(1, int((time.perf_counter() - sent_at) * 1e6)))
            failed = [r for r in result.responses if r.HasField("error")]
            for response in failed:
                self.result.refused(_CODES[response.error.code].name, response.error.message)
            self.result.steps += len(result.responses) - len(failed)
            if self.ended[g]:  # answers of a group that stopped short, still in flight
                continue
            # A group with an error stops short (its errors are what the run reports), and counts as done:
            # a load whose every group failed ends instead of waiting for answers that never come.
            if failed or (not self.unanswered[g] and self.seq[g] > self.spec.steps):
                self.ended[g] = True
                self.finished += 1
                if self.finished == len(self.groups):
                    self.done.set()
            elif self.seq[g] <= self.spec.steps:
                await self.send(g)


class _Gateway:
    """Fan-in through `BatchClient`: each group of `per_message` sessions steps `steps` times, one call at a
    time, all groups at once on one client of `streams` streams. Latency is per call."""

    def __init__(self, spec: LoadSpec, sessions: list[str], result: LoadResult) -> None:
        self.spec = spec
        self.result = result
        self.groups = [sessions[i : i + spec.per_message] for i in range(0, len(sessions), spec.per_message)]
        x = np.random.default_rng(len(sessions)).random((1, spec.features)).astype(np.float32)
        self.inputs = [dict.fromkeys(group, x) for group in self.groups]

    async def run(self) -> None:
        async with BatchClient(self.spec.target, streams=self.spec.streams) as gateway:
            await asyncio.gather(*(self._group(gateway, inputs) for inputs in self.inputs))
            self.result.workers.update(gateway.workers)

    async def _group(self, gateway: BatchClient, inputs: dict[str, np.ndarray]) -> None:
        histogram = self.result.histogram
        for _ in range(self.spec.steps):
            started = time.perf_counter()
            replies = await gateway.step(self.spec.model, inputs, version=self.spec.version)
            histogram.record_value(max(1, int((time.perf_counter() - started) * 1e6)))
            failed = [reply for reply in replies.values() if isinstance(reply, StepError)]
            for reply in failed:
                self.result.refused(reply.code.name, reply.message)
            self.result.steps += len(replies) - len(failed)
            if failed:  # as the lean fan-in: a group with an error stops short, its errors reported
                return


class _Stream:
    """One call and the sessions on it."""

    def __init__(
        self, spec: LoadSpec, channel: grpc.aio.Channel, sessions: list[str], result: LoadResult, index: int = 0
    ) -> None:
        self.spec = spec
        self.offset_s = index / spec.rate if spec.rate else 0.0
        self.sessions = sessions
        self.result = result
        self.next_seq = dict.fromkeys(sessions, 1)
        self.due: dict[str, deque[float]] = {sid: deque() for sid in sessions}  # open loop: when steps were due
        self.sent_at: dict[str, float] = {}
        self.busy: set[str] = set()
        self.finished = 0
        self.writing = asyncio.Lock()  # one write at a time on a call (the ticker and the reader both send)
        x = np.random.default_rng(len(sessions)).random((spec.chunk, spec.features)).astype(np.float32)
        if spec.protocol == "native":
            self.call = pb_grpc.RnnServeStub(channel).Stream()
            self.tensor = pb.Tensor(shape=x.shape, raw=x.tobytes())
        else:
            stream = channel.stream_stream(
                STREAM_METHOD,
                request_serializer=kv.ModelInferRequest.SerializeToString,
                response_deserializer=kv.ModelStreamInferResponse.FromString,
            )
            self.call = stream()
            self.raw = x.tobytes()

    def _request(self, sid: str) -> Any:
        seq, spec = self.next_seq[sid], self.spec
        if spec.protocol == "native":
            return pb.StepRequest(
                model=spec.model, version=spec.version, session_id=sid, seq=seq, start=seq == 1, input=self.tensor
            )
        version = str(spec.version) if spec.version else ""  # KServe: empty for the server's choice
        request = kv.ModelInferRequest(model_name=spec.model, model_version=version, id=sid)
        request.inputs.add(name="x", datatype="FP32", shape=[1, spec.chunk, spec.features])
        request.raw_input_contents.append(self.raw)
        request.parameters["sequence_id"].string_param = sid
        request.parameters["sequence_start"].bool_param = seq == 1
        request.parameters["rnnserve_seq"].int64_param = seq
        return request

    async def send(self, sid: str, due: float | None = None) -> None:
        self.busy.add(sid)
        self.sent_at[sid] = time.perf_counter() if due is None else due
        async with self.writing:
            await self.call.write(self._request(sid))

    def _answer(self, response: Any) -> tuple[str, str | None]:
        """(session, error code or None)."""
        if self.spec.protocol == "native":
            if response.HasField("error"):
                return response.session_id, _CODES[response.error.code].name
            return response.session_id, None
        sid = response.infer_response.id
        return sid, response.error_message[:60] if response.error_message else None

    async def run(self) -> None:
        if self.spec.rate is None:
            for sid in self.sessions:
                await self.send(sid)
        else:
            ticker = asyncio.create_task(self._tick(len(self.sessions) * self.spec.steps, self.offset_s))
        async for response in self.call:
            now = time.perf_counter()
            sid, error = self._answer(response)
            self.busy.discard(sid)
            self.result.histogram.record_value(max(1, int((now - self.sent_at[sid]) * 1e6)))
            if error is not None:
                self.result.errors[error] += 1
            else:
                self.result.steps += 1
                self.next_seq[sid] += 1
            if self.next_seq[sid] > self.spec.steps:
                self.finished += 1
                if self.finished == len(self.sessions):
                    break
            elif self.spec.rate is None or error is not None:
                await self.send(sid, None if self.spec.rate is None else self.sent_at[sid])
            elif self.due[sid]:
                await self.send(sid, self.due[sid].popleft())
        if self.spec.rate is not None:
            ticker.cancel()
        await self.call.done_writing()

    async def _tick(self, total: int, offset_s: float) -> None:
        """Open loop: the steps of this stream fall due at its share of the rate, staggered against the
        other streams' (stream k starts k / rate seconds in), so the total is evenly spread."""
        assert self.spec.rate is not None
        interval = self.spec.streams / self.spec.rate
        start = time.perf_counter() + offset_s
        for i in range(total):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sid = self.sessions[i % len(self.sessions)]
            if sid in self.busy or self.due[sid]:
                self.due[sid].append(due)
            else:
                await self.send(sid, due)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run one load; sessions get fresh random ids, so runs never meet each other's sessions."""
    result = LoadResult(spec)
    run_id = uuid.uuid4().hex[:8]
    ids = [f"load-{run_id}-{i}" for i in range(spec.sessions)]
    if spec.sdk:
        gateway = _Gateway(spec, ids, result)
        started = time.perf_counter()
        await gateway.run()
        result.seconds = time.perf_counter() - started
        return result
    # Up to four connections (each its own: see CHANNEL_OPTIONS), spread over a server's worker processes.
    channels = [grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS) for _ in range(min(spec.streams, 4))]
    try:
        # Connected first: CHANNEL_OPTIONS give a connection attempt little time (quick reconnects), and a
        # call on a channel still in its first failed attempt fails at once instead of waiting for the next.
        await asyncio.wait_for(asyncio.gather(*(channel.channel_ready() for channel in channels)), 60)
        if spec.spread:
            result.connections = await spread(spec.target, channels)
        streams: list[_Stream | _FanIn] = (
            [_FanIn(spec, [channels[k % len(channels)] for k in range(spec.streams)], ids, result)]
            if spec.per_message > 1
            else [
                _Stream(spec, channels[k % len(channels)], ids[k :: spec.streams], result, k)
                for k in range(spec.streams)
                if ids[k :: spec.streams]
            ]
        )
        started = time.perf_counter()
        await asyncio.gather(*(s.run() for s in streams))
        result.seconds = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    return result
