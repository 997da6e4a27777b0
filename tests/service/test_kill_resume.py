"""Kill the server process (SIGKILL) mid-session, start another on the same Redis, resume: the outputs must
equal an uninterrupted run. No step lost, none applied twice."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import redis

from bench.process import ServerProcess, free_port
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.client import StreamClient
from service.state.store import session_key
from tests.conftest import TEST_REPO, held_out_text, offline_logits, one_hot_text, vocabulary
from tests.faults import RedisProxy
from tests.service.stored import stored_token

STEPS = 120
KILL_AFTER = 60


@pytest.fixture
def server_port() -> int:
    return free_port()


@pytest.fixture
def servers(redis_store_url: str, server_port: int) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


async def test_sigkill_mid_session_then_resume_on_a_new_server(servers, redis_proc, redisdb, server_port):
    """The step in flight at the kill is committed in Redis but never answered (the proxy withholds
    Redis's reply until the server is dead): the client's resend to the new server must come back as a
    replay, and every output must equal an uninterrupted run."""
    text = held_out_text()[:STEPS]
    x = one_hot_text(text, vocabulary())
    expected = offline_logits(TEST_REPO / "charlm" / "1", x)
    proxy = await RedisProxy(redis_proc.port).start()
    first = ServerProcess.rnnserve(server_port, TEST_REPO, proxy.url, "--workers", "1")
    servers.append(first)
    await asyncio.to_thread(first.start)

    got: dict[int, np.ndarray] = {}
    async with StreamClient(f"127.0.0.1:{server_port}") as client:
        session = client.session("charlm", "kill-resume")
        for t in range(KILL_AFTER):
            got[t + 1] = (await session.step(x[t : t + 1])).outputs["logits"][0]
        proxy.hold_replies()
        in_flight = asyncio.create_task(session.step(x[KILL_AFTER : KILL_AFTER + 1]))
        with redis.Redis(port=redis_proc.port) as direct:
            while (
                int(stored_token(direct, session_key("rnnserve", "charlm", "kill-resume")).split(":")[1]) <= KILL_AFTER
            ):
                await asyncio.sleep(0.01)  # until Redis has applied the step's commit
        await asyncio.to_thread(first.kill)
        proxy.release()
        second = ServerProcess.rnnserve(server_port, TEST_REPO, proxy.url, "--workers", "1")
        servers.append(second)
        await asyncio.to_thread(second.start)
        resumed = await in_flight  # resent by the client to the new server: applied once
        assert resumed.replayed, "the resent step had been applied: it must be answered from the store"
        got[KILL_AFTER + 1] = resumed.outputs["logits"][0]
        for t in range(KILL_AFTER + 1, STEPS):
            got[t + 1] = (await session.step(x[t : t + 1])).outputs["logits"][0]
        assert client.reconnects >= 1
        info = await client.stub.GetSession(pb.SessionRef(model="charlm", session_id="kill-resume"))
    await proxy.close()

    assert info.last_seq == STEPS
    streamed = np.stack([got[seq] for seq in range(1, STEPS + 1)])
    np.testing.assert_allclose(streamed, expected, atol=1e-5, rtol=0)
    assert second.stop() == 0  # SIGTERM drains and exits cleanly


async def test_a_new_client_resumes_from_the_last_acked_seq(servers, redis_store_url, server_port):
    """What a gateway does after it restarted too: ask the server where the session stands, continue."""
    text = held_out_text()[:40]
    x = one_hot_text(text, vocabulary())
    expected = offline_logits(TEST_REPO / "charlm" / "1", x)
    first = ServerProcess.rnnserve(server_port, TEST_REPO, redis_store_url)
    servers.append(first)
    first.start()
    async with StreamClient(f"127.0.0.1:{server_port}") as client:
        session = client.session("charlm", "gateway-7")
        before = [(await session.step(x[t : t + 1])).outputs["logits"][0] for t in range(25)]
    first.kill()
    second = ServerProcess.rnnserve(server_port, TEST_REPO, redis_store_url)
    servers.append(second)
    second.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        info = await pb_grpc.RnnServeStub(channel).GetSession(pb.SessionRef(model="charlm", session_id="gateway-7"))
    assert info.last_seq == 25
    async with StreamClient(f"127.0.0.1:{server_port}") as client:
        session = client.session("charlm", "gateway-7")
        session.resume(info.last_seq, info.start_id)  # continues only that start
        after = [(await session.step(x[t : t + 1])).outputs["logits"][0] for t in range(25, 40)]
    np.testing.assert_allclose(np.stack(before + after), expected, atol=1e-5, rtol=0)
