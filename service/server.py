"""Wiring, start-up and the drain order. The one place that knows every part.

Start: /metrics port, models, store, engine, then gRPC; anything that cannot start is a clear error and
releases what had started. Stop (SIGTERM): readiness NOT_SERVING and health watches end, new streams
are refused, open streams stop reading, answer what they took (computed and committed) and end, up to
the grace period; then gRPC stops, and the runtime and the store close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

from service.api import kserve_messages
from service.api.health import HealthServicer, Readiness
from service.api.kserve import KServeServicer
from service.api.native import NativeServicer, add_to_server
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.streams import StreamGate
from service.auth import Authenticator, AuthInterceptor
from service.batching import raise_if_cancelled
from service.errors import RnnServeError, StartupError, StoreRefused, Unavailable
from service.loader import ModelLoader
from service.metrics import Metrics
from service.models import ModelRegistry
from service.sessions import SessionEngine
from service.settings import CLUSTER_SCHEME, CLUSTER_TLS_SCHEME, RedisSettings, Settings, TlsSettings
from service.state.memory_store import MemoryStateStore
from service.state.store import StateStore
from service.tls import load_key_pair

log = logging.getLogger(__name__)

NATIVE_SERVICE = pb.DESCRIPTOR.services_by_name["RnnServe"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def open_store(settings: RedisSettings) -> StateStore:
    if not settings.url:  # a URL of another scheme is refused by RedisSettings
        return MemoryStateStore()
    if settings.url.startswith((CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)):
        from service.state.redis_cluster import RedisClusterStore

        return RedisClusterStore(settings)
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
    readiness: Readiness
    loader: ModelLoader
    metrics: Metrics
    metrics_http: WSGIServer | None
    settings: Settings
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def siblings_started(self) -> None:
        """Every worker process of this server is up: take streams, and say so to readiness."""
        self.gate.release()
        self.readiness.update(workers_ok=True)

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        started = time.perf_counter()
        self.readiness.drain()
        self.gate.drain()
        if not await self.gate.wait_closed(grace):
            log.warning("%d streams still open after the %.1fs grace period; ending them", self.gate.open, grace)
        try:
            await self.server.stop(max(0.0, grace - (time.perf_counter() - started)))
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            # What the streams took still lands, within the grace (at least a moment for the last batch).
            await self.engine.stop(max(1.0, grace - (time.perf_counter() - started)))
            await self.store.close()
            _close_http(self.metrics_http)
        log.info("stopped in %.2fs", time.perf_counter() - started)


SIBLINGS_STARTING = "this server's worker processes are still starting; retry in a moment"


async def create_server(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    *,
    shared_port: bool = False,
    siblings_starting: bool = False,
) -> App:
    """Load the models, open the store, start gRPC (and /metrics). Port 0 picks a free port.

    `shared_port`: one of several worker processes on one port (service/workers.py), which has checked
    that no other server holds it. `siblings_starting`: the other workers are not all up yet; until
    `App.siblings_started`, new streams are refused and readiness says NOT_SERVING (a stream taken now
    would stay on this worker, however the connections spread once every worker listens)."""
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    metrics_http, metrics_port = _start_metrics(settings, metrics)
    store: StateStore | None = None
    engine: SessionEngine | None = None
    try:
        models = await asyncio.to_thread(ModelRegistry.from_repository, settings.model_repo, settings.runtime)
        store = open_store(settings.redis)
        store_ok = await _first_ping(store)
        if not store.durable:
            log.warning(
                "session state is kept in this process's memory: it is neither shared between replicas nor "
                "durable across restarts. Pass --redis-url for production"
            )
        engine = SessionEngine(models, store, settings, metrics)
        await engine.start()
        app = await _serve_grpc(
            settings, metrics, models, store, engine, metrics_http, metrics_port, shared_port, siblings_starting
        )
        app.readiness.update(store_ok=store_ok)
    except BaseException:
        if engine is not None:
            await engine.stop()
        if store is not None:
            await store.close()
        _close_http(metrics_http)
        raise
    log.info("serving gRPC on port %d, /metrics on %s", app.port, metrics_port)
    return app


async def _serve_grpc(
    settings: Settings,
    metrics: Metrics,
    models: ModelRegistry,
    store: StateStore,
    engine: SessionEngine,
    metrics_http: WSGIServer | None,
    metrics_port: int | None,
    shared_port: bool,
    siblings_starting: bool = False,
) -> App:
    auth = Authenticator(settings.auth) if settings.auth.token_file is not None else None
    interceptors = []
    if auth is not None:
        interceptors.append(AuthInterceptor(auth, lambda method, code: metrics.errors.labels(method, code).inc()))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Answers are not capped: bounded by the requests taken, they can still outgrow them (a
            # model's outputs may be larger than its inputs), and a capped answer could never be sent.
            ("grpc.max_send_message_length", -1),
            # A port held by another server is an error, not a port to share (gRPC shares by default);
            # worker processes of one server share theirs on purpose.
            ("grpc.so_reuseport", 1 if shared_port else 0),
            # Clients ping every 20 s to find dead peers (service/client.py); gRPC's default policy would
            # answer such pings on an idle stream with GOAWAY.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    readiness = Readiness(
        [NATIVE_SERVICE, kserve_messages.SERVICE], on_change=lambda ready: metrics.ready.set(int(ready))
    )
    metrics.ready.set(1)
    loader = ModelLoader(
        models,
        settings,
        metrics,
        in_use=engine.cache.fingerprints,
        on_change=lambda: readiness.update(models_ok=len(models) > 0),
    )
    gate = StreamGate(settings.max_streams, metrics)
    if siblings_starting:  # before the port opens: no stream can slip in first
        gate.hold(SIBLINGS_STARTING)
        readiness.update(workers_ok=False)
    metrics.stream_limit.set(settings.max_streams)
    metrics.session_cache_limit.set(settings.sessions.cache_max_sessions)
    native = NativeServicer(engine, settings, metrics, gate, auth)
    add_to_server(native, server)
    kserve = KServeServicer(engine, settings, metrics, gate, readiness, loader, auth)
    server.add_generic_rpc_handlers((kserve.handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(readiness), server)
    reflection.enable_server_reflection(
        [NATIVE_SERVICE, kserve_messages.SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME],
        server,
        pool=_reflection_pool(),
    )
    credentials = server_credentials(settings.tls)
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as err:
        raise StartupError(
            f"cannot listen on {settings.host}:{settings.port} for gRPC ({err}); is another server using it? "
            "Pick another --port, or 0 for a free one"
        ) from err
    await server.start()
    app = App(
        server,
        port,
        metrics_port,
        engine,
        store,
        native,
        kserve,
        gate,
        readiness,
        loader,
        metrics,
        metrics_http,
        settings,
    )
    app.tasks.append(asyncio.create_task(_probe_store(store, readiness, settings.health_probe_interval_s)))
    if settings.model_poll_interval_s > 0:
        app.tasks.append(asyncio.create_task(loader.run()))
    return app


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS (and with a client CA, mutual TLS) for the gRPC port; None: plaintext."""
    if tls.cert is None or tls.key is None:
        return None
    try:
        chain, key = tls.cert.read_bytes(), tls.key.read_bytes()
        client_ca = tls.client_ca.read_bytes() if tls.client_ca else None
    except OSError as err:
        raise StartupError(f"cannot read a TLS file ({err}); check --tls-cert, --tls-key and --tls-client-ca") from err
    if (
        b"-----BEGIN" not in chain
        or b"-----BEGIN" not in key
        or (client_ca is not None and b"-----BEGIN" not in client_ca)
    ):
        raise StartupError("the TLS certificate, key and client CA must be PEM files (-----BEGIN ...)")
    # gRPC would only say that it cannot bind the port: check the files with Python's ssl first.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        load_key_pair(context, tls.cert, tls.key)
    except (ssl.SSLError, ValueError) as err:
        raise StartupError(
            f"--tls-cert {tls.cert} and --tls-key {tls.key} are not a certificate and its (unencrypted) private "
            f"key: {err}"
        ) from err
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as err:
            raise StartupError(f"--tls-client-ca {tls.client_ca} holds no CA certificate: {err}") from err
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def _start_metrics(settings: Settings, metrics: Metrics) -> tuple[WSGIServer | None, int | None]:
    if settings.metrics_port is None:
        return None, None
    try:
        http, _ = start_http_server(settings.metrics_port, registry=metrics.registry)
    except OSError as err:
        raise StartupError(
            f"cannot serve /metrics on port {settings.metrics_port} ({err.strerror}); pick another "
            "--metrics-port, 0 for a free one, or none for no /metrics"
        ) from err
    return http, http.server_port


def _close_http(http: WSGIServer | None) -> None:
    if http is not None:
        http.shutdown()
        http.server_close()


async def _first_ping(store: StateStore) -> bool:
    """Whether the store answers at start-up. One that cannot be reached (down, or not up yet: a pod
    started beside its Redis, or during an outage) is not a reason not to start: the server starts
    not ready (NOT_SERVING) and turns ready when the store answers. One that answers and refuses (a wrong
    password, say) is a configuration error: StoreRefused stops the start."""
    try:
        await store.ping()
    except StoreRefused:  # answered, and refused (a subclass of Unavailable: see service/errors.py)
        raise
    except Unavailable as err:
        log.error("session store unreachable at start-up (%s): not ready (NOT_SERVING) until it answers", err)
        return False
    return True


async def _probe_store(store: StateStore, readiness: Readiness, interval_s: float) -> None:
    """Readiness follows the store: NOT_SERVING while it does not answer, SERVING once it does again."""
    while True:
        try:
            # Not cancelled from outside: every store call is bounded on its own (the pool wait, the
            # connect, the round trip), and a connection cancelled mid-handshake would leave its socket open.
            await store.ping()
            reachable, why = True, ""
        except (RnnServeError, TimeoutError) as err:
            raise_if_cancelled()  # a stop, whatever the timeout made of it
            reachable, why = False, str(err) or "no answer"
        except Exception as err:  # a fault of ours: logged, counted as unreachable, and the probe goes on
            log.exception("the session store's readiness probe failed")
            reachable, why = False, f"{type(err).__name__}: {err}"
        if reachable != readiness.store_ok:
            if reachable:
                log.warning("session store reachable again: ready (SERVING)")
            else:
                log.error("session store unreachable (%s): not ready (NOT_SERVING) until it answers", why)
        readiness.update(store_ok=reachable)
        raise_if_cancelled()  # a stop whose cancellation a store call swallowed (a client library's connect)
        await asyncio.sleep(interval_s)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every served service in one pool: the KServe definitions live in a private pool (tritonclient
    registers the same names in the default one), the others are copied next to them."""
    pool = descriptor_pool.DescriptorPool()
    names = set()
    for file in descriptor_pb2.FileDescriptorSet.FromString(kserve_messages.DESCRIPTORS.read_bytes()).file:
        pool.Add(file)  # type: ignore[no-untyped-call]
        names.add(file.name)
    for module in (pb, health_pb2, reflection_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        if proto.name not in names:
            pool.Add(proto)  # type: ignore[no-untyped-call]
    return pool


def keep_out_of_collections() -> None:
    """Take what starting made out of the garbage collector's reach (`gc.freeze`): the modules, the message,
    settings and metric classes, the models. It lives as long as the process, yet every full collection
    walked it: in a worker at fan-in, about 65,000 objects, each full collection about 37 ms (20 of them in
    a 15 s run), its steps' CPU 16 % more and its p99 twice as long. Called once the server is up, so a
    full collection walks only what serving made since."""
    gc.collect()
    gc.freeze()


async def serve(
    settings: Settings,
    *,
    shared_port: bool = False,
    on_ready: Callable[[], None] | None = None,
    siblings_fd: int | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain. The signals are caught from the start: one that comes
    while the server is starting stops it as soon as it has started. `siblings_fd`: a pipe that becomes
    readable (a byte, or its end) once every worker process of the server is up; streams wait for it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = await create_server(settings, shared_port=shared_port, siblings_starting=siblings_fd is not None)
    if siblings_fd is not None:
        fd = siblings_fd

        def started() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            app.siblings_started()
            log.info("every worker process is up: taking streams")

        loop.add_reader(fd, started)
    keep_out_of_collections()
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
        log.info("stopping: draining in-flight steps (grace %.1fs)", settings.shutdown_grace_s)
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await app.stop()
