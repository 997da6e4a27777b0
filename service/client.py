"""A streaming client for the native API, with resume.

One `StreamClient` holds one bidirectional stream and multiplexes any number of sessions over it. If the
stream breaks (server restarted, replica gone), it reconnects and resends every unanswered step: seq
numbers make that safe, because the server answers a step it already applied with the stored outputs.

    async with StreamClient("localhost:8500") as client:
        session = client.session("charlm-lstm")
        reply = await session.step(x)          # x: [T, F] float32
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from types import TracebackType

import grpc
import numpy as np

from service.api.convert import tensor_to_array
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

# Failures after which the same steps can be resent on a new stream.
_RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


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


class StreamClient:
    def __init__(self, target: str, *, reconnect_timeout_s: float = 30.0) -> None:
        self.target = target
        self._reconnect_timeout_s = reconnect_timeout_s
        self._channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.RnnServeStub(self._channel)
        self._call: grpc.aio.StreamStreamCall[pb.StepRequest, pb.StepResponse] | None = None
        self._pending: dict[tuple[str, str, int], tuple[pb.StepRequest, asyncio.Future[pb.StepResponse]]] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.reconnects = 0

    async def __aenter__(self) -> StreamClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        self._call = self.stub.Stream(wait_for_ready=True)
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._call is not None:
            self._call.cancel()
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("client closed"))
        await self._channel.close()

    def session(self, model: str, session_id: str | None = None, *, version: int = 0) -> Session:
        return Session(self, model, session_id or uuid.uuid4().hex, version)

    async def send(self, request: pb.StepRequest) -> StepReply:
        """Send one step and wait for its answer; raises StepError if the server refused it."""
        started = time.perf_counter()
        future: asyncio.Future[pb.StepResponse] = asyncio.get_running_loop().create_future()
        key = (request.model, request.session_id, request.seq)
        async with self._lock:
            if self._failure is not None or self._reader is None or self._reader.done():
                raise ConnectionError(f"the stream to {self.target} is closed: {self._failure}")
            self._pending[key] = (request, future)
            assert self._call is not None
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await self._call.write(request)  # on a broken stream the reader resends it
        response = await future
        if response.HasField("error"):
            raise StepError(_CODES[response.error.code], response.error.message, response.expected_seq)
        return StepReply(
            session_id=response.session_id,
            seq=response.seq,
            version=response.version,
            outputs={name: tensor_to_array(t, name) for name, t in response.outputs.items()},
            replayed=response.replayed,
            latency_s=time.perf_counter() - started,
        )

    async def _read(self) -> None:
        while True:
            assert self._call is not None
            try:
                response = await self._call.read()
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RESUMABLE:
                    self._fail_all(err)
                    return
                if not await self._reconnect():
                    return
                continue
            if not isinstance(response, pb.StepResponse):  # EOF: the server closed the stream (draining)
                if not await self._reconnect():
                    return
                continue
            entry = self._pending.pop((response.model, response.session_id, response.seq), None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(response)

    async def _reconnect(self) -> bool:
        """A new stream, and every unanswered step sent again, in the order first sent; False if none came
        within the reconnect timeout (every waiting step then fails, and so does every later one)."""
        deadline = time.monotonic() + self._reconnect_timeout_s
        async with self._lock:
            if self._call is not None:
                self._call.cancel()
            while True:
                self._call = self.stub.Stream(wait_for_ready=True)
                try:
                    for request, _ in list(self._pending.values()):
                        await self._call.write(request)
                    break
                except grpc.aio.AioRpcError as err:
                    if time.monotonic() > deadline:
                        self._fail_all(err)
                        return False
                    await asyncio.sleep(0.1)
            self.reconnects += 1
            return True

    def _fail_all(self, err: BaseException) -> None:
        self._failure = err
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(err)
        self._pending.clear()


class Session:
    """One session's steps, numbered for you. The first step starts the session."""

    def __init__(self, client: StreamClient, model: str, session_id: str, version: int = 0) -> None:
        self.client = client
        self.model = model
        self.session_id = session_id
        self.version = version
        self.acked_seq = 0
        self._order = asyncio.Lock()  # one step at a time: each seq follows the last acknowledged one

    async def step(self, x: np.ndarray, *, end: bool = False) -> StepReply:
        async with self._order:
            return await self._step(x, end)

    async def _step(self, x: np.ndarray, end: bool) -> StepReply:
        seq = self.acked_seq + 1
        data = np.ascontiguousarray(x, dtype=np.float32)
        request = pb.StepRequest(
            model=self.model,
            version=self.version,
            session_id=self.session_id,
            seq=seq,
            start=seq == 1,
            end=end,
            input=pb.Tensor(shape=data.shape, raw=data.tobytes()),
        )
        reply = await self.client.send(request)
        self.acked_seq = reply.seq
        self.version = reply.version
        return reply
