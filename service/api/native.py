"""The native API (rnnserve.v1): a thin adapter over the session engine."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterable, AsyncIterator
from functools import partial
from typing import TypeAlias

import grpc

from service.api.convert import fill_tensors, tensor_to_array
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.api.status import classify, grpc_status, unary
from service.api.streams import StreamGate, answer_all, failed, time_steps
from service.auth import Authenticator, tenant_of, while_valid
from service.errors import InvalidArgument, Overloaded, RnnServeError, SeqOutOfOrder
from service.metrics import Metrics
from service.models import LoadedModel
from service.sessions import Answer, SessionEngine, Step, StepResult
from service.settings import Settings

log = logging.getLogger(__name__)

# Which process answers a stream (one of several workers on a port, on a host): for operators, tests, and
# clients that spread their streams over the workers.
WORKER_METADATA = (("rnnserve-worker", str(os.getpid())), ("rnnserve-host", socket.gethostname()))

StreamContext: TypeAlias = grpc.aio.ServicerContext[pb.StepRequest, pb.StepResponse]
BatchContext: TypeAlias = grpc.aio.ServicerContext[pb.StepBatch, pb.StepBatchResult]


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


def _step(request: pb.StepRequest, tenant: str) -> Step:
    return Step(
        model=request.model,
        version=request.version,
        session_id=request.session_id,
        seq=request.seq,
        start=request.start,
        end=request.end,
        start_id=request.start_id,
        x=tensor_to_array(request.input),
        tenant=tenant,
    )


def _session_of(request: pb.StepRequest) -> tuple[str, str]:
    return request.model, request.session_id


def _in_order(batch: pb.StepBatch) -> int:
    """Batches are answered in the order they came."""
    return 0


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
                answers = answer_all(requests, submit, self._respond, limit, self._gate, _session_of, self._weight)
                async for response in answers:
                    yield response
        except RnnServeError as refusal:  # steps answer in-band: only the gate refuses a whole stream
            self.metrics.errors.labels("Stream", refusal.code.name).inc()
            await context.abort(grpc_status(refusal.code), refusal.message)

    async def StreamBatch(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterable[pb.StepBatch], context: BatchContext
    ) -> AsyncIterator[pb.StepBatchResult]:
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
                    self._weigh_batch,
                )
                async for response in answers:
                    yield response
        except RnnServeError as refusal:  # steps answer in-band: only the gate refuses a whole stream
            self.metrics.errors.labels("StreamBatch", refusal.code.name).inc()
            await context.abort(grpc_status(refusal.code), refusal.message)

    def _weight(self, request: pb.StepRequest) -> int:
        return time_steps(request.input.shape, self._settings.max_inflight_per_stream)

    def _weigh_batch(self, batch: pb.StepBatch) -> int:
        """The time steps of all its steps (an empty batch weighs 1)."""
        return max(1, sum(self._weight(request) for request in batch.steps))

    def _submit_batch(self, batch: pb.StepBatch, tenant: str) -> asyncio.Future[list[Answer]]:
        """Every step of the batch started at once (the engine batches them together); done when all are."""
        limit = self._settings.max_steps_per_message
        if len(batch.steps) > limit:
            too_many = Overloaded(f"a StepBatch holds at most {limit} steps, this one {len(batch.steps)}; split it")
            return self._engine.submit_many([too_many] * len(batch.steps))
        steps: list[Step | BaseException] = []
        seen: set[tuple[str, str]] = set()
        for request in batch.steps:
            session = (request.model, request.session_id)
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
                steps.append(_step(request, tenant))
            except Exception as err:  # noqa: BLE001 - answered in-band (a fault as INTERNAL, logged): the others go on
                steps.append(err)
        return self._engine.submit_many(steps)

    def _respond_batch(
        self, batch: pb.StepBatch, done: asyncio.Future[list[Answer]], taken: float
    ) -> pb.StepBatchResult:
        result = pb.StepBatchResult(id=batch.id)
        add = result.responses.add  # filled in place: a message built apart is copied when appended
        for request, answer in zip(batch.steps, done.result(), strict=True):
            self._fill(add(), request, answer, "StreamBatch")
        return result

    def _submit(self, request: pb.StepRequest, tenant: str) -> asyncio.Future[StepResult]:
        try:
            step = _step(request, tenant)
        except Exception as err:  # noqa: BLE001 - answered in-band (a fault as INTERNAL, logged): the stream goes on
            return failed(err)
        return self._engine.submit(step)

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
