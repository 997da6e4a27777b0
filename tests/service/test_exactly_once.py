"""Exactly-once across replicas, resends and faults: one regression test per defect that broke it.

Real servers on one real redis-server; where a commit must be applied but reported as failed, a TCP
proxy in front of Redis loses the reply (tests/faults.py). Triton clients are the real tritonclient.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import grpc
import numpy as np
import pytest
import redis
import tritonclient.grpc.aio as triton_aio
from prometheus_client import CollectorRegistry

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.api.streams import StreamGate, answer_all, weighed
from service.client import StepError, StreamClient
from service.errors import Unavailable
from service.metrics import Metrics
from service.state.record import SessionRecord, decode, encode
from service.state.store import session_key
from tests.conftest import (
    TEST_REPO,
    exchange,
    held_out_text,
    logits_of,
    offline_logits,
    one_hot_text,
    step_request,
    vocabulary,
    written_then_read,
)
from tests.faults import RedisProxy
from tests.service.stored import replace_record, stored_record, stored_token
from tests.service.test_session_contract import EXPECTED, TOLERANCE, X, assert_error, assert_matches, last_seq, steps

V1 = TEST_REPO / "charlm" / "1"


@pytest.fixture
async def proxy(redis_proc, redisdb):
    proxy = await RedisProxy(redis_proc.port).start()
    yield proxy
    await proxy.close()


def triton_step(x: np.ndarray) -> list[triton_aio.InferInput]:
    tensor = triton_aio.InferInput("x", [1, *x.shape], "FP32")
    tensor.set_data_from_numpy(x[None].astype(np.float32))
    return [tensor]


async def test_a_triton_sequence_spread_over_two_replicas_is_applied_exactly_once(start_server, redis_store_url):
    """Routed A, A, B, A, B with the same input every step: replica A's cache is stale at steps 4 and 5,
    and its step computes the same outputs as the step it conflicts with. Every step must still be
    applied, once, on the latest state."""
    a = await start_server(url=redis_store_url)
    b = await start_server(url=redis_store_url)
    x = np.repeat(X[:1], 5, axis=0)  # one character, five times
    expected = offline_logits(V1, x)
    got = []
    clients = {name: triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") for name, app in (("A", a), ("B", b))}
    for t, replica in enumerate("AABAB"):
        result = await clients[replica].infer(
            "charlm", triton_step(x[t : t + 1]), sequence_id=99, sequence_start=t == 0
        )
        got.append(result.as_numpy("logits")[0, 0])
        assert result.get_response().parameters["rnnserve_seq"].int64_param == t + 1
    for client in clients.values():
        await client.close()
    np.testing.assert_allclose(np.stack(got), expected, atol=TOLERANCE, rtol=0)
    assert await last_seq(f"127.0.0.1:{a.port}", "99") == 5


async def test_a_resent_start_never_wipes_acknowledged_steps(start_server, proxy):
    """The start's commit is applied but reported UNAVAILABLE; seq 2 and 3 are acknowledged; the client
    resends the start as told. The session must stay at seq 3."""
    app = await start_server(url=proxy.url)
    target = f"127.0.0.1:{app.port}"
    start = step_request("s", 1, X[:1], start=True)
    start.start_id = 0xFEED
    proxy.lose_reply(b"EVALSHA")
    (lost,) = await exchange(target, [start])
    assert_error(lost, grpc.StatusCode.UNAVAILABLE, "may or may not have been applied", "send it again")
    assert proxy.lost == 1
    assert_matches(await exchange(target, steps("s", 2, 3)), first=2)  # the start had landed after all
    (resent,) = await exchange(target, [start])
    assert_error(resent, grpc.StatusCode.FAILED_PRECONDITION, "got seq 1, expected seq 4")
    assert await last_seq(target, "s") == 3
    assert_matches(await exchange(target, steps("s", 4, 6)), first=4)


async def test_a_resent_start_right_after_its_lost_answer_is_a_replay(start_server, proxy):
    app = await start_server(url=proxy.url)
    target = f"127.0.0.1:{app.port}"
    start = step_request("s", 1, X[:1], start=True)
    start.start_id = 7
    proxy.lose_reply(b"EVALSHA")
    (lost,) = await exchange(target, [start])
    assert lost.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    (resent,) = await exchange(target, [start])
    assert resent.replayed
    assert_matches([resent], first=1)
    new_start = step_request("s", 1, X[:1], start=True)
    new_start.start_id = 8  # another start id: a new start, which resets
    await exchange(target, steps("s", 2, 4))
    (restarted,) = await exchange(target, [new_start])
    assert not restarted.replayed and await last_seq(target, "s") == 1


async def test_an_applied_step_reported_unavailable_is_replayed_on_another_replica(start_server, proxy):
    a = await start_server(url=proxy.url)
    b = await start_server(url=proxy.url)
    await exchange(f"127.0.0.1:{a.port}", steps("s", 1, 3))
    proxy.lose_reply(b"EVALSHA")
    (lost,) = await exchange(f"127.0.0.1:{a.port}", steps("s", 4, 4))
    assert lost.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    (resent,) = await exchange(f"127.0.0.1:{b.port}", steps("s", 4, 4))
    assert resent.replayed
    assert_matches([resent], first=4)
    assert_matches(await exchange(f"127.0.0.1:{a.port}", steps("s", 5, 6)), first=5)


async def test_a_triton_client_that_numbers_its_steps_can_resend_them(start_server, proxy):
    """rnnserve_seq: a resent step returns its first answer; a gap is refused; a resent end is replayed."""
    app = await start_server(url=proxy.url)
    x = X[:6]
    expected = offline_logits(V1, x)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:

        async def send(t: int, **kwargs: object) -> object:
            return await client.infer(
                "charlm",
                triton_step(x[t - 1 : t]),
                sequence_id="numbered",
                sequence_start=t == 1,
                parameters={"rnnserve_seq": t},
                **kwargs,
            )

        first = [await send(t) for t in (1, 2, 3)]
        again = await send(3)  # its answer was lost: the resend gets it, and changes nothing
        np.testing.assert_array_equal(again.as_numpy("logits"), first[-1].as_numpy("logits"))
        assert again.get_response().parameters["rnnserve_seq"].int64_param == 3
        with pytest.raises(Exception) as gap:
            await send(5)
        assert "FAILED_PRECONDITION" in str(gap.value) and "expected seq 4" in str(gap.value)
        proxy.lose_reply(b"EVALSHA")  # step 4 is applied, its answer lost
        with pytest.raises(Exception, match="UNAVAILABLE"):
            await send(4)
        fourth = await send(4)
        ended = await send(5, sequence_end=True)
        resent_end = await send(5, sequence_end=True)
        np.testing.assert_array_equal(resent_end.as_numpy("logits"), ended.as_numpy("logits"))
        with pytest.raises(Exception) as after:
            await send(6)
        assert "NOT_FOUND" in str(after.value) and "ended at seq 5" in str(after.value)
    streamed = np.stack([r.as_numpy("logits")[0, 0] for r in [*first, fourth, ended]])
    np.testing.assert_allclose(streamed, expected[:5], atol=TOLERANCE, rtol=0)


async def test_a_triton_step_naming_another_start_is_refused(start_server):
    app = await start_server()
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:

        async def send(t: int, start_id: int) -> object:
            return await client.infer(
                "charlm",
                triton_step(X[t - 1 : t]),
                sequence_id="named",
                sequence_start=t == 1,
                parameters={"rnnserve_seq": t, "rnnserve_start_id": start_id},
            )

        await send(1, 7)
        with pytest.raises(Exception) as other:
            await send(2, 8)
        assert "FAILED_PRECONDITION" in str(other.value) and "holds another start" in str(other.value)
        second = await send(2, 7)
        assert second.get_response().parameters["rnnserve_seq"].int64_param == 2


async def test_server_numbered_triton_steps_report_their_number(start_server):
    app = await start_server()
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}") as client:
        numbers = [
            (await client.infer("charlm", triton_step(X[t : t + 1]), sequence_id=5, sequence_start=t == 0))
            .get_response()
            .parameters["rnnserve_seq"]
            .int64_param
            for t in range(3)
        ]
    assert numbers == [1, 2, 3]


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_the_client_gives_up_instead_of_hanging_when_no_replica_comes_back(start_server, how):
    app = await start_server()
    async with StreamClient(f"127.0.0.1:{app.port}", reconnect_timeout_s=1.5) as client:
        session = client.session("charlm")
        await session.step(X[:1])
        if how == "kill":
            await app.server.stop(None)  # connections dropped, nothing drained
        else:
            await app.stop(grace_s=0.5)
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(session.step(X[1:2]), 10)
        assert time.monotonic() - started < 5
        other = client.session("charlm")  # the session lock is free again: another step fails too, promptly
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(other.step(X[:1]), 10)


async def test_sessions_resume_exactly_across_a_graceful_drain(start_server, redis_store_url):
    """16 sessions stream; the server drains (stop with grace) and another starts on the same port and
    store. No caller sees an error; every session equals its offline run."""
    texts = {f"g{i}": held_out_text()[i * 40 : i * 40 + 30] for i in range(16)}
    xs = {sid: one_hot_text(text, vocabulary()) for sid, text in texts.items()}
    app = await start_server(url=redis_store_url)
    port = app.port
    for round_ in range(3):
        got: dict[str, list[np.ndarray]] = {sid: [] for sid in texts}
        async with StreamClient(f"127.0.0.1:{port}", reconnect_timeout_s=20) as client:
            underway = asyncio.Event()
            drain_at = 3 + 8 * round_  # steps answered to every session's first when the drain begins

            async def stream(
                sid: str,
                client: StreamClient = client,
                got: dict = got,
                round_: int = round_,
                underway: asyncio.Event = underway,
                drain_at: int = drain_at,
            ) -> None:
                session = client.session("charlm", f"{sid}-{round_}")
                for t in range(30):
                    got[sid].append((await session.step(xs[sid][t : t + 1])).outputs["logits"][0])
                    if t == drain_at:
                        underway.set()

            streams = asyncio.gather(*(stream(sid) for sid in texts))
            await underway.wait()
            await app.stop(grace_s=2)
            app = await start_server(url=redis_store_url, port=port)
            await streams
            assert client.reconnects >= 1
        for sid in texts:
            np.testing.assert_allclose(np.stack(got[sid]), offline_logits(V1, xs[sid]), atol=TOLERANCE, rtol=0)


async def test_one_sessions_failure_does_not_fail_its_batch(start_server, redis_store_url):
    app = await start_server(url=redis_store_url, batching={"max_batch_wait_us": 50_000})
    target = f"127.0.0.1:{app.port}"
    sessions = [f"ok{i}" for i in range(8)]
    await exchange(target, [steps(sid, 1, 1)[0] for sid in [*sessions, "bad"]])
    with redis.Redis.from_url(redis_store_url) as client:
        replace_record(client, session_key("rnnserve", "charlm", "bad"), b"garbage")
    app.engine.cache.forget(session_key("rnnserve", "charlm", "bad"))
    answers = await exchange_pipelined(target, [steps(sid, 2, 2)[0] for sid in ["bad", *sessions]])
    by_session = {a.session_id: a for a in answers}
    assert_error(by_session["bad"], grpc.StatusCode.DATA_LOSS, "does not parse")
    for sid in sessions:
        assert_matches([by_session[sid]], first=2)
    assert app.metrics.batch_size.labels("charlm", 1)._sum.get() >= 8  # they did share batches


async def exchange_pipelined(target: str, requests: list[pb.StepRequest]) -> list[pb.StepResponse]:
    """All requests written at once, then every answer read (in the order they come)."""
    return await written_then_read(target, lambda channel: pb_grpc.RnnServeStub(channel).Stream(), requests)


async def test_a_start_over_a_vanished_record_is_applied(start_server, redis_store_url):
    """Replica A holds the session in its cache; it disappears from the store (deleted elsewhere, or
    idled out). A new start on A must start it, not answer NOT_FOUND."""
    a = await start_server(url=redis_store_url)
    b = await start_server(url=redis_store_url)
    await exchange(f"127.0.0.1:{a.port}", steps("s", 1, 3))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as channel:
        deleted = await pb_grpc.RnnServeStub(channel).DeleteSession(pb.SessionRef(model="charlm", session_id="s"))
    assert deleted.deleted
    restarted = await exchange(f"127.0.0.1:{a.port}", steps("s", 1, 2))
    assert_matches(restarted, first=1)


async def test_a_step_after_a_lost_restart_is_refused_not_applied_to_the_old_start(
    start_server, redis_store_url, redisdb
):
    """Without WAIT, a store failover may lose an acknowledged restart and bring back the session's earlier
    start at the same seq. The next step must be refused (it names its start), never applied on top of the
    earlier start's state. The loss is played here by putting the earlier record back."""
    app = await start_server(url=redis_store_url)
    key = session_key("rnnserve", "charlm", "s")
    async with StreamClient(f"127.0.0.1:{app.port}") as client:
        first = client.session("charlm", "s")
        await first.step(X[:1])
        earlier = redisdb.dump(key)
        again = client.session("charlm", "s")  # a new start of the same session id: a new start_id
        assert (await again.step(X[1:2])).seq == 1
        redisdb.restore(key, 60_000, earlier, replace=True)  # the restart lost
        with pytest.raises(StepError) as refused:
            await again.step(X[2:3])
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert "holds another start" in refused.value.message and "start it again" in refused.value.message
        assert decode(stored_record(redisdb, key)).seq == 1  # nothing applied
        assert (await first.step(X[1:2])).seq == 2  # the earlier start's own client continues it


async def test_cached_records_do_not_pin_their_batch(start_server):
    app = await start_server(batching={"max_batch_wait_us": 50_000})
    target = f"127.0.0.1:{app.port}"
    await exchange_pipelined(target, [step_request(f"c{i}", 1, X[:8], start=True) for i in range(32)])
    gc.collect()
    records = [app.engine.cache.get(session_key("rnnserve", "charlm", f"c{i}")) for i in range(32)]
    for record in records:
        assert isinstance(record, SessionRecord)
        for array in (*record.states.values(), *record.outputs.values()):
            owner = array
            while isinstance(owner.base, np.ndarray):
                owner = owner.base
            held = owner.nbytes if owner.base is None else len(owner.base)  # type: ignore[arg-type]
            assert held <= 2 * len(encode(record)), "a cached session holds more than its own record"


async def test_responses_of_a_session_keep_their_order_whatever_fails(start_server):
    """An early refusal (malformed tensor, unknown version) must not overtake the session's earlier step."""
    app = await start_server(batching={"max_batch_wait_us": 100_000})  # step 4 waits in its batch
    target = f"127.0.0.1:{app.port}"
    await exchange(target, steps("s", 1, 3))
    bad_tensor = pb.StepRequest(model="charlm", session_id="s", seq=5, input=pb.Tensor(shape=[1, 3], raw=b"x"))
    bad_version = step_request("s", 5, X[4:5], version=7)
    answers = await exchange_pipelined(target, [*steps("s", 4, 4), bad_tensor, bad_version, *steps("s", 5, 5)])
    assert [(a.seq, a.error.code) for a in answers] == [
        (4, 0),
        (5, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        (5, grpc.StatusCode.NOT_FOUND.value[0]),
        (5, 0),
    ]
    np.testing.assert_allclose(logits_of(answers[-1])[0], EXPECTED[4], atol=TOLERANCE, rtol=0)


async def test_a_request_read_as_the_drain_begins_is_still_answered():
    gate = StreamGate(10, Metrics(CollectorRegistry()))
    stop = asyncio.Event()

    async def requests():
        yield "first"
        gate.drain()  # the drain begins while the stream reads its next request
        yield "second"
        await stop.wait()  # a client that sends nothing more

    async def handle(request: str) -> str:
        await asyncio.sleep(0.01)
        return request.upper()

    def submit(request: str) -> asyncio.Future[str]:
        return asyncio.ensure_future(handle(request))

    answered = answer_all(requests(), weighed(submit, lambda _: 1), lambda r, done, taken: done.result(), 8, gate, str)
    answers = []
    with pytest.raises(Unavailable, match="shutting down"):  # once both are answered, as a drain ends a stream
        async for answer in answered:
            answers.append(answer)
    assert sorted(answers) == ["FIRST", "SECOND"]


async def test_session_calls_for_unknown_models_are_not_found(start_server):
    app = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.RnnServeStub(channel)
        for call in (stub.GetSession, stub.DeleteSession):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(pb.SessionRef(model="charlm/x", session_id="y"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stored_state_of_another_dtype_is_data_loss(start_server, redis_store_url):
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    await exchange(target, steps("s", 1, 2))
    key = session_key("rnnserve", "charlm", "s")
    with redis.Redis.from_url(redis_store_url) as client:
        record = decode(stored_record(client, key))
        half = SessionRecord(
            record.fingerprint,
            record.epoch,
            record.seq,
            {name: value.astype(np.float16) for name, value in record.states.items()},
            record.outputs,
            digest=record.digest,
        )
        replace_record(client, key, encode(half))
    app.engine.cache.forget(key)
    (refused,) = await exchange(target, steps("s", 3, 3))
    assert_error(refused, grpc.StatusCode.DATA_LOSS, "does not fit its model's state")


async def test_a_stop_gives_up_within_its_grace_on_steps_the_store_does_not_confirm(proxy, caplog):
    """Redis stops answering with steps queued: the stop ends about when its grace does (not after the
    socket timeout of every batch left), and each step left is answered UNAVAILABLE, to be settled by a
    resend; the steps that were answered are committed."""
    from service.errors import Unavailable
    from service.server import create_server
    from service.sessions.steps import Step
    from tests.conftest import server_settings

    caplog.set_level(logging.WARNING, logger="service")
    settings = server_settings(TEST_REPO, proxy.url, redis={"socket_timeout_s": 30}, batching={"max_batch_size": 8})
    app = await create_server(settings, CollectorRegistry())
    x = X[:1]
    first = await app.engine.step(Step("charlm", "before", 1, x, start=True))
    assert first.seq == 1
    proxy.hold_replies()
    futures = [app.engine.submit(Step("charlm", f"held-{i}", 1, x, start=True)) for i in range(64)]
    await asyncio.sleep(0.2)  # the first batches wait on Redis, the rest queue
    started = time.perf_counter()
    await app.stop(grace_s=1.0)
    took = time.perf_counter() - started
    proxy.release()
    assert took < 5, f"stop took {took:.1f}s"  # the grace and a moment; each batch would wait 30 s
    assert all(isinstance(f.exception(), Unavailable) for f in futures)
    assert "64 steps had not landed when the shutdown grace ran out" in caplog.text
    stored = stored_token(redis.Redis(port=proxy.upstream_port), session_key("rnnserve", "charlm", "before"))
    assert stored is not None
