"""Wiring, start-up and the drain order. The one place that knows every part.

Stop order: report NOT_SERVING, refuse new streams, let in-flight steps finish and commit (up to the
grace period), then close the runtime threads and the store.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from service.api.kserve import KServeServicer
from service.api.native import NativeServicer
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.api.streams import StreamGate
from service.metrics import Metrics
from service.models import ModelRegistry
from service.sessions import SessionEngine
from service.settings import RedisSettings, Settings
from service.state.memory_store import MemoryStateStore
from service.state.store import StateStore

log = logging.getLogger(__name__)

NATIVE_SERVICE = pb.DESCRIPTOR.services_by_name["RnnServe"].full_name


def open_store(settings: RedisSettings) -> StateStore:
    if not settings.url:
        return MemoryStateStore()
    scheme = settings.url.partition("://")[0]
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported store URL scheme {scheme!r}: use redis://, rediss:// or unix://")
    from service.state.redis_store import RedisStateStore

    return RedisStateStore(settings)


@dataclass
class App:
    """A running server. `stop()` drains it."""

    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    engine: SessionEngine
    store: StateStore
    native: NativeServicer
    kserve: KServeServicer
    gate: StreamGate
    health: health_aio.HealthServicer
    metrics: Metrics
    metrics_http: WSGIServer | None
    settings: Settings

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        started = time.perf_counter()
        await self.health.enter_graceful_shutdown()
        self.gate.drain()
        try:
            await self.server.stop(grace)
        finally:
            await self.engine.stop()
            await self.store.close()
            if self.metrics_http is not None:
                self.metrics_http.shutdown()
                self.metrics_http.server_close()
        log.info("stopped in %.2fs", time.perf_counter() - started)


async def create_server(settings: Settings, registry: CollectorRegistry | None = None) -> App:
    """Load the models, open the store, start gRPC (and /metrics). Port 0 picks a free port."""
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    models = await asyncio.to_thread(ModelRegistry.from_repository, settings.model_repo, settings.runtime)
    for model in models.all():
        metrics.model_info.labels(model.name, model.version, model.runtime.providers[0], model.manifest.precision).set(
            1
        )
    store = open_store(settings.redis)
    await store.ping()
    if not store.durable:
        log.warning(
            "session state is kept in this process's memory: it is neither shared between replicas nor "
            "durable across restarts. Pass --redis-url for production"
        )
    engine = SessionEngine(models, store, settings, metrics)
    await engine.start()

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Clients ping every 20 s to find dead peers (service/client.py); gRPC's default policy would
            # answer such pings on an idle stream with GOAWAY.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
        ]
    )
    gate = StreamGate(settings.max_streams, metrics)
    native = NativeServicer(engine, settings, metrics, gate)
    pb_grpc.add_RnnServeServicer_to_server(native, server)
    kserve = KServeServicer(engine, settings, metrics, gate)
    server.add_generic_rpc_handlers((kserve.handler(),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [NATIVE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    for service in ("", NATIVE_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)

    metrics_http, metrics_port = None, None
    if settings.metrics_port is not None:
        metrics_http, _ = start_http_server(settings.metrics_port, registry=metrics.registry)
        metrics_port = metrics_http.server_port
    log.info("serving gRPC on port %d, /metrics on %s", port, metrics_port)
    return App(server, port, metrics_port, engine, store, native, kserve, gate, health, metrics, metrics_http, settings)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    app = await create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping: draining in-flight steps (grace %.1fs)", settings.shutdown_grace_s)
    finally:
        await app.stop()
