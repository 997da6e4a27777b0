"""The native API (rnnserve.v1): a thin adapter over the session engine."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from functools import partial
from typing import Any, TypeAlias

import grpc
import numpy as np

from service.api.convert import FLOAT32, fill_tensors, tensor_to_array
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.api.status import classify, grpc_status, unary
from service.api.streams import StreamGate, Submitted, answer_all, failed, time_steps
from service.api.wire import BatchResultWriter
from service.auth import Authenticator, tenant_of, while_valid
from service.errors import Drained, InvalidArgument, Overloaded, RnnServeError, SeqOutOfOrder
from service.metrics import Metrics
from service.models import LoadedModel
from service.sessions import Answer, SessionEngine, Step, StepResult
from service.settings import Settings

log = logging.getLogger(__name__)

# Which process answers a stream (one of several workers on a port, on a host): for operators, tests, and
# clients that spread their streams over the workers.
WORKER_METADATA = (("rnnserve-worker", str(os.getpid())), ("rnnserve-host", socket.gethostname()))

StreamContext: TypeAlias = grpc.aio.ServicerContext[pb.StepRequest, pb.StepResponse]
BatchContext: TypeAlias = grpc.aio.ServicerContext[pb.StepBatch, bytes]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _model_info(model: LoadedModel) -> pb.ModelInfo:
    manifest = model.manifest
    return pb.ModelInfo(
        name=manifest.name,
        version=manifest.version,
        task=manifest.task,
        cell=manifest.cell,
        streamable=manifest.streamable,
        precision=manifest.precision,
        fingerprint=manifest.fingerprint,
        inputs=[pb.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape) for t in model.inputs],
        outputs=[pb.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape) for t in model.outputs],
        manifest_json=manifest.model_dump_json(),
        provider=model.runtime.providers[0],
    )


_NO_INPUT = np.empty((0, 0), FLOAT32)  # a step's input until its message's inputs are read


def _steps_of(
    requests: Sequence[pb.StepRequest], tenant: str, inflight_limit: int
) -> tuple[list[Step | BaseException], int]:
    """Each request as a step, or what refused it (answered in-band: a second step of one session in the
    message, an input that does not parse, a fault as INTERNAL); and what they weigh in all against the
    stream's in-flight limit (`time_steps` of each, at least 1 in all).

    Each request's fields are read once. The inputs in the clients' usual form, raw float32 [T, F] of the
    first such input's shape, become views of one array read at once: per step, reading an input on its
    own cost more than the rest of the step's parsing."""
    steps: list[Step | BaseException] = []
    seen: set[tuple[str, str]] = set()
    weight = 0
    bulk: list[Step] = []  # the steps whose inputs are read together ...
    raws: list[bytes] = []  # ... their bytes
    common: tuple[int, int] | None = None  # ... and their shape
    for request in requests:
        tensor = request.input
        dims = tensor.shape
        session = (request.model, request.session_id)
        if len(dims) == 2 and (rows := dims[0]) > 0 and (columns := dims[1]) > 0:
            weight += rows if rows < inflight_limit else inflight_limit
            raw = tensor.raw
            fast = len(raw) == 4 * rows * columns and not tensor.data and (common is None or common == (rows, columns))
        else:
            weight += time_steps(dims, inflight_limit)
            fast = False
        if session in seen:
            steps.append(
                InvalidArgument(
                    f"session {request.session_id!r} has more than one step in this batch; "
                    "send its next step in a later batch"
                )
            )
            continue
        seen.add(session)
        try:
            x = _NO_INPUT if fast else tensor_to_array(tensor)
            step = Step(
                session[0],
                session[1],
                request.seq,
                x,
                request.version,
                request.start,
                request.end,
                request.start_id,
                tenant,
            )
        except Exception as err:  # noqa: BLE001 - answered in-band (a fault as INTERNAL, logged): the others go on
            steps.append(err)
            continue
        if fast:
            common = (rows, columns)
            bulk.append(step)
            raws.append(raw)
        steps.append(step)
    if common is not None:
        inputs = np.frombuffer(b"".join(raws), FLOAT32).reshape(len(raws), *common)
        for step, x in zip(bulk, inputs, strict=True):  # each a view of one row
            step.x = x
    return steps, max(1, weight)


def _session_of(request: pb.StepRequest) -> tuple[str, str]:
    return request.model, request.session_id


def _in_order(batch: pb.StepBatch) -> int:
    """Batches are answered in the order they came."""
    return 0


class _Handlers:
    """Takes the method handlers the generated registration makes (it registers them on a server)."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_to_server(servicer: NativeServicer, server: grpc.aio.Server) -> None:
    """Serve the native API, as the generated `add_RnnServeServicer_to_server` does but for one method:
    StreamBatch's results go out as the bytes `NativeServicer.StreamBatch` yields, serialised already."""
    made = _Handlers()
    pb_grpc.add_RnnServeServicer_to_server(servicer, made)
    made.handlers["StreamBatch"] = made.handlers["StreamBatch"]._replace(response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(made.service, made.handlers),))
    server.add_registered_method_handlers(made.service, made.handlers)


class NativeServicer(pb_grpc.RnnServeServicer):
    def __init__(
        self, engine: SessionEngine, settings: Settings, metrics: Metrics, gate: StreamGate, auth: Authenticator | None
    ) -> None:
        self.metrics = metrics
        self._engine = engine
        self._settings = settings
        self._gate = gate
        self._auth = auth
        # What a stream's headers tell its client: the process it reached, and the limits a client should
        # keep to (`service.client` cuts its messages to them).
        self._headers = (
            *WORKER_METADATA,
            ("rnnserve-max-message-bytes", str(settings.max_message_bytes)),
            ("rnnserve-max-steps-per-message", str(settings.max_steps_per_message)),
        )
        self._writer = BatchResultWriter()

    # -- Stream --------------------------------------------------------------------------------

    async def Stream(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterable[pb.StepRequest], context: StreamContext
    ) -> AsyncIterator[pb.StepResponse]:
        try:
            metadata = context.invocation_metadata()
            tenant = tenant_of(self._auth, metadata)
            with self._gate.admit():
                await context.send_initial_metadata(self._headers)
                limit = self._settings.max_inflight_per_stream
                submit = partial(self._submit, tenant=tenant)
                requests = while_valid(request_iterator, self._auth, metadata)
                answers = answer_all(requests, submit, self._respond, limit, self._gate, _session_of)
                async for response in answers:
                    yield response
        except RnnServeError as refusal:  # steps answer in-band: a stream ends so only when refused or drained
            await self._end("Stream", refusal, context)

    async def StreamBatch(  # type: ignore[override]  # noqa: N802 - gRPC method name; yields bytes
        self, request_iterator: AsyncIterable[pb.StepBatch], context: BatchContext
    ) -> AsyncIterator[bytes]:
        """Each StepBatch's StepBatchResult, serialised here (see `add_to_server`)."""
        try:
            metadata = context.invocation_metadata()
            tenant = tenant_of(self._auth, metadata)
            with self._gate.admit():
                await context.send_initial_metadata(self._headers)
                limit = self._settings.max_inflight_per_stream
                answers = answer_all(
                    while_valid(request_iterator, self._auth, metadata),
                    partial(self._submit_batch, tenant=tenant),
                    self._respond_batch,
                    limit,
                    self._gate,
                    _in_order,
                )
                async for response in answers:
                    yield response
        except RnnServeError as refusal:  # steps answer in-band: a stream ends so only when refused or drained
            await self._end("StreamBatch", refusal, context)

    async def _end(self, method: str, refusal: RnnServeError, context: StreamContext | BatchContext) -> None:
        """End a stream with `refusal` (the gate's, the token's, or a drain's, which is not counted as an error)."""
        if not isinstance(refusal, Drained):
            self.metrics.errors.labels(method, refusal.code.name).inc()
        await context.abort(grpc_status(refusal.code), refusal.message)

    def _submit_batch(self, batch: pb.StepBatch, tenant: str) -> Submitted[list[Answer]]:
        """Every step of the batch started at once (the engine batches them together); done when all are."""
        limit, inflight = self._settings.max_steps_per_message, self._settings.max_inflight_per_stream
        requests = batch.steps
        if len(requests) > limit:
            too_many = Overloaded(f"a StepBatch holds at most {limit} steps, this one {len(requests)}; split it")
            weight = sum(time_steps(request.input.shape, inflight) for request in requests)
            return self._engine.submit_many([too_many] * len(requests)), weight
        steps, weight = _steps_of(requests, tenant, inflight)
        return self._engine.submit_many(steps), weight

    def _respond_batch(self, batch: pb.StepBatch, done: asyncio.Future[list[Answer]], taken: float) -> bytes:
        """The StepBatchResult, serialised: results written by hand (`BatchResultWriter`), the rest (errors)
        by protobuf."""
        writer = self._writer
        responses = []
        for request, answer in zip(batch.steps, done.result(), strict=True):
            if isinstance(answer, StepResult):
                responses.append(writer.result(answer))
            else:
                response = pb.StepResponse()
                self._fill(response, request, answer, "StreamBatch")
                responses.append(writer.embedded(response.SerializeToString()))
        return writer.batch(responses, batch.id)

    def _submit(self, request: pb.StepRequest, tenant: str) -> Submitted[StepResult]:
        (step,), weight = _steps_of((request,), tenant, self._settings.max_inflight_per_stream)
        if isinstance(step, BaseException):
            return failed(step), weight
        return self._engine.submit(step), weight

    def _respond(self, request: pb.StepRequest, done: asyncio.Future[StepResult], taken: float) -> pb.StepResponse:
        response = pb.StepResponse()
        self._fill(response, request, done.exception() or done.result(), "Stream")
        return response

    def _fill(self, response: pb.StepResponse, request: pb.StepRequest, answer: Answer, method: str) -> None:
        """`response`, an empty message, made the answer to `request`."""
        if isinstance(answer, BaseException):  # answered in-band: the stream stays open for the other sessions
            code, message = classify(answer, method)
            self.metrics.errors.labels(method, code.name).inc()
            response.session_id = request.session_id
            response.seq = request.seq
            response.model = request.model
            response.version = request.version
            response.error.code = int(code)
            response.error.message = message
            if isinstance(answer, SeqOutOfOrder):
                response.expected_seq = answer.expected_seq
            return
        response.session_id = answer.session_id
        response.seq = answer.seq
        response.model = answer.model
        response.version = answer.version
        response.replayed = answer.replayed
        fill_tensors(response.outputs, answer.outputs)

    # -- unary calls ---------------------------------------------------------------------------

    @unary
    async def Infer(  # noqa: N802
        self, request: pb.InferRequest, context: grpc.aio.ServicerContext[pb.InferRequest, pb.InferResponse]
    ) -> pb.InferResponse:
        x = tensor_to_array(request.input)
        if x.ndim != 2:
            raise InvalidArgument(f"input must be [T, F], got {list(x.shape)}")
        model, outputs = await self._engine.infer(request.model, request.version, x[None])
        response = pb.InferResponse(model=model.name, version=model.version)
        fill_tensors(response.outputs, {name: value[0] for name, value in outputs.items()})
        return response

    @unary
    async def ListModels(  # noqa: N802
        self,
        request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_model_info(m) for m in self._engine.registry.all()])

    @unary
    async def GetSession(  # noqa: N802
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext[pb.SessionRef, pb.SessionInfo]
    ) -> pb.SessionInfo:
        tenant = tenant_of(self._auth, context.invocation_metadata())
        info = await self._engine.get_session(request.model, request.session_id, tenant)
        return pb.SessionInfo(
            model=info.model,
            session_id=info.session_id,
            version=info.version or 0,
            last_seq=info.last_seq,
            fingerprint=info.fingerprint,
            ttl_ms=info.ttl_ms if info.ttl_ms is not None else -1,
            start_id=info.start_id,
        )

    @unary
    async def DeleteSession(  # noqa: N802
        self,
        request: pb.SessionRef,
        context: grpc.aio.ServicerContext[pb.SessionRef, pb.DeleteSessionResponse],
    ) -> pb.DeleteSessionResponse:
        tenant = tenant_of(self._auth, context.invocation_metadata())
        deleted = await self._engine.delete_session(request.model, request.session_id, tenant)
        return pb.DeleteSessionResponse(deleted=deleted)
