"""What operators rely on: readiness that follows the store, a drain that answers its probes, models
loaded and unloaded live, and start-up errors that say what to do."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import shutil
import socket
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from service.api.health import Readiness
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.cli import main as cli_main
from service.errors import StartupError, Unavailable
from service.repository import MANIFEST_FILE
from service.server import _probe_store, create_server
from service.state.memory_store import MemoryStateStore
from tests.conftest import exchange, logits_of, server_settings, step_request, variant_repo
from tests.service.test_session_contract import EXPECTED, TOLERANCE, X, assert_matches, steps

SERVICES = ("", "rnnserve.v1.RnnServe", "inference.GRPCInferenceService")


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Wait for `condition` to hold, polling; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def health_of(target: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_readiness_follows_the_store(start_server, persistent_redis):
    app = await start_server(
        url=persistent_redis.url,
        health_probe_interval_s=0.2,
        redis={"socket_timeout_s": 0.3, "connect_timeout_s": 0.3},
    )
    target = f"127.0.0.1:{app.port}"
    for service in SERVICES:
        assert await health_of(target, service) == SERVING
    assert await asyncio.to_thread(cli_main, ["health", "--target", target]) == 0  # the image's HEALTHCHECK
    persistent_redis.stop()
    started = time.monotonic()
    await eventually(lambda: _is(health_of(target), NOT_SERVING))
    assert time.monotonic() - started < 3
    for service in SERVICES:
        assert await health_of(target, service) == NOT_SERVING
    assert await health_of(target, "liveness") == SERVING  # alive: not a reason to restart the pod
    assert await asyncio.to_thread(cli_main, ["health", "--target", target]) == 1
    assert await asyncio.to_thread(cli_main, ["health", "--target", target, "--service", "liveness"]) == 0
    async with triton_aio.InferenceServerClient(target) as client:
        assert not await client.is_server_ready() and not await client.is_model_ready("charlm")
        assert await client.is_server_live()
    persistent_redis.start()
    await eventually(lambda: _is(health_of(target), SERVING))
    async with triton_aio.InferenceServerClient(target) as client:
        assert await client.is_server_ready() and await client.is_model_ready("charlm")
    assert_matches(await exchange(target, steps("after", 1, 2)), first=1)


async def test_the_readiness_probe_outlives_a_fault_of_ours(caplog):
    """A store call that fails with a bug of ours (not a store error) counts as unreachable, is logged with
    its traceback, and the probe goes on: it must never stop following the store."""

    class Faulty(MemoryStateStore):
        calls = 0

        async def ping(self) -> None:
            Faulty.calls += 1
            if Faulty.calls == 2:
                raise TypeError("'NoneType' object is not iterable")

    readiness = Readiness([])
    probe = asyncio.create_task(_probe_store(Faulty(), readiness, 0.01))
    try:
        deadline = time.monotonic() + 5
        while Faulty.calls < 5:
            assert not probe.done() and time.monotonic() < deadline, "the probe stopped"
            await asyncio.sleep(0.01)
        assert readiness.store_ok
    finally:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
    assert "readiness probe failed" in caplog.text and "TypeError" in caplog.text


async def test_a_server_started_while_redis_is_down_waits_unready_and_serves_once_it_answers(
    start_server, persistent_redis
):
    """A pod started beside its Redis, or during an outage, must not crash-loop: it starts NOT_SERVING."""
    persistent_redis.stop()
    app = await start_server(
        url=persistent_redis.url,
        health_probe_interval_s=0.2,
        redis={"socket_timeout_s": 0.3, "connect_timeout_s": 0.3},
    )
    target = f"127.0.0.1:{app.port}"
    assert await health_of(target) == NOT_SERVING
    assert await health_of(target, "liveness") == SERVING
    assert app.metrics.registry.get_sample_value("rnnserve_ready") == 0  # what the NotReady alert reads
    demo = ["demo", "--target", target, "--steps", "2", "--generate", "0"]
    assert await asyncio.to_thread(cli_main, demo) == 2  # refused steps: a message, not a traceback
    persistent_redis.start()
    await eventually(lambda: _is(health_of(target), SERVING))
    assert app.metrics.registry.get_sample_value("rnnserve_ready") == 1
    assert_matches(await exchange(target, steps("late", 1, 2)), first=1)


def test_the_health_command_fails_for_a_server_it_cannot_reach(capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert cli_main(["health", "--target", f"127.0.0.1:{port}", "--timeout", "0.5"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().out


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _is_now(value: bool) -> bool:
    return value


async def test_a_drain_answers_probes_ends_watches_and_is_not_held_by_them(start_server):
    app = await start_server(batching={"max_batch_wait_us": 800_000})  # a step stays in flight 0.8 s
    target = f"127.0.0.1:{app.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        stream = pb_grpc.RnnServeStub(channel).Stream()
        await stream.write(steps("d", 1, 1)[0])
        await eventually(lambda: _is_now(app.engine.sessions_in_flight == 1))  # taken, waiting in its batch
        started = time.monotonic()
        stopping = asyncio.create_task(app.stop(grace_s=5))
        assert (await watch.read()).status == NOT_SERVING
        assert await watch.read() is grpc.aio.EOF  # the watch ends: it does not hold the shutdown
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert reply.status == NOT_SERVING  # a probe during the drain gets an answer, not CANCELLED
        assert await health_of(target, "liveness") == SERVING  # draining is not dying
        answer = await stream.read()
        assert answer.seq == 1 and not answer.HasField("error")  # the step in flight is answered
        with pytest.raises(grpc.aio.AioRpcError) as ended:  # then it ends, UNAVAILABLE: reconnect elsewhere
            await stream.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        await stopping
        assert time.monotonic() - started < 2  # over when the streams are, not at the grace period
    errors = app.metrics.registry.get_sample_value("rnnserve_errors_total", {"method": "Stream", "code": "UNAVAILABLE"})
    assert errors is None  # the drain's end of a stream is not an error (alerts on the error ratio would fire)


async def test_reflection_and_health_cover_both_apis(start_server):
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in (await call.read()).list_services_response.service}
        await call.write(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        )
        files = (await call.read()).file_descriptor_response.file_descriptor_proto
        await call.done_writing()
    assert {"rnnserve.v1.RnnServe", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert files, "reflection must describe the KServe service, for grpcurl and friends"
    assert await health_of(target, "inference.GRPCInferenceService") == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health_of(target, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_new_version_is_served_live_and_a_pinned_session_carries_on(start_server, tmp_path, caplog):
    repo = variant_repo(tmp_path / "repo", versions={1: "a"})
    staged = variant_repo(tmp_path / "staged", versions={2: "b"})
    app = await start_server(repo, model_poll_interval_s=0.2)
    target = f"127.0.0.1:{app.port}"
    old = await exchange(target, steps("old", 1, 3))
    assert {r.version for r in old} == {1}
    caplog.set_level(logging.INFO, logger="service.loader")
    broken = repo / "charlm" / "3"
    broken.mkdir()
    (broken / MANIFEST_FILE).write_text("{not json")
    shutil.copytree(staged / "charlm" / "2", repo / "charlm" / "2")

    async def new_sessions_on_2() -> bool:
        (answer,) = await exchange(target, [step_request("probe", 1, X[:1], start=True)])
        return answer.version == 2

    await eventually(new_sessions_on_2, timeout_s=5)
    assert any("not loading charlm/3" in r.getMessage() for r in caplog.records)
    later = await exchange(target, steps("old", 4, 6))  # the pinned session continues exactly, on version 1
    assert {r.version for r in later} == {1}
    assert_matches(later, first=4)
    assert len([r for r in caplog.records if "not loading charlm/3" in r.getMessage()]) == 1  # logged once
    shutil.rmtree(repo / "charlm" / "1")  # in use by "old" (cached here): it stays until unused
    await asyncio.sleep(0.6)
    assert app.engine.registry.find("charlm", 1) is not None
    assert_matches(await exchange(target, steps("old", 7, 7)), first=7)
    async with grpc.aio.insecure_channel(target) as channel:
        await pb_grpc.RnnServeStub(channel).DeleteSession(pb.SessionRef(model="charlm", session_id="old"))

    async def unloaded() -> bool:
        return app.engine.registry.find("charlm", 1) is None

    await eventually(unloaded, timeout_s=5)


async def test_a_graph_onnx_runtime_refuses_is_skipped_at_start_and_live(start_server, tmp_path, caplog):
    """Bytes that match their manifest's fingerprint but are no graph ONNX Runtime can load."""
    repo = variant_repo(tmp_path / "repo", versions={1: "a"})
    bad = repo / "broken-model" / "1"
    bad.mkdir(parents=True)
    garbage = b"not an onnx graph"
    manifest = json.loads((repo / "charlm" / "1" / MANIFEST_FILE).read_text())
    manifest |= {"name": "broken-model", "fingerprint": hashlib.sha256(garbage).hexdigest()}
    (bad / "model.onnx").write_bytes(garbage)
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    app = await start_server(repo, model_poll_interval_s=0.2)  # starts: the bad model is only skipped
    target = f"127.0.0.1:{app.port}"
    assert any("not loading broken-model/1" in r.getMessage() for r in caplog.records)
    staged = variant_repo(tmp_path / "staged", versions={2: "b"})
    shutil.copytree(staged / "charlm" / "2", repo / "charlm" / "2")

    async def loaded() -> bool:
        return app.engine.registry.find("charlm", 2) is not None

    await eventually(loaded, timeout_s=5)  # the poll goes on past the bad directory
    async with triton_aio.InferenceServerClient(target) as client:
        with pytest.raises(InferenceServerException) as refused:
            await client.load_model("broken-model")
    assert "FAILED_PRECONDITION" in str(refused.value.status()) and "ONNX Runtime cannot load it" in str(refused.value)


async def test_operators_can_load_and_unload_through_the_triton_api(start_server, tmp_path):
    repo = variant_repo(tmp_path, versions={1: "a"})
    app = await start_server(repo, model_poll_interval_s=0.2)
    target = f"127.0.0.1:{app.port}"
    async with triton_aio.InferenceServerClient(target) as client:
        await client.unload_model("charlm")
        assert not await client.is_model_ready("charlm")
        await asyncio.sleep(0.5)  # the poll must not load it back
        assert not await client.is_model_ready("charlm")
        (refused,) = await exchange(target, steps("s", 1, 1))
        assert refused.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        await client.load_model("charlm")
        assert await client.is_model_ready("charlm")
        with pytest.raises(InferenceServerException) as missing:
            await client.load_model("nope")
        assert "NOT_FOUND" in str(missing.value.status())
    (answer,) = await exchange(target, steps("s", 1, 1))
    np.testing.assert_allclose(logits_of(answer)[0], EXPECTED[0], atol=TOLERANCE, rtol=0)


async def test_a_port_in_use_is_a_clear_start_up_error(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{taken} for gRPC"):
            await create_server(server_settings(port=taken), CollectorRegistry())
        with pytest.raises(StartupError, match=f"cannot serve /metrics on port {taken}"):
            await create_server(server_settings(metrics_port=taken), CollectorRegistry())


async def test_a_second_server_cannot_share_a_port(start_server):
    first = await start_server()
    with pytest.raises(StartupError, match="is another server using it"):
        await create_server(server_settings(port=first.port), CollectorRegistry())


async def test_a_delete_the_store_cannot_take_is_refused_to_its_caller_and_logged_nowhere_else(
    start_server, persistent_redis, caplog
):
    """Redis gone: DeleteSession answers UNAVAILABLE. The delete ran as a background task, which re-raised
    the error after handing it over: asyncio then logged it, with its traceback, as a lost exception."""
    app = await start_server(url=persistent_redis.url, redis={"socket_timeout_s": 0.5, "connect_timeout_s": 0.3})
    persistent_redis.stop()
    with pytest.raises(Unavailable):
        await app.engine.delete_session("charlm", "gone")
    await asyncio.sleep(0)
    gc.collect()  # a task whose exception nobody retrieved says so when it is collected
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
