"""The server around the engine: health, reflection, /metrics, Infer, stream edge cases, limits, drain."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.convert import tensor_to_array
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.conftest import ROOT, exchange, step_request
from tests.service.test_session_contract import EXPECTED, TOLERANCE, X, assert_matches, steps


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_health_and_reflection(start_server):
    app = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rnnserve.v1.RnnServe"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"rnnserve.v1.RnnServe", "grpc.health.v1.Health"} <= names


async def test_metrics_endpoint_reports_steps(start_server, redis_store_url):
    app = await start_server(url=redis_store_url, metrics_port=0)
    await exchange(f"127.0.0.1:{app.port}", steps("m", 1, 5) + [step_request("m", 9, X[:1])])
    text = scrape(app.metrics_port)
    assert re.search(r'rnnserve_step_latency_seconds_count\{model="charlm",version="1"\} 5\.0', text)
    assert re.search(r'rnnserve_steps_total\{model="charlm",version="1"\} 5\.0', text)
    assert 'rnnserve_errors_total{code="FAILED_PRECONDITION",method="Stream"} 1.0' in text
    assert "rnnserve_store_commit_seconds_count" in text
    assert re.search(r'rnnserve_model_info\{model="charlm",precision="fp32",provider="CPUExecutionProvider"', text)


async def test_every_metric_used_in_deploy_exists_on_the_live_endpoint(start_server, redis_store_url):
    app = await start_server(url=redis_store_url, metrics_port=0)
    await exchange(f"127.0.0.1:{app.port}", steps("m", 1, 2))
    live = set(re.findall(r"^# TYPE (rnnserve_\w+) ", scrape(app.metrics_port), re.M))
    used: dict[str, set[str]] = {}  # file -> the metrics it names
    for path in (ROOT / "deploy").rglob("*"):
        if path.is_file():
            names = re.findall(r"rnnserve_[a-z_]+", path.read_text())
            used[str(path.relative_to(ROOT))] = {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}
    # The alert rules and the Grafana dashboard's queries, at least, are checked here.
    for consumer in ("deploy/prometheus/alerts.yml", "deploy/grafana/dashboards/rnnserve.json"):
        assert used.get(consumer), f"{consumer} should reference the service's metrics"
    for path, names in used.items():
        assert names <= live, f"used in {path} but not exported: {sorted(names - live)}"


async def test_infer_runs_a_whole_sequence(start_server):
    app = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.RnnServeStub(channel)
        reply = await stub.Infer(pb.InferRequest(model="charlm", input=pb.Tensor(shape=X.shape, data=X.ravel())))
        np.testing.assert_allclose(tensor_to_array(reply.outputs["logits"]), EXPECTED, atol=TOLERANCE, rtol=0)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Infer(pb.InferRequest(model="charlm", input=pb.Tensor(shape=[2, 3], data=[0] * 6)))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input must be [T, " in bad.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Infer(pb.InferRequest(model="nope", input=pb.Tensor(shape=X.shape, data=X.ravel())))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_empty_stream_closes_cleanly(start_server):
    app = await start_server()
    assert await exchange(f"127.0.0.1:{app.port}", []) == []


async def eventually(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_client_hanging_up_mid_stream_leaves_the_server_serving(start_server, redis_store_url):
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.RnnServeStub(channel).Stream()
        await call.write(steps("h", 1, 1)[0])
        assert (await call.read()).seq == 1  # the session exists; what follows may or may not land
        for request in steps("h", 2, 6):
            await call.write(request)
        call.cancel()
    await eventually(lambda: app.engine.sessions_in_flight == 0 and app.gate.open == 0)
    async with grpc.aio.insecure_channel(target) as channel:
        info = await pb_grpc.RnnServeStub(channel).GetSession(pb.SessionRef(model="charlm", session_id="h"))
    # Whatever was applied was applied in order and committed; the session continues from there.
    assert 1 <= info.last_seq <= 6
    more = await exchange(target, steps("h", info.last_seq + 1, info.last_seq + 2))
    assert_matches(more, first=info.last_seq + 1)
    assert app.native.metrics.active_streams._value.get() == 0


async def test_hanging_up_with_steps_in_flight_logs_no_error(start_server, caplog):
    """Steps of a stream the client cancelled still land; their answers are dropped without a word
    (each used to log a traceback: an answer made from a cancelled waiter)."""
    app = await start_server(batching={"max_batch_wait_us": 200_000})  # steps wait in the batcher
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        for attempt in range(3):
            call = pb_grpc.RnnServeStub(channel).Stream()
            for sid in range(40):
                for request in steps(f"gone-{attempt}-{sid}", 1, 3):
                    await call.write(request)
            await asyncio.sleep(0.05 * attempt)  # cancel at different points of the steps' flight
            call.cancel()
        for attempt in range(3):  # the same through StreamBatch, with steps that fail among them
            batch_call = pb_grpc.RnnServeStub(channel).StreamBatch()
            for first in (0, 20):
                good = steps(f"gone-batch-{attempt}-{first}", 1, 1)
                never_started = [step_request(f"never-{attempt}-{first}-{i}", 2, X[:1]) for i in range(20)]
                await batch_call.write(pb.StepBatch(id=first, steps=good + never_started))
            await asyncio.sleep(0.05 * attempt)
            batch_call.cancel()
    await eventually(lambda: app.engine.sessions_in_flight == 0 and app.gate.open == 0)
    gc.collect()  # an error nobody read is reported when its future is collected
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_too_many_streams_is_resource_exhausted(start_server):
    app = await start_server(max_streams=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.RnnServeStub(channel)
        first = stub.Stream()
        await first.write(steps("a", 1, 1)[0])
        await first.read()
        second = stub.Stream()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await second.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry with backoff" in info.value.details()
        await first.done_writing()


async def test_stop_drains_open_streams_and_reports_not_serving(start_server):
    """A stream open at shutdown stops being read, gets the answers to what it sent, and ends UNAVAILABLE (not
    OK: whatever it sent later was not read)."""
    app = await start_server(batching={"max_batch_wait_us": 300_000})  # step 2 waits in its batch
    target = f"127.0.0.1:{app.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.RnnServeStub(channel).Stream()
        await call.write(steps("d", 1, 1)[0])
        assert (await call.read()).seq == 1
        health = health_pb2_grpc.HealthStub(channel)
        await call.write(steps("d", 2, 2)[0])
        await eventually(lambda: app.engine.sessions_in_flight == 1)  # taken by the server, not yet computed
        stopping = asyncio.create_task(app.stop(grace_s=5.0))
        answer = await call.read()
        assert answer.seq == 2 and not answer.HasField("error")  # in flight at the drain: answered
        with pytest.raises(grpc.aio.AioRpcError) as ended:  # then the stream ends: the client reconnects elsewhere
            await call.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        await stopping
        with pytest.raises(grpc.aio.AioRpcError):
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
