"""The load generator against a real server: what it counts, and that a failing load ends."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.load import STREAM_BATCH_METHOD, BatchEncoder, LoadSpec, run_load
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from tests.conftest import vocabulary

FEATURES = len(vocabulary())


@pytest.mark.parametrize("seq", [1, 2, 127, 128, 16_383, 16_384, 2**40])
def test_the_fan_in_encoder_sends_what_protobuf_would(seq):
    """The load generator encodes its StepBatch messages itself: they parse to the message protobuf builds,
    start flag, seq (across varint lengths) and id included, on the method the service declares."""
    tensor = pb.Tensor(shape=[1, 3], raw=np.arange(3, dtype=np.float32).tobytes())
    sessions = ["a", "s-" + "x" * 140, "m:1"]
    encoder = BatchEncoder("charlm", 2, sessions, tensor)
    for batch_id in (0, 5, 300):
        expected = pb.StepBatch(
            id=batch_id,
            steps=[
                pb.StepRequest(model="charlm", version=2, session_id=s, seq=seq, start=seq == 1, input=tensor)
                for s in sessions
            ],
        )
        assert pb.StepBatch.FromString(encoder.encode(seq, batch_id)) == expected
    method = pb.DESCRIPTOR.services_by_name["RnnServe"].methods_by_name["StreamBatch"]
    assert STREAM_BATCH_METHOD == f"/{method.containing_service.full_name}/{method.name}"


async def test_fan_in_counts_every_step(start_server):
    """Groups' messages on whichever stream is picked, several readers sending on one call at once: every
    step answered, the load ends (writes to a call one at a time: gRPC refuses two at once)."""
    app = await start_server()
    for _ in range(3):
        spec = LoadSpec(f"127.0.0.1:{app.port}", 128, 10, 4, model="charlm", features=FEATURES, per_message=16)
        result = await asyncio.wait_for(run_load(spec), 60)
        assert result.steps == 128 * 10 and not result.errors
        assert result.histogram.get_total_count() == 128 // 16 * 10  # a latency per message


async def test_a_pipelining_fan_in_counts_every_step_in_order(start_server):
    """Groups keeping three messages unanswered (a gateway that forwards before it is answered): every
    step applied in its session's order (a step out of order would be refused), a latency per message."""
    app = await start_server()
    for in_flight in (2, 3, 12):  # 12: more than the steps, so every message is sent before any answer
        spec = LoadSpec(
            f"127.0.0.1:{app.port}", 96, 10, 4, model="charlm", features=FEATURES, per_message=16, in_flight=in_flight
        )
        result = await asyncio.wait_for(run_load(spec), 60)
        assert result.steps == 96 * 10 and not result.errors, result.summary()
        assert result.histogram.get_total_count() == 96 // 16 * 10
        assert result.summary()["in_flight"] == in_flight


def test_in_flight_is_for_fan_in():
    with pytest.raises(ValueError, match="--in-flight applies to fan-in"):
        LoadSpec("127.0.0.1:1", 4, 2, in_flight=2)


@pytest.mark.parametrize(
    "odd", [{"per_message": 1}, {"per_message": 16, "in_flight": 2}, {"per_message": 16, "chunk": 2}]
)
def test_the_sdk_load_is_fan_in_one_call_at_a_time(odd):
    with pytest.raises(ValueError, match="--sdk drives fan-in through BatchClient"):
        LoadSpec("127.0.0.1:1", 32, 2, sdk=True, **odd)


async def test_fan_in_through_the_sdk_counts_every_step(start_server, redis_store_url):
    """The gateway's load through `BatchClient`: every step applied in order (the client numbers them; a
    step out of order would be refused), a latency per call, and the streams' workers reported."""
    app = await start_server(url=redis_store_url)
    spec = LoadSpec(f"127.0.0.1:{app.port}", 96, 5, 2, model="charlm", features=FEATURES, per_message=32, sdk=True)
    result = await asyncio.wait_for(run_load(spec), 60)
    assert result.steps == 96 * 5 and not result.errors, result.summary()
    assert result.histogram.get_total_count() == 96 // 32 * 5
    assert result.summary()["sdk"] is True and sum(result.workers.values()) >= 1


async def test_fan_in_through_the_sdk_where_every_step_fails_ends(start_server):
    app = await start_server()
    spec = LoadSpec(
        f"127.0.0.1:{app.port}", 64, 3, 2, model="charlm", version=99, features=FEATURES, per_message=16, sdk=True
    )
    result = await asyncio.wait_for(run_load(spec), 30)
    assert result.steps == 0 and result.errors == {"NOT_FOUND": 64}
    assert "charlm/99" in result.summary()["first_errors"]["NOT_FOUND"]


async def test_fan_in_where_every_step_fails_ends(start_server):
    """Every group answered with errors (a version the server does not load) stops short, and the load
    ends with its errors counted instead of waiting for answers that never come."""
    app = await start_server()
    spec = LoadSpec(f"127.0.0.1:{app.port}", 64, 3, 2, model="charlm", version=99, features=FEATURES, per_message=16)
    result = await asyncio.wait_for(run_load(spec), 30)
    assert result.steps == 0
    assert result.errors == {"NOT_FOUND": 64}
    assert "charlm/99" in result.summary()["first_errors"]["NOT_FOUND"]  # says why, not only how many


async def test_the_engine_bench_checks_every_answer_and_counts_its_steps(redis_store_url):
    from bench.engine import measure
    from tests.conftest import TEST_REPO

    figures = await measure(TEST_REPO, redis_store_url, "charlm", 1, sessions=40, per_message=16, rounds=3)
    assert figures["steps"] == 120 and figures["steps_per_s"] > 0
    assert 0 < figures["event_loop_cpu_us_per_step"] <= figures["process_cpu_us_per_step"]


async def test_connections_spread_evenly_over_a_servers_workers(redis_store_url, tmp_path):
    """Four connections to two worker processes: the kernel's draw puts them 4:0 one time in eight; the
    load generator reopens them until they fall 2:2, and its fan-in streams follow them."""
    from bench.process import ServerProcess, free_port
    from tests.conftest import TEST_REPO

    server = ServerProcess.rnnserve(free_port(), TEST_REPO, redis_store_url, "--workers", "2", log=tmp_path / "log")
    server.start()  # SERVING once both workers are up
    try:
        for _ in range(3):
            spec = LoadSpec(f"127.0.0.1:{server.port}", 64, 3, 4, model="charlm", features=FEATURES, per_message=16)
            summary = (await asyncio.wait_for(run_load(spec), 60)).summary()
            assert summary["connections_per_worker"] == [2, 2] and summary["streams_per_worker"] == [2, 2]
            assert summary["steps"] == 64 * 3 and not summary["errors"]
        one = LoadSpec(f"127.0.0.1:{server.port}", 8, 2, 4, model="charlm", features=FEATURES, spread=False)
        assert (await asyncio.wait_for(run_load(one), 60)).summary()["connections_per_worker"] == []
    finally:
        server.stop()
