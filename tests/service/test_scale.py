"""A thousand sessions at once: a gateway reconnecting its sensors. No error from load, every output right."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.errors import Overloaded, RnnServeError, Unavailable
from service.sessions.steps import Step, StepResult
from service.state.store import session_key
from tests.conftest import TEST_REPO, logits_of, offline_logits, step_request, vocabulary

SESSIONS, STREAMS, STEPS = 1024, 16, 4
FEATURES = len(vocabulary())
EYE = np.eye(FEATURES, dtype=np.float32)


def chars(i: int) -> list[int]:
    """Session i's characters: 97 distinct sequences among the 1,024 sessions."""
    return [(i * 7 + t * (i % 3 + 1)) % FEATURES for t in range(STEPS)]


async def test_1024_sessions_start_at_once_on_16_streams_then_step(start_server, redis_store_url):
    app = await start_server(url=redis_store_url)  # the default pool: 64 connections for 1,024 sessions
    expected: dict[tuple[int, ...], np.ndarray] = {}
    for i in range(SESSIONS):
        key = tuple(chars(i))
        if key not in expected:
            expected[key] = offline_logits(TEST_REPO / "charlm" / "1", EYE[list(key)])

    async def stream(k: int) -> list[str]:
        problems = []
        mine = list(range(k, SESSIONS, STREAMS))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            call = pb_grpc.RnnServeStub(channel).Stream()
            for i in mine:  # every session's start, at once
                await call.write(step_request(f"sensor-{i}", 1, EYE[chars(i)[:1]], start=True))
            done = 0
            async for answer in call:
                i = int(answer.session_id.removeprefix("sensor-"))
                if answer.HasField("error"):
                    problems.append(f"{answer.session_id} seq {answer.seq}: {answer.error.message}")
                    break
                want = expected[tuple(chars(i))][answer.seq - 1]
                if not np.allclose(logits_of(answer)[0], want, atol=1e-5, rtol=0):
                    problems.append(f"{answer.session_id} seq {answer.seq}: wrong output")
                if answer.seq < STEPS:
                    seq = answer.seq + 1
                    await call.write(step_request(answer.session_id, seq, EYE[chars(i)[seq - 1 : seq]]))
                else:
                    done += 1
                    if done == len(mine):
                        break
            await call.done_writing()
        return problems

    results = await asyncio.gather(*(stream(k) for k in range(STREAMS)))
    assert [p for problems in results for p in problems] == []
    steps = app.metrics.steps.labels("charlm", 1)._value.get()
    assert steps == SESSIONS * STEPS


async def test_a_long_queue_of_refusals_answers_every_step(start_server):
    """A batch lands while the step queue is full: the sessions behind it are refused their next step,
    with 1,500 more of theirs waiting. Every step is answered, and the sessions' turns are free after.
    (A refusal used to start the session's next step inside itself: recursion as deep as the queue.)"""
    app = await start_server(batching={"max_queue": 1, "max_concurrent_batches": 1, "max_batch_wait_us": 1000})
    x = EYE[[3]]
    futures: dict[str, list[asyncio.Future[StepResult]]] = {sid: [] for sid in "abc"}
    for sid in "abc":  # one batch takes the three starts
        futures[sid].append(app.engine.submit(Step("charlm", sid, 1, x, start=True)))
        await asyncio.sleep(0)
    futures["a"].append(app.engine.submit(Step("charlm", "a", 2, x)))  # a's next step fills the queue
    for seq in range(2, 1502):
        for sid in "bc":
            futures[sid].append(app.engine.submit(Step("charlm", sid, seq, x)))
    async with asyncio.timeout(60):
        await asyncio.gather(*(f for fs in futures.values() for f in fs), return_exceptions=True)
    assert [f.exception() for f in futures["a"]] == [None, None]
    for sid in "bc":
        assert futures[sid][0].exception() is None
        assert isinstance(futures[sid][1].exception(), Overloaded)
        # The rest: refused too, or out of order once seq 2 was refused; each with a client-facing error.
        assert all(isinstance(f.exception(), RnnServeError) for f in futures[sid][2:])
    assert app.engine.sessions_in_flight == 0
    again = await app.engine.step(Step("charlm", "b", 2, x))  # b's turn is free: its next step runs
    assert again.seq == 2


async def test_steps_past_the_replica_limit_are_refused_and_the_rest_land(start_server):
    """More steps pipelined than a worker will hold: the excess is refused (RESOURCE_EXHAUSTED, at once,
    before it takes memory) and everything taken lands."""
    app = await start_server(batching={"max_pending_steps": 100})
    x = EYE[[3]]
    futures = [app.engine.submit(Step("charlm", f"p{i}", 1, x, start=True)) for i in range(150)]
    assert app.engine.steps_in_flight == 100
    await asyncio.gather(*futures, return_exceptions=True)
    assert [f.exception() is None for f in futures] == [True] * 100 + [False] * 50
    assert all(isinstance(f.exception(), Overloaded) for f in futures[100:])
    assert app.engine.steps_in_flight == 0
    again = await app.engine.step(Step("charlm", "p149", 1, x, start=True))  # room again
    assert again.seq == 1


async def test_the_engine_stops_only_once_every_step_waiting_its_turn_is_answered(start_server):
    """Steps queued behind their session's step in flight when the engine stops: each is answered (the
    first applied, the rest refused as the stopping batcher refuses them, a loop pass apiece) before stop
    returns, not after."""
    app = await start_server()
    x = EYE[[3]]
    futures = [app.engine.submit(Step("charlm", "line", 1, x, start=True))]
    futures += [app.engine.submit(Step("charlm", "line", seq, x)) for seq in range(2, 7)]
    await app.engine.stop(timeout_s=10)
    assert [f.done() for f in futures] == [True] * 6
    assert futures[0].exception() is None
    assert all(isinstance(f.exception(), Unavailable) for f in futures[1:])
    assert app.engine.steps_in_flight == 0


async def test_a_delete_waiting_its_turn_when_the_engine_stops_is_refused_not_applied_later(start_server):
    """A DeleteSession queued behind its session's step: once the engine stops it is refused (UNAVAILABLE,
    send it elsewhere) and stop has answered it; it is never applied after the stop."""
    app = await start_server()
    x = EYE[[3]]
    first = app.engine.submit(Step("charlm", "doomed", 1, x, start=True))
    deleting = asyncio.ensure_future(app.engine.delete_session("charlm", "doomed"))
    await asyncio.sleep(0)  # the delete joins the session's line behind the step
    await app.engine.stop(timeout_s=10)
    assert first.done() and first.exception() is None
    assert deleting.done() and isinstance(deleting.exception(), Unavailable)
    (stored,) = await app.store.load_many([session_key("rnnserve", "charlm", "doomed")])
    assert stored is not None  # the session is still there: the delete was not applied
