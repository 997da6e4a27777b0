"""The session semantics of docs/ARCHITECTURE.md, through a real gRPC server, on the memory and the Redis store.

After every refused step the session must be unchanged: the test then continues it and compares with an
uninterrupted offline run.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.conftest import (
    TEST_REPO,
    exchange,
    held_out_text,
    logits_of,
    offline_logits,
    one_hot_text,
    step_request,
    vocabulary,
)

V1 = TEST_REPO / "charlm" / "1"
TEXT = held_out_text()[:24]
X = one_hot_text(TEXT, vocabulary())
EXPECTED = offline_logits(V1, X)
TOLERANCE = 1e-5


def steps(session_id: str, first: int, last: int) -> list[pb.StepRequest]:
    """Requests for seq first..last (1-based) of TEXT, seq 1 starting the session."""
    return [step_request(session_id, seq, X[seq - 1 : seq], start=seq == 1) for seq in range(first, last + 1)]


def assert_matches(responses: list[pb.StepResponse], first: int) -> None:
    for offset, response in enumerate(responses):
        seq = first + offset
        assert response.seq == seq
        np.testing.assert_allclose(logits_of(response)[0], EXPECTED[seq - 1], atol=TOLERANCE, rtol=0)


def assert_error(response: pb.StepResponse, code: grpc.StatusCode, *fragments: str) -> None:
    assert response.HasField("error"), "the step should have been refused"
    assert response.error.code == code.value[0], response.error
    for fragment in fragments:
        assert fragment in response.error.message, response.error.message
    assert not response.outputs


async def last_seq(target: str, session_id: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        info = await pb_grpc.RnnServeStub(channel).GetSession(pb.SessionRef(model="charlm", session_id=session_id))
        return int(info.last_seq)


async def test_stream_equals_offline_run(start_server, store_url):
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    assert_matches(await exchange(target, steps("s1", 1, len(TEXT))), first=1)
    assert await last_seq(target, "s1") == len(TEXT)


async def test_resend_of_last_seq_returns_stored_outputs_and_changes_nothing(start_server, store_url):
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    first = await exchange(target, steps("s", 1, 5))
    (retry,) = await exchange(target, steps("s", 5, 5))
    assert retry.replayed and retry.seq == 5
    np.testing.assert_array_equal(logits_of(retry), logits_of(first[-1]))
    assert await last_seq(target, "s") == 5
    assert_matches(await exchange(target, steps("s", 6, 10)), first=6)


async def test_last_seq_with_another_input_is_not_a_resend(start_server, store_url):
    """Recognised by seq and input together: the same seq with another input is refused, not replayed."""
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    await exchange(target, steps("s", 1, 5))
    for impostor in (
        step_request("s", 5, X[7:8]),
        step_request("s", 5, X[4:5], end=True),
        step_request("s", 5, X[4:6]),
    ):
        (refused,) = await exchange(target, [impostor])
        assert_error(refused, grpc.StatusCode.FAILED_PRECONDITION, "seq 5 was already applied with a different input")
        assert refused.expected_seq == 6 and not refused.replayed
    assert await last_seq(target, "s") == 5
    assert_matches(await exchange(target, steps("s", 6, 8)), first=6)


@pytest.mark.parametrize(("seq", "kind"), [(8, "gap"), (3, "stale")])
async def test_gap_and_stale_seq_are_refused_with_the_expected_seq(start_server, store_url, seq, kind):
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    await exchange(target, steps("s", 1, 5))
    (refused,) = await exchange(target, [step_request("s", seq, X[seq - 1 : seq])])
    assert_error(refused, grpc.StatusCode.FAILED_PRECONDITION, f"got seq {seq}", "expected seq 6")
    assert refused.expected_seq == 6
    assert await last_seq(target, "s") == 5
    assert_matches(await exchange(target, steps("s", 6, 9)), first=6)


async def test_expired_session_is_not_found(start_server, store_url):
    app = await start_server(url=store_url, sessions={"state_ttl_s": 0.3})
    target = f"127.0.0.1:{app.port}"
    await exchange(target, steps("s", 1, 3))
    await asyncio.sleep(0.5)
    (late,) = await exchange(target, steps("s", 4, 4))
    assert_error(late, grpc.StatusCode.NOT_FOUND, "expired or was never started", "start=true")
    (retry,) = await exchange(target, steps("s", 3, 3))  # the cached record must not answer either
    assert_error(retry, grpc.StatusCode.NOT_FOUND, "expired")


async def test_every_write_refreshes_the_ttl(start_server, store_url):
    app = await start_server(url=store_url, sessions={"state_ttl_s": 0.6})
    target = f"127.0.0.1:{app.port}"
    for seq in range(1, 6):  # 5 steps over ~1 s: longer than one TTL, shorter than each gap
        assert_matches(await exchange(target, steps("s", seq, seq)), first=seq)
        await asyncio.sleep(0.2)


async def test_never_started_session_is_not_found(start_server, store_url):
    app = await start_server(url=store_url)
    (response,) = await exchange(f"127.0.0.1:{app.port}", [step_request("nobody", 1, X[:1])])
    assert_error(response, grpc.StatusCode.NOT_FOUND, "never started")


async def test_start_replaces_an_existing_session(start_server, store_url):
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    await exchange(target, steps("s", 1, 6))
    assert_matches(await exchange(target, steps("s", 1, 4)), first=1)
    assert await last_seq(target, "s") == 4


async def test_end_applies_the_step_and_leaves_a_tombstone(start_server, store_url):
    app = await start_server(url=store_url, sessions={"ended_ttl_s": 0.6})
    target = f"127.0.0.1:{app.port}"
    await exchange(target, steps("s", 1, 3))
    end = step_request("s", 4, X[3:4], end=True)
    (last,) = await exchange(target, [end])
    assert_matches([last], first=4)
    (resent,) = await exchange(target, [end])  # the end's answer was lost: its resend gets it again
    assert resent.replayed and resent.seq == 4
    np.testing.assert_array_equal(logits_of(resent), logits_of(last))
    for after in (steps("s", 5, 5)[0], steps("s", 4, 4)[0], step_request("s", 4, X[5:6], end=True)):
        (refused,) = await exchange(target, [after])
        assert_error(refused, grpc.StatusCode.NOT_FOUND, "ended at seq 4", "start a new session")
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RnnServeStub(channel).GetSession(pb.SessionRef(model="charlm", session_id="s"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ended at seq 4" in info.value.details()
    await asyncio.sleep(0.8)  # the tombstone idles out after ended_ttl_s: then the session is simply unknown
    (gone,) = await exchange(target, [end])
    assert_error(gone, grpc.StatusCode.NOT_FOUND, "expired or was never started")


async def test_a_start_replaces_a_tombstone(start_server, store_url):
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    await exchange(target, [*steps("s", 1, 2), step_request("s", 3, X[2:3], end=True)])
    assert_matches(await exchange(target, steps("s", 1, 4)), first=1)
    assert await last_seq(target, "s") == 4


BAD_INPUTS = {
    "wrong feature count": (step_request("s", 4, np.zeros((1, 7))), "input must be [T, "),
    "nan": (step_request("s", 4, np.full((1, X.shape[1]), np.nan)), "NaN or Inf at time step 0"),
    "inf in a chunk": (
        step_request("s", 4, np.vstack([X[3:4], np.full((1, X.shape[1]), np.inf)])),
        "time step 1",
    ),
    "+inf and -inf": (step_request("s", 4, np.array([[np.inf, -np.inf] + [0.0] * (X.shape[1] - 2)])), "NaN or Inf"),
    "raw length": (
        pb.StepRequest(model="charlm", session_id="s", seq=4, input=pb.Tensor(shape=[1, X.shape[1]], raw=b"\0" * 12)),
        "raw holds 12 bytes",
    ),
    "three axes": (step_request("s", 4, np.zeros((1, 1, X.shape[1]))), "input must be [T, "),
    "no input": (pb.StepRequest(model="charlm", session_id="s", seq=4), "input has no shape"),
    "overflowing shape": (
        pb.StepRequest(model="charlm", session_id="s", seq=4, input=pb.Tensor(shape=[1 << 40, 1 << 40])),
        "far larger than any message",
    ),
    "empty chunk": (step_request("s", 4, np.zeros((0, X.shape[1]))), "1 <= T"),
    "no elements, a huge axis": (
        pb.StepRequest(model="charlm", session_id="s", seq=4, input=pb.Tensor(shape=[0, 1 << 62])),
        "far larger than any message",
    ),
    "bad session id": (step_request("s{1}", 4, X[3:4]), "session id"),
    "seq zero": (step_request("s", 0, X[3:4]), "seq must be 1 or more"),
    "start with seq 4": (step_request("s", 4, X[3:4], start=True), "start step must have seq 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_malformed_input_is_invalid_argument_and_changes_nothing(start_server, store_url, case):
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    await exchange(target, steps("s", 1, 3))
    request, fragment = BAD_INPUTS[case]
    (refused,) = await exchange(target, [request])
    assert_error(refused, grpc.StatusCode.INVALID_ARGUMENT, fragment)
    assert await last_seq(target, "s") == 3
    assert_matches(await exchange(target, steps("s", 4, 6)), first=4)


async def test_huge_finite_inputs_are_applied(start_server, store_url):
    """Values near float32's largest are finite: applied, whatever their sum (the server runs its tests with
    warnings as errors, so a check that overflowed would fail the stream here)."""
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    huge = np.full((2, X.shape[1]), np.finfo(np.float32).max, np.float32)
    (answer,) = await exchange(target, [step_request("s", 1, huge, start=True)])
    assert not answer.HasField("error"), answer.error
    assert await last_seq(target, "s") == 1


async def test_unknown_model_and_version_are_not_found(start_server, store_url):
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    (no_model,) = await exchange(target, [step_request("s", 1, X[:1], model="nope", start=True)])
    assert_error(no_model, grpc.StatusCode.NOT_FOUND, "no model 'nope'", "charlm/1")
    (no_version,) = await exchange(target, [step_request("s", 1, X[:1], start=True, version=9)])
    assert_error(no_version, grpc.StatusCode.NOT_FOUND, "charlm/9")


async def test_many_sessions_multiplexed_on_one_stream(start_server, store_url):
    """Sessions interleaved at random, pipelined without waiting: each must equal its own offline run."""
    app = await start_server(url=store_url, batching={"max_batch_size": 8, "max_batch_wait_us": 2000})
    rng = np.random.default_rng(3)
    texts = {f"sensor-{i}": held_out_text()[i * 50 : i * 50 + 12] for i in range(10)}
    pending = {sid: 1 for sid in texts}
    order = []
    while pending:
        sid = str(rng.choice(sorted(pending)))
        order.append((sid, pending[sid]))
        pending[sid] += 1
        if pending[sid] > len(texts[sid]):
            del pending[sid]
    answers: dict[tuple[str, int], np.ndarray] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = pb_grpc.RnnServeStub(channel).Stream()
        for sid, seq in order:
            x = one_hot_text(texts[sid][seq - 1], vocabulary())
            await call.write(step_request(sid, seq, x, start=seq == 1))
        await call.done_writing()
        async for response in call:
            answers[(response.session_id, response.seq)] = logits_of(response)[0]
    assert len(answers) == len(order)
    for sid, text in texts.items():
        expected = offline_logits(V1, one_hot_text(text, vocabulary()))
        got = np.stack([answers[(sid, seq)] for seq in range(1, len(text) + 1)])
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


async def test_chunks_and_single_steps_in_one_batch_equal_a_step_by_step_run(start_server, store_url):
    app = await start_server(url=store_url, batching={"max_batch_wait_us": 5000})
    target = f"127.0.0.1:{app.port}"
    chunked = [step_request("chunky", 1, X[:5], start=True), step_request("chunky", 2, X[5:12])]
    single = steps("single", 1, 12)
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.RnnServeStub(channel).Stream()
        for request in [*chunked, *single]:
            await call.write(request)
        await call.done_writing()
        responses = [r async for r in call]
    by_session: dict[str, list[pb.StepResponse]] = {}
    for response in responses:
        by_session.setdefault(response.session_id, []).append(response)
    got = np.concatenate([logits_of(r) for r in sorted(by_session["chunky"], key=lambda r: r.seq)])
    np.testing.assert_allclose(got, EXPECTED[:12], atol=TOLERANCE, rtol=0)
    assert_matches(sorted(by_session["single"], key=lambda r: r.seq), first=1)


async def test_delete_session(start_server, store_url):
    app = await start_server(url=store_url)
    target = f"127.0.0.1:{app.port}"
    await exchange(target, steps("s", 1, 2))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        assert (await stub.DeleteSession(pb.SessionRef(model="charlm", session_id="s"))).deleted
        assert not (await stub.DeleteSession(pb.SessionRef(model="charlm", session_id="s"))).deleted
    (after,) = await exchange(target, steps("s", 3, 3))
    assert_error(after, grpc.StatusCode.NOT_FOUND)
