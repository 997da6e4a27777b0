"""The KServe v2 / Open Inference Protocol with Triton's sequence extension: a second adapter over the
same session engine, so existing Triton clients work unchanged.

Sequences map onto sessions: `sequence_id` is the session id, `sequence_start` / `sequence_end` the
start and end flags. A client that numbers its steps with the request parameter `rnnserve_seq` gets the
native API's semantics (a resend is answered from the store, a gap is refused); without it the server
numbers the steps, and a repeated request is applied again. Every sequence response carries the applied
number in its `rnnserve_seq` parameter.

Stream errors follow Triton: in-band `error_message` with the stream left open, or, when the request
metadata carries `triton_grpc_error: true`, a gRPC status that ends the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias

import grpc

from service import __version__
from service.api import kserve_messages as kv
from service.api.health import Readiness
from service.api.kserve_convert import (
    SEQ_PARAMETER,
    Sequence,
    infer_response,
    input_array,
    model_config,
    model_metadata,
    parse_version,
    sequence_of,
)
from service.api.status import classify, grpc_status, unary
from service.api.streams import StreamGate, answer_all, failed, time_steps, weighed
from service.auth import Authenticator, tenant_of, while_valid
from service.errors import Drained, InvalidArgument, ModelNotFound, RnnServeError, SessionEnded, SessionNotFound
from service.loader import ModelLoader
from service.metrics import Metrics
from service.sessions import SessionEngine, Step, StepResult
from service.settings import Settings

EXTENSIONS = [
    "sequence",
    "sequence(string_id)",
    "model_configuration",
    "model_repository",
    "statistics",
    "parameters",
]
ERROR_HEADER = "triton_grpc_error"

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


@dataclass
class _Statistics:
    """Triton's per-model statistics, counted by this adapter."""

    last_inference_ms: int = 0
    inferences: int = 0
    executions: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0


class KServeServicer:
    def __init__(
        self,
        engine: SessionEngine,
        settings: Settings,
        metrics: Metrics,
        gate: StreamGate,
        readiness: Readiness,
        loader: ModelLoader,
        auth: Authenticator | None,
    ) -> None:
        self.metrics = metrics
        self._auth = auth
        self._gate = gate
        self._readiness = readiness
        self._loader = loader
        self._engine = engine
        self._settings = settings
        self._statistics: dict[tuple[str, int], _Statistics] = {}

    def handler(self) -> grpc.GenericRpcHandler:
        def unary_method(method: Callable[..., Any], request: Any, response: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )

        methods = {
            "ServerLive": unary_method(self.ServerLive, kv.ServerLiveRequest, kv.ServerLiveResponse),
            "ServerReady": unary_method(self.ServerReady, kv.ServerReadyRequest, kv.ServerReadyResponse),
            "ModelReady": unary_method(self.ModelReady, kv.ModelReadyRequest, kv.ModelReadyResponse),
            "ServerMetadata": unary_method(self.ServerMetadata, kv.ServerMetadataRequest, kv.ServerMetadataResponse),
            "ModelMetadata": unary_method(self.ModelMetadata, kv.ModelMetadataRequest, kv.ModelMetadataResponse),
            "ModelConfig": unary_method(self.ModelConfig, kv.ModelConfigRequest, kv.ModelConfigResponse),
            "ModelStatistics": unary_method(
                self.ModelStatistics, kv.ModelStatisticsRequest, kv.ModelStatisticsResponse
            ),
            "RepositoryIndex": unary_method(
                self.RepositoryIndex, kv.RepositoryIndexRequest, kv.RepositoryIndexResponse
            ),
            "RepositoryModelLoad": unary_method(
                self.RepositoryModelLoad, kv.RepositoryModelLoadRequest, kv.RepositoryModelLoadResponse
            ),
            "RepositoryModelUnload": unary_method(
                self.RepositoryModelUnload, kv.RepositoryModelUnloadRequest, kv.RepositoryModelUnloadResponse
            ),
            "ModelInfer": unary_method(self.ModelInfer, kv.ModelInferRequest, kv.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.ModelStreamInfer,
                request_deserializer=kv.ModelInferRequest.FromString,
                response_serializer=kv.ModelStreamInferResponse.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(kv.SERVICE, methods)

    # -- health and metadata -------------------------------------------------------------------

    @unary
    async def ServerLive(self, request: Any, context: Context) -> Any:  # noqa: N802
        return kv.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request: Any, context: Context) -> Any:  # noqa: N802
        return kv.ServerReadyResponse(ready=self._readiness.ready)

    @unary
    async def ModelReady(self, request: Any, context: Context) -> Any:  # noqa: N802
        try:
            self._engine.registry.get(request.name, parse_version(request.version))
        except ModelNotFound:
            return kv.ModelReadyResponse(ready=False)
        return kv.ModelReadyResponse(ready=self._readiness.ready)

    @unary
    async def ServerMetadata(self, request: Any, context: Context) -> Any:  # noqa: N802
        return kv.ServerMetadataResponse(name="rnnserve", version=__version__, extensions=EXTENSIONS)

    @unary
    async def ModelMetadata(self, request: Any, context: Context) -> Any:  # noqa: N802
        model = self._engine.registry.get(request.name, parse_version(request.version))
        versions = [m for m in self._engine.registry.all() if m.name == model.name]
        return model_metadata(versions if not request.version else [model])

    @unary
    async def ModelConfig(self, request: Any, context: Context) -> Any:  # noqa: N802
        model = self._engine.registry.get(request.name, parse_version(request.version))
        batching = self._settings.batching
        return model_config(
            model, batching.max_batch_size, self._settings.sessions.state_ttl_s, batching.max_batch_wait_us
        )

    @unary
    async def ModelStatistics(self, request: Any, context: Context) -> Any:  # noqa: N802
        self._require_admin(context)  # every tenant's traffic
        models = self._engine.registry.all()
        if request.name:
            wanted = self._engine.registry.get(request.name, parse_version(request.version))
            models = [m for m in models if m.name == wanted.name and (not request.version or m is wanted)]
        response = kv.ModelStatisticsResponse()
        for model in models:
            stats = self._statistics.get((model.name, model.version), _Statistics())
            entry = response.model_stats.add(
                name=model.name,
                version=str(model.version),
                last_inference=stats.last_inference_ms,
                inference_count=stats.inferences,
                execution_count=stats.executions,
            )
            entry.inference_stats.success.count = stats.success_count
            entry.inference_stats.success.ns = stats.success_ns
            entry.inference_stats.fail.count = stats.fail_count
            entry.inference_stats.fail.ns = stats.fail_ns
        return response

    @unary
    async def RepositoryIndex(self, request: Any, context: Context) -> Any:  # noqa: N802
        response = kv.RepositoryIndexResponse()
        for model in self._engine.registry.all():
            response.models.add(name=model.name, version=str(model.version), state="READY")
        return response

    @unary
    async def RepositoryModelLoad(self, request: Any, context: Context) -> Any:  # noqa: N802
        self._require_admin(context)
        await self._loader.load(request.model_name)
        return kv.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(self, request: Any, context: Context) -> Any:  # noqa: N802
        self._require_admin(context)
        await self._loader.unload(request.model_name)
        return kv.RepositoryModelUnloadResponse()

    def _require_admin(self, context: Context) -> None:
        """Loading, unloading and statistics concern every tenant: with authentication on, only
        auth.admin_tenants may."""
        if self._auth is not None:
            self._auth.require_admin(context.invocation_metadata())

    # -- inference -----------------------------------------------------------------------------

    @unary
    async def ModelInfer(self, request: Any, context: Context) -> Any:  # noqa: N802
        taken = time.perf_counter()
        started = self._start(request, tenant_of(self._auth, context.invocation_metadata()))
        await asyncio.wait([started])
        return self._finish(request, started, taken)

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterable[Any], context: Context
    ) -> AsyncIterator[Any]:
        metadata_list = context.invocation_metadata()
        metadata = {key.lower(): value for key, value in (metadata_list or ())}
        in_band = str(metadata.get(ERROR_HEADER, "")).lower() != "true"

        def respond(request: Any, done: asyncio.Future[Any], taken: float) -> Any:
            try:
                return kv.ModelStreamInferResponse(infer_response=self._finish(request, done, taken))
            except Exception as err:
                if not in_band:
                    raise
                code, message = classify(err, "ModelStreamInfer")
                self.metrics.errors.labels("ModelStreamInfer", code.name).inc()
                echo = kv.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                return kv.ModelStreamInferResponse(error_message=message, infer_response=echo)

        try:
            start = partial(self._start, tenant=tenant_of(self._auth, metadata_list))
            requests = while_valid(request_iterator, self._auth, metadata_list)
            with self._gate.admit():
                limit = self._settings.max_inflight_per_stream
                start_weighed = weighed(start, _weight_of(limit))
                answers = answer_all(requests, start_weighed, respond, limit, self._gate, _sequence_key)
                async for response in answers:
                    yield response
        except Exception as err:  # noqa: BLE001 - refused by the gate, drained, or (triton_grpc_error) the first error
            code, message = classify(err, "ModelStreamInfer")
            if not isinstance(err, Drained):  # an orderly end, not an error
                self.metrics.errors.labels("ModelStreamInfer", code.name).inc()
            await context.abort(grpc_status(code), message)

    def _start(self, request: Any, tenant: str) -> asyncio.Future[Any]:
        """A sequence step for the engine, or a whole sequence; the future holds a StepResult, or the
        (model, outputs) of a whole sequence."""
        try:
            model = self._engine.registry.get(request.model_name, parse_version(request.model_version))
            sequence = sequence_of(request)
            x = input_array(request, model)
            if sequence.session_id is None:
                return asyncio.ensure_future(self._engine.infer(model.name, model.version, x))
            return self._engine.submit(self._sequence_step(request, sequence, x, tenant))
        except Exception as err:  # noqa: BLE001 - refused; answered by _finish
            return failed(err)

    def _finish(self, request: Any, done: asyncio.Future[Any], taken: float) -> Any:
        """The response to a started request, counted in Triton's statistics; raises its error."""
        stats = self._stats_for(request)
        try:
            error = done.exception()
            if isinstance(error, SessionNotFound) and not isinstance(error, SessionEnded):
                raise SessionNotFound(
                    f"inference request for sequence {sequence_of(request).session_id} to model "
                    f"'{request.model_name}' must specify the START flag on the first request of the sequence "
                    "(it was never started, or idled out)"
                ) from error
            if error is not None:
                raise error
            result = done.result()
            if isinstance(result, StepResult):
                # A continuing sequence runs on the version it started on, whatever the request named.
                model = self._engine.registry.get(result.model, result.version)
                outputs = {output: value[None] for output, value in result.outputs.items()}
            else:
                model, outputs = result
            response = infer_response(request, model, outputs)
            if isinstance(result, StepResult):
                response.parameters[SEQ_PARAMETER].int64_param = result.seq
        except Exception:
            if stats is not None:
                stats.fail_count += 1
                stats.fail_ns += int((time.perf_counter() - taken) * 1e9)
            raise
        if stats is not None:
            stats.last_inference_ms = time.time_ns() // 1_000_000
            stats.inferences += len(next(iter(outputs.values())))
            stats.executions += 1
            stats.success_count += 1
            stats.success_ns += int((time.perf_counter() - taken) * 1e9)
        return response

    def _stats_for(self, request: Any) -> _Statistics | None:
        try:
            model = self._engine.registry.get(request.model_name, parse_version(request.model_version))
        except RnnServeError:
            return None
        stats = self._statistics.get(key := (model.name, model.version))
        if stats is None:  # made only when new (a default to setdefault is made on every request)
            stats = self._statistics[key] = _Statistics()
        return stats

    @staticmethod
    def _sequence_step(request: Any, sequence: Sequence, x: Any, tenant: str) -> Step:
        if x.shape[0] != 1:
            raise InvalidArgument(
                f"inference request to model '{request.model_name}' must specify batch-size 1 due to requirements "
                "of sequence batcher"
            )
        assert sequence.session_id is not None
        return Step(
            model=request.model_name,
            version=parse_version(request.model_version),
            session_id=sequence.session_id,
            seq=sequence.seq,
            x=x[0],
            start=sequence.start,
            end=sequence.end,
            start_id=sequence.start_id,
            tenant=tenant,
        )


def _weight_of(limit: int) -> Callable[[Any], int]:
    """A request's weight against the stream's in-flight limit: its input's rows × time steps."""

    def weight(request: Any) -> int:
        return time_steps(request.inputs[0].shape, limit) if request.inputs else 1

    return weight


def _sequence_key(request: Any) -> tuple[str, Any]:
    """Requests of one sequence are answered in order; others (no sequence id) in any order."""
    if "sequence_id" in request.parameters:
        parameter = request.parameters["sequence_id"]
        kind = parameter.WhichOneof("parameter_choice")
        value = getattr(parameter, kind) if kind else None
        if value:
            return (request.model_name, str(value))
    return ("", id(request))
