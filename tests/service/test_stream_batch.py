"""StreamBatch: many sessions' steps per message, for gateways, with every per-session rule intact."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import redis

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.client import CHANNEL_OPTIONS, BatchClient, StepError, StepReply, step_request
from service.state.store import session_key
from tests.conftest import (
    SHIPPED_REPO,
    TEST_REPO,
    logits_of,
    offline_logits,
    shipped_versions,
    vocabulary,
    written_then_read,
    written_unread,
)
from tests.service.test_shipped_models import streamed

FEATURES = len(vocabulary())
EYE = np.eye(FEATURES, dtype=np.float32)
V1 = TEST_REPO / "charlm" / "1"


def chars(i: int, steps: int) -> list[int]:
    return [(i * 5 + t * (i % 4 + 1)) % FEATURES for t in range(steps)]


async def exchange_batches(target: str, batches: list[pb.StepBatch]) -> list[pb.StepBatchResult]:
    return await written_then_read(target, lambda channel: pb_grpc.RnnServeStub(channel).StreamBatch(), batches)


@pytest.mark.parametrize("on_the_event_loop", [False, True])
async def test_1024_sessions_in_batches_of_256(start_server, redis_store_url, on_the_event_loop):
    """Also with the runtime calls made on the event loop, as a server with a worker per CPU makes them for
    batches this large (`runtime.inline_min_rows`): no runtime thread is started then."""
    before = set(threading.enumerate())
    app = await start_server(url=redis_store_url, runtime={"inline_min_rows": 128 if on_the_event_loop else 0})
    target = f"127.0.0.1:{app.port}"
    sessions, steps = 1024, 3
    expected = {}
    for i in range(sessions):
        key = tuple(chars(i, steps))
        if key not in expected:
            expected[key] = offline_logits(V1, EYE[list(key)])
    async with BatchClient(target) as gateway:
        for t in range(steps):
            for first in range(0, sessions, 256):
                inputs = {f"g{i}": EYE[chars(i, steps)[t : t + 1]] for i in range(first, first + 256)}
                replies = await gateway.step("charlm", inputs)
                assert list(replies) == list(inputs)  # in the order of the steps
                for sid, reply in replies.items():
                    assert isinstance(reply, StepReply), reply
                    assert reply.seq == t + 1
                    want = expected[tuple(chars(int(sid[1:]), steps))][t]
                    np.testing.assert_allclose(reply.outputs["logits"][0], want, atol=1e-5, rtol=0)
    labels = {"model": "charlm", "version": "1"}
    assert app.metrics.registry.get_sample_value("rnnserve_batch_size_sum", labels) == sessions * steps
    batches = app.metrics.registry.get_sample_value("rnnserve_batch_size_count", labels)
    assert batches is not None and batches <= 2 * 4 * steps  # runtime calls by the batch, not by the step
    threads = [t for t in set(threading.enumerate()) - before if t.name.startswith("runtime")]
    assert bool(threads) is not on_the_event_loop, threads


async def test_one_batch_may_mix_models(start_server):
    app = await start_server(SHIPPED_REPO)
    fp32 = {m: shipped_versions(m, "fp32")[-1] for m in ("charlm-lstm", "charlm-gru", "glucose-lstm")}
    x_char = EYE[[3, 17, 40]]
    x_glucose = np.array([[100.0, 0.0], [104.0, 5.0], [109.0, 5.0]], np.float32)
    batches = [
        pb.StepBatch(
            id=t,
            steps=[
                step_request("charlm-lstm", "c", t + 1, x_char[t : t + 1], version=fp32["charlm-lstm"]),
                step_request("charlm-gru", "c", t + 1, x_char[t : t + 1], version=fp32["charlm-gru"]),
                step_request("glucose-lstm", "g", t + 1, x_glucose[t : t + 1], version=fp32["glucose-lstm"]),
            ],
        )
        for t in range(3)
    ]
    results = await exchange_batches(f"127.0.0.1:{app.port}", batches)
    assert [r.id for r in results] == [0, 1, 2]
    lstm = streamed("charlm-lstm", fp32["charlm-lstm"], x_char)["logits"]
    gru = streamed("charlm-gru", fp32["charlm-gru"], x_char)["logits"]
    forecast = streamed("glucose-lstm", fp32["glucose-lstm"], x_glucose)["forecast"]
    for t, result in enumerate(results):
        a, b, c = result.responses
        np.testing.assert_allclose(logits_of(a)[0], lstm[t], atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits_of(b)[0], gru[t], atol=1e-5, rtol=0)
        got = np.frombuffer(c.outputs["forecast"].raw, "<f4")
        np.testing.assert_allclose(got, forecast[t].ravel(), atol=1e-4, rtol=0)


async def test_bad_steps_fail_alone(start_server, redis_store_url):
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    x = EYE[[5]]
    good = [step_request("charlm", f"ok{i}", 1, x) for i in range(4)]
    bad = [
        step_request("charlm", "nan", 1, np.full((1, FEATURES), np.nan)),
        step_request("charlm", "gap", 3, x),
        step_request("nope", "m", 1, x),
        step_request("charlm", "ok0", 2, x),  # a second step of ok0 in the same batch
    ]
    (result,) = await exchange_batches(
        target, [pb.StepBatch(id=7, steps=[good[0], bad[0], good[1], *bad[1:], *good[2:]])]
    )
    codes = [(r.session_id, r.error.code) for r in result.responses]
    assert codes == [
        ("ok0", 0),
        ("nan", grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        ("ok1", 0),
        ("gap", grpc.StatusCode.NOT_FOUND.value[0]),
        ("m", grpc.StatusCode.NOT_FOUND.value[0]),
        ("ok0", grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        ("ok2", 0),
        ("ok3", 0),
    ]
    assert "more than one step in this batch" in result.responses[5].error.message
    want = offline_logits(V1, x)[0]
    for response in result.responses:
        if not response.HasField("error"):
            np.testing.assert_allclose(logits_of(response)[0], want, atol=1e-5, rtol=0)


async def test_inputs_of_every_form_and_shape_in_one_batch_answer_as_alone(start_server, redis_store_url):
    """One message's inputs in the usual form (raw float32) share a shape and are read at once; the
    others (another shape, values in `data`, a malformed one) are read one by one. Every step is answered
    as its own stream would answer it, in order: the bulk read must not shift an input to another step."""
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    rng = np.random.default_rng(3)
    inputs = {f"s{i}": EYE[rng.integers(0, FEATURES, 4)] for i in range(8)}
    first = [
        step_request("charlm", "s0", 1, inputs["s0"][:1]),
        step_request("charlm", "s1", 1, inputs["s1"][:3]),  # a chunk: another shape
        step_request("charlm", "s2", 1, inputs["s2"][:1]),
        pb.StepRequest(  # the values as floats, not raw bytes
            model="charlm",
            session_id="s3",
            seq=1,
            start=True,
            input=pb.Tensor(shape=[1, FEATURES], data=inputs["s3"][0]),
        ),
        step_request("charlm", "s0", 2, inputs["s0"][1:2]),  # a second step of s0: refused alone
        pb.StepRequest(  # raw bytes that do not fill the shape
            model="charlm", session_id="s4", seq=1, start=True, input=pb.Tensor(shape=[1, FEATURES], raw=b"\0" * 8)
        ),
        step_request("charlm", "s5", 1, inputs["s5"][:2]),
        step_request("charlm", "s6", 1, inputs["s6"][:1]),
        step_request("charlm", "s7", 1, inputs["s7"][:2]),
    ]
    (result,) = await exchange_batches(target, [pb.StepBatch(id=1, steps=first)])
    codes = [(r.session_id, r.error.code) for r in result.responses]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes == [
        ("s0", 0),
        ("s1", 0),
        ("s2", 0),
        ("s3", 0),
        ("s0", invalid),
        ("s4", invalid),
        ("s5", 0),
        ("s6", 0),
        ("s7", 0),
    ]
    assert "raw holds 8 bytes" in result.responses[5].error.message
    rows = {"s0": 1, "s1": 3, "s2": 1, "s3": 1, "s5": 2, "s6": 1, "s7": 2}
    for response in result.responses:
        if response.HasField("error"):
            continue
        sid = response.session_id
        want = offline_logits(V1, inputs[sid][: rows[sid]])
        got = np.frombuffer(response.outputs["logits"].raw, "<f4").reshape(rows[sid], FEATURES)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


async def test_an_oversize_batch_is_refused_step_by_step(start_server):
    app = await start_server(max_steps_per_message=4)
    (result,) = await exchange_batches(
        f"127.0.0.1:{app.port}",
        [pb.StepBatch(id=1, steps=[step_request("charlm", f"s{i}", 1, EYE[[1]]) for i in range(5)])],
    )
    assert {r.error.code for r in result.responses} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert "at most 4 steps" in result.responses[0].error.message


async def test_a_resent_batch_replays_what_was_applied_and_applies_the_rest(start_server, redis_store_url):
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    x = EYE[[9]]
    steps = [step_request("charlm", sid, 1, x, start_id=11) for sid in ("a", "b", "c")]
    (first,) = await exchange_batches(target, [pb.StepBatch(id=1, steps=steps[:1])])  # only a's step got through
    assert not first.responses[0].replayed
    (resent,) = await exchange_batches(target, [pb.StepBatch(id=2, steps=steps)])  # the whole batch, again
    assert [r.replayed for r in resent.responses] == [True, False, False]
    np.testing.assert_array_equal(logits_of(resent.responses[0]), logits_of(first.responses[0]))


async def test_the_batch_client_resumes_across_a_drain(start_server, redis_store_url):
    app = await start_server(url=redis_store_url)
    port = app.port
    sessions = [f"s{i}" for i in range(64)]
    expected = {sid: offline_logits(V1, EYE[chars(i, 12)]) for i, sid in enumerate(sessions)}
    async with BatchClient(f"127.0.0.1:{port}", reconnect_timeout_s=20) as gateway:
        underway = asyncio.Event()

        async def run() -> None:
            for t in range(12):
                if t == 3:
                    underway.set()
                inputs = {sid: EYE[chars(i, 12)[t : t + 1]] for i, sid in enumerate(sessions)}
                replies = await gateway.step("charlm", inputs)
                for sid, reply in replies.items():
                    assert not isinstance(reply, StepError), reply
                    np.testing.assert_allclose(reply.outputs["logits"][0], expected[sid][t], atol=1e-5, rtol=0)

        running = asyncio.create_task(run())
        await underway.wait()  # three batches answered, the fourth on its way: now the drain
        await app.stop(grace_s=2)
        await start_server(url=redis_store_url, port=port)
        await running
        assert gateway.reconnects >= 1
        assert all(gateway.acked_seq("charlm", sid) == 12 for sid in sessions)


async def test_a_drained_stream_answers_what_it_read_then_ends_unavailable(start_server, redis_store_url):
    """A stream whose reading a drain cut ends with UNAVAILABLE once what it read is answered: a client still
    writing learns that its later steps were not read (an OK end would leave it to guess)."""
    app = await start_server(url=redis_store_url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = pb_grpc.RnnServeStub(channel).StreamBatch()
        await call.write(pb.StepBatch(id=1, steps=[step_request("charlm", "d", 1, EYE[[3]], start_id=5)]))
        (answered,) = (await call.read()).responses
        assert not answered.HasField("error"), answered
        stopping = asyncio.create_task(app.stop(grace_s=2))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        await stopping
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "send the rest again on a new stream" in (ended.value.details() or "")
    # An orderly end, not an error: a rollout would otherwise count one for every open stream.
    assert (
        app.metrics.registry.get_sample_value("rnnserve_errors_total", {"method": "StreamBatch", "code": "UNAVAILABLE"})
        is None
    )


async def test_a_refused_step_leaves_the_session_where_it_was(start_server):
    app = await start_server()
    async with BatchClient(f"127.0.0.1:{app.port}") as gateway:
        (ok,) = (await gateway.step("charlm", {"s": EYE[[1]]})).values()
        assert isinstance(ok, StepReply) and ok.seq == 1
        (refused,) = (await gateway.step("charlm", {"s": np.full((1, FEATURES), np.inf)})).values()
        assert isinstance(refused, StepError) and refused.code == grpc.StatusCode.INVALID_ARGUMENT
        (again,) = (await gateway.step("charlm", {"s": EYE[[2]]})).values()
        assert isinstance(again, StepReply) and again.seq == 2


async def test_a_client_that_does_not_read_holds_a_bounded_number_of_steps(start_server):
    """A gateway writes 20 batches of 256 steps and reads nothing: the server takes steps up to its
    per-stream limit (counted in steps, not messages) and no further, then answers every one once read."""
    app = await start_server(max_inflight_per_stream=512)
    x = EYE[[3]]
    batches = [
        pb.StepBatch(id=b, steps=[step_request("charlm", f"s{b}-{i}", 1, x) for i in range(256)]) for b in range(20)
    ]
    # Two messages of 256 reach the limit, then the stream stops reading (a message of slack for what
    # the transport may buffer); without a limit in steps it took all 20.
    results = await written_unread(app, lambda channel: pb_grpc.RnnServeStub(channel).StreamBatch(), batches, 512, 768)
    assert [r.id for r in results] == list(range(20))
    assert all(not reply.HasField("error") for r in results for reply in r.responses)
    assert app.metrics.steps.labels("charlm", 1)._value.get() == 20 * 256


async def test_chunks_count_their_time_steps_against_the_stream_limit(start_server):
    """One session's 40 chunks of 64 time steps written without reading: the stream holds about 512 time
    steps (8 chunks), not 512 messages; every chunk is answered in order once the client reads."""
    app = await start_server(max_inflight_per_stream=512)
    chunk = EYE[[t % FEATURES for t in range(64)]]
    requests = [step_request("charlm", "chunky", seq, chunk) for seq in range(1, 41)]
    # 8 chunks, and what the transport buffers (21 KiB an answer)
    answers = await written_unread(app, lambda channel: pb_grpc.RnnServeStub(channel).Stream(), requests, 8, 12)
    assert [a.seq for a in answers] == list(range(1, 41))
    assert all(not a.HasField("error") for a in answers)


async def test_a_batch_of_chunks_counts_every_time_step_against_the_stream_limit(start_server):
    """20 messages of 4 sessions' 64-step chunks written without reading: the stream holds about 512 time
    steps (2 messages), not 512 messages' worth or 512 steps' worth of chunks."""
    app = await start_server(max_inflight_per_stream=512)
    chunk = EYE[[t % FEATURES for t in range(64)]]
    batches = [
        pb.StepBatch(id=b, steps=[step_request("charlm", f"c{b}-{i}", 1, chunk) for i in range(4)]) for b in range(20)
    ]
    # A step weighs its 64 time steps: 2 messages reach the limit, and the transport holds a few more
    # (16 KiB a message); weighed a step each, the stream would take all 20 (80 steps < 512).
    results = await written_unread(app, lambda channel: pb_grpc.RnnServeStub(channel).StreamBatch(), batches, 8, 28)
    assert [r.id for r in results] == list(range(20))
    assert all(not reply.HasField("error") for r in results for reply in r.responses)


async def test_an_answer_larger_than_the_request_limit_is_sent(start_server):
    """A StepBatch just under the request limit whose answer is over it (each answer carries a little
    more than its step): the answer arrives instead of killing the stream, again and again on resends."""
    limit = 64 * 1024
    app = await start_server(max_message_bytes=limit)
    x = EYE[[3]]
    steps = []
    while pb.StepBatch(steps=[*steps, step_request("charlm", f"big-{len(steps)}", 1, x)]).ByteSize() < limit - 64:
        steps.append(step_request("charlm", f"big-{len(steps)}", 1, x))
    batch = pb.StepBatch(id=1, steps=steps)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=CHANNEL_OPTIONS) as channel:
        for _ in range(2):  # the first applies, the resend replays: both answers are over the limit
            call = pb_grpc.RnnServeStub(channel).StreamBatch()
            await call.write(batch)
            await call.done_writing()
            (result,) = [r async for r in call]
            assert batch.ByteSize() < limit < result.ByteSize()
            assert len(result.responses) == len(steps)
            assert all(not reply.HasField("error") for reply in result.responses)


async def test_a_key_redis_cannot_read_fails_its_own_step_only(start_server, redis_store_url):
    """A session key turned into another Redis type between steps: that step is refused, every other step
    of the same message (the same store call) is applied and answered as applied."""
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    names = [f"w{i}" for i in range(5)]
    async with BatchClient(target) as gateway:
        first = await gateway.step("charlm", {sid: EYE[[i]] for i, sid in enumerate(names)})
        assert all(isinstance(reply, StepReply) for reply in first.values())
        with redis.Redis.from_url(redis_store_url) as client:
            client.delete(session_key("rnnserve", "charlm", "w2"))
            client.rpush(session_key("rnnserve", "charlm", "w2"), "a list, not a session")
        second = await gateway.step("charlm", {sid: EYE[[i + 1]] for i, sid in enumerate(names)})
    refused = second.pop("w2")
    assert isinstance(refused, StepError) and "WRONGTYPE" in refused.message, refused
    assert all(isinstance(reply, StepReply) and reply.seq == 2 for reply in second.values()), second
    for sid in second:
        info = await app.engine.get_session("charlm", sid)
        assert info.last_seq == 2
    # Read from the store, not this replica's cache: the key of another type is DATA_LOSS for its session only.
    app.engine.cache.forget(session_key("rnnserve", "charlm", "w0"))
    steps = [step_request("charlm", "w0", 3, EYE[[3]]), step_request("charlm", "w2", 2, EYE[[3]])]
    (result,) = await exchange_batches(target, [pb.StepBatch(steps=steps)])
    w0, w2 = result.responses
    assert not w0.HasField("error") and w0.seq == 3
    assert w2.error.code == grpc.StatusCode.DATA_LOSS.value[0] and "WRONGTYPE" in w2.error.message, w2


async def test_a_gateway_resumes_and_restarts_sessions(start_server, redis_store_url):
    """BatchClient.resume continues a session another client started (from GetSession); restart makes the
    next step a new start, as the refusals of an ended or lost session advise."""
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    x = np.eye(FEATURES, dtype=np.float32)[:1]
    async with BatchClient(target) as first:
        await first.step("charlm", {"g": x})
        await first.step("charlm", {"g": x})
    async with grpc.aio.insecure_channel(target) as channel:
        info = await pb_grpc.RnnServeStub(channel).GetSession(pb.SessionRef(model="charlm", session_id="g"))
    async with BatchClient(target) as again:
        again.resume("charlm", "g", info.last_seq, info.start_id)
        (reply,) = (await again.step("charlm", {"g": x}, end=["g"])).values()
        assert isinstance(reply, StepReply) and reply.seq == 3 and not reply.replayed
        (ended,) = (await again.step("charlm", {"g": x})).values()
        assert isinstance(ended, StepError) and ended.code is grpc.StatusCode.NOT_FOUND
        again.restart("charlm", "g")
        (started,) = (await again.step("charlm", {"g": x})).values()
        assert isinstance(started, StepReply) and started.seq == 1


async def test_overlapping_batches_wait_only_for_the_sessions_they_share(start_server, redis_store_url):
    """Batches taken one after another, each before the last has landed: a step whose session has one in
    flight waits its turn; the others of its batch go at once. Every step lands in its session's order."""
    from service.sessions.steps import Step

    app = await start_server(url=redis_store_url)
    engine = app.engine
    rng = np.random.default_rng(7)
    sessions = [f"o{i}" for i in range(24)]
    sent: dict[str, list[int]] = {s: [] for s in sessions}
    futures = []
    for _ in range(12):  # all submitted before any lands
        chosen = rng.choice(sessions, size=9, replace=False)
        steps = []
        for s in chosen:
            seq = len(sent[s]) + 1
            char = int(rng.integers(FEATURES))
            sent[s].append(char)
            steps.append(Step("charlm", str(s), seq, EYE[[char]], start=seq == 1))
        futures.append((steps, engine.submit_many(steps)))
    for steps, future in futures:
        for step, answer in zip(steps, await future, strict=True):
            assert not isinstance(answer, BaseException), answer
            assert (answer.session_id, answer.seq, answer.replayed) == (step.session_id, step.seq, False)
            want = offline_logits(V1, EYE[sent[step.session_id][: step.seq]])[-1]
            np.testing.assert_allclose(answer.outputs["logits"][0], want, atol=1e-5, rtol=0)
    assert engine.steps_in_flight == 0 and engine.sessions_in_flight == 0


async def test_a_pipelining_gateways_waiting_steps_go_to_the_batcher_together(start_server, redis_store_url):
    """A gateway sends each message before the last one for the same sessions is answered: every step of
    the later messages waits its session's turn, and the turns come together as a message lands. They go
    to the batcher as one group a message (one by one, the event loop paid per step), and every session
    still steps in order, its outputs those of an offline run."""
    app = await start_server(url=redis_store_url)
    batcher = app.engine._batcher
    groups: list[int] = []
    put_many = batcher.put_many

    def counted(items, done):  # the engine's own batcher, its groups counted
        groups.append(len(items))
        put_many(items, done)

    batcher.put_many = counted
    sessions, rounds = 64, 4
    inputs = {i: EYE[chars(i, rounds)] for i in range(sessions)}
    messages = [
        pb.StepBatch(
            id=t, steps=[step_request("charlm", f"p{i}", t + 1, inputs[i][t : t + 1]) for i in range(sessions)]
        )
        for t in range(rounds)
    ]
    results = await exchange_batches(f"127.0.0.1:{app.port}", messages)
    assert [r.id for r in results] == list(range(rounds))
    expected = {i: offline_logits(V1, x) for i, x in inputs.items()}
    for t, result in enumerate(results):
        for i, response in enumerate(result.responses):
            assert not response.HasField("error"), response.error
            assert (response.session_id, response.seq) == (f"p{i}", t + 1)
            np.testing.assert_allclose(logits_of(response)[0], expected[i][t], atol=1e-5, rtol=0)
    assert groups == [sessions] * rounds


async def test_a_gateway_call_past_the_servers_step_limit_goes_as_several_messages(start_server):
    """1,100 sessions in one call, to a server taking at most 1,024 steps a message: the client sends two
    messages at once and answers every session, in the call's order (one message was refused step by step,
    RESOURCE_EXHAUSTED, which no retry could cure)."""
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    async with BatchClient(target) as gateway:
        for seq in (1, 2):
            inputs = {f"w{i}": EYE[[(i + seq) % FEATURES]] for i in range(1100)}
            replies = await gateway.step("charlm", inputs)
            assert list(replies) == list(inputs)
            for sid, reply in replies.items():
                assert isinstance(reply, StepReply) and reply.seq == seq, reply
                i = int(sid[1:])
                want = offline_logits(V1, EYE[[(i + 1) % FEATURES, (i + 2) % FEATURES][:seq]])[-1]
                np.testing.assert_allclose(reply.outputs["logits"][0], want, atol=1e-5, rtol=0)
    assert (
        app.metrics.registry.get_sample_value(
            "rnnserve_errors_total", {"method": "StreamBatch", "code": "RESOURCE_EXHAUSTED"}
        )
        is None
    )


async def test_a_gateway_call_is_cut_by_steps_and_by_bytes(start_server):
    """A client's own limits: at most `max_steps_per_message` steps and `max_message_bytes` bytes a message;
    a single step past the byte limit is refused before anything is sent, and no session moves on."""
    app = await start_server(max_steps_per_message=8)
    target = f"127.0.0.1:{app.port}"
    async with BatchClient(target, max_steps_per_message=8) as gateway:
        replies = await gateway.step("charlm", {f"c{i}": EYE[[i % FEATURES]] for i in range(30)})
        assert all(isinstance(r, StepReply) and r.seq == 1 for r in replies.values())
    step_bytes = step_request("charlm", "b00", 1, EYE[[1, 2]], start_id=1).ByteSize()
    async with BatchClient(target, max_message_bytes=3 * step_bytes + 20) as gateway:  # three steps a message
        inputs = {f"b{i:02d}": EYE[[i % FEATURES, 2]] for i in range(10)}
        replies = await gateway.step("charlm", inputs)
        assert list(replies) == list(inputs) and all(isinstance(r, StepReply) for r in replies.values())
        too_long = {"b00": EYE[[1, 2, 3]], "huge": np.zeros((40, FEATURES), np.float32)}
        try:
            await gateway.step("charlm", too_long)
            raise AssertionError("a step larger than a message was sent")
        except ValueError as err:
            assert "'huge'" in str(err) and "shorter chunks" in str(err)
        assert gateway.acked_seq("charlm", "b00") == 1 and gateway.acked_seq("charlm", "huge") == 0
        (again,) = (await gateway.step("charlm", {"b00": EYE[[4]]})).values()
        assert isinstance(again, StepReply) and again.seq == 2 and not again.replayed


async def test_a_call_whose_messages_fail_in_part_moves_no_session_on(start_server, redis_store_url):
    """Of a call sent as two messages, the first applied and the second lost (no stream could be had): the
    call raises, no session moves on, and the call made again replays the first message's steps and applies
    the second's. Nothing is applied twice."""
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"

    class SecondMessageLost(BatchClient):
        sent = 0

        async def _send(self, requests):  # type: ignore[no-untyped-def]
            SecondMessageLost.sent += 1
            if SecondMessageLost.sent == 2:
                raise ConnectionError("no stream could be had")
            return await super()._send(requests)

    inputs = {f"p{i}": EYE[[i % FEATURES]] for i in range(20)}
    async with SecondMessageLost(target, max_steps_per_message=10) as gateway:
        try:
            await gateway.step("charlm", inputs)
            raise AssertionError("the call did not raise")
        except ConnectionError:
            pass
        assert all(gateway.acked_seq("charlm", sid) == 0 for sid in inputs)
        replies = await gateway.step("charlm", inputs)
    assert [r.replayed for r in replies.values()] == [True] * 10 + [False] * 10  # type: ignore[union-attr]
    assert all(isinstance(r, StepReply) and r.seq == 1 for r in replies.values())


async def test_a_gateway_cuts_its_calls_to_a_servers_smaller_message_limit(start_server):
    """A server started with a smaller max_message_bytes than its clients': a call cut for the client's own
    limit before any stream was open is cut again to the server's (its headers say it) and applied, while
    the other calls on the same stream go on; nothing is sent past the limit, so no stream breaks."""
    app = await start_server(max_message_bytes=100_000)
    target = f"127.0.0.1:{app.port}"
    long = np.tile(EYE[[3]], (120, 1))  # 120 time steps: about 37 KB a step
    async with BatchClient(target, streams=1, reconnect_timeout_s=20) as gateway:
        big = gateway.step("charlm", {f"L{i}": long for i in range(5)})
        small = [gateway.step("charlm", {f"S{i}": EYE[[i]]}) for i in range(10)]
        outcomes = await asyncio.wait_for(asyncio.gather(big, *small), 10)
        for replies in outcomes:
            assert all(isinstance(r, StepReply) and r.seq == 1 and not r.replayed for r in replies.values()), replies
        assert gateway.reconnects == 0
        replies = await gateway.step("charlm", {f"L{i}": long for i in range(5)})
        assert all(isinstance(r, StepReply) and r.seq == 2 for r in replies.values())


async def test_a_gateway_keeps_to_a_servers_smaller_step_limit(start_server):
    """A server that takes at most 8 steps a message says so in a stream's headers: the client's first call,
    cut by its own 1,024 before any stream was open, is refused step by step (RESOURCE_EXHAUSTED, nothing
    applied) and sent again cut to 8 a message; later calls are cut to 8 from the start."""
    app = await start_server(max_steps_per_message=8)
    target = f"127.0.0.1:{app.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.RnnServeStub(channel).StreamBatch()
        headers = dict(await call.initial_metadata())
        call.cancel()
    assert headers["rnnserve-max-steps-per-message"] == "8" and headers["rnnserve-max-message-bytes"] == str(4 << 20)
    refused = {"method": "StreamBatch", "code": "RESOURCE_EXHAUSTED"}
    async with BatchClient(target, streams=1) as gateway:
        most = _messages_in_flight(gateway)  # the pieces of a message cut again go out at once
        for seq in (1, 2):
            replies = await gateway.step("charlm", {f"e{i}": EYE[[(i + seq) % FEATURES]] for i in range(30)})
            assert all(isinstance(r, StepReply) and r.seq == seq and not r.replayed for r in replies.values())
            assert app.metrics.registry.get_sample_value("rnnserve_errors_total", refused) == 30  # the first only
            if seq == 1:
                assert most() == 4, f"the refused message's four pieces went out {most()} at a time"


async def test_a_gateway_start_refused_for_its_version_goes_again_with_the_next_calls_version(start_server):
    """A call's version counts until a session's first step is acknowledged: a start refused for a version
    the server does not load goes again with the next call's; a started session keeps its own, and a call
    without a version keeps the one `restart` gave."""
    app = await start_server()
    x = EYE[:1]
    async with BatchClient(f"127.0.0.1:{app.port}") as gateway:
        (refused,) = (await gateway.step("charlm", {"v": x}, version=99)).values()
        assert isinstance(refused, StepError) and refused.code is grpc.StatusCode.NOT_FOUND
        (started,) = (await gateway.step("charlm", {"v": x}, version=1)).values()
        assert isinstance(started, StepReply) and (started.seq, started.version) == (1, 1), started
        (pinned,) = (await gateway.step("charlm", {"v": x}, version=99)).values()
        assert isinstance(pinned, StepReply) and (pinned.seq, pinned.version) == (2, 1), pinned
        gateway.restart("charlm", "r", version=99)
        (refused,) = (await gateway.step("charlm", {"r": x})).values()
        assert isinstance(refused, StepError) and refused.code is grpc.StatusCode.NOT_FOUND
        (started,) = (await gateway.step("charlm", {"r": x}, version=0)).values()
        assert isinstance(started, StepReply) and (started.seq, started.version) == (1, 1), started


async def test_a_restart_waits_for_the_call_under_way_for_its_session(start_server):
    """`restart` makes the session's next step a new start, and that step still waits for a call under
    way for the session: one call at a time per session, restarted or not."""
    app = await start_server()
    async with BatchClient(f"127.0.0.1:{app.port}", streams=1) as gateway:
        await gateway.step("charlm", {"r": EYE[:1]})
        most = _messages_in_flight(gateway)
        under_way = asyncio.create_task(gateway.step("charlm", {"r": np.tile(EYE[[3]], (120, 1))}))
        await asyncio.sleep(0)  # the call holds the session now
        gateway.restart("charlm", "r")
        (restarted,) = (await asyncio.wait_for(gateway.step("charlm", {"r": EYE[:1]}), 10)).values()
        (second,) = (await under_way).values()
        assert isinstance(second, StepReply) and second.seq == 2, second
        assert isinstance(restarted, StepReply) and restarted.seq == 1 and not restarted.replayed, restarted
        assert most() == 1, f"{most()} calls for one session were in flight at once"


def _messages_in_flight(gateway: BatchClient) -> Callable[[], int]:
    """From now on, the most messages `gateway` has had in flight at once (its `_send` counted)."""
    sent, most = 0, 0
    send = gateway._send

    async def counted(batch: pb.StepBatch) -> tuple[pb.StepBatchResult, float]:
        nonlocal sent, most
        sent += 1
        most = max(most, sent)
        try:
            return await send(batch)
        finally:
            sent -= 1

    gateway._send = counted  # type: ignore[method-assign]
    return lambda: most
