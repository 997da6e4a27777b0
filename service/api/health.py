"""grpc.health.v1 that tells the truth: ready only while models are loaded and the store answers.

Service names: "" and every served API (`rnnserve.v1.RnnServe`, `inference.GRPCInferenceService`) report
readiness: NOT_SERVING while the session store is unreachable or the server drains. `liveness` reports
SERVING for as long as the process serves at all, drain included, so a liveness probe never kills a
replica that is only waiting for its store or finishing its streams.

A drain also ends every `Watch` (after it has sent NOT_SERVING), so watchers never hold a shutdown for
its grace period.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LIVENESS = "liveness"
# HealthCheckResponse.ServingStatus values (grpc_health ships no type stubs).
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Readiness:
    """Whether this replica should get traffic, from what is known: the store, the models, the drain."""

    def __init__(self, services: Iterable[str], on_change: Callable[[bool], None] | None = None) -> None:
        self._services = ["", *services]
        self._on_change = on_change  # told whether the replica is ready, at every change (for /metrics)
        self.store_ok = True
        self.models_ok = True
        self.workers_ok = True  # False while the server's other worker processes are still starting
        self.draining = False
        self._version = 0
        self._changed = asyncio.Event()  # replaced by a fresh one at every change

    @property
    def ready(self) -> bool:
        return self.store_ok and self.models_ok and self.workers_ok and not self.draining

    def status(self, service: str) -> int | None:
        """None: not a service this server knows."""
        if service == LIVENESS:
            return SERVING
        if service in self._services:
            return SERVING if self.ready else NOT_SERVING
        return None

    def update(
        self, *, store_ok: bool | None = None, models_ok: bool | None = None, workers_ok: bool | None = None
    ) -> None:
        before = self.ready
        if store_ok is not None:
            self.store_ok = store_ok
        if models_ok is not None:
            self.models_ok = models_ok
        if workers_ok is not None:
            self.workers_ok = workers_ok
        if self.ready != before:
            self._notify()

    def drain(self) -> None:
        self.draining = True
        self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change(self.ready)
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changes(self) -> AsyncIterator[None]:
        """Yields once now, then after every change, until the drain."""
        seen = -1
        while True:
            changed = self._changed
            if self._version == seen:
                await changed.wait()
                continue
            seen = self._version
            yield
            if self.draining:
                return


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness

    async def Check(  # noqa: N802 - gRPC method name
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> health_pb2.HealthCheckResponse:
        status = self._readiness.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        async for _ in self._readiness.changes():
            status = self._readiness.status(request.service)
            status = UNKNOWN if status is None else status
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
