"""The streaming client's own promises: no hang on a dead stream, one step at a time per session, a
gateway's calls spread over its streams."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.client import BatchClient, Spread, StepReply, StreamBalance, StreamClient, _reply, open_channel
from service.errors import InvalidArgument
from tests.conftest import vocabulary
from tests.service.test_session_contract import EXPECTED, TOLERANCE, X

FEATURES = len(vocabulary())


async def test_a_refused_stream_fails_the_steps_instead_of_hanging(start_server):
    app = await start_server(max_streams=1)
    target = f"127.0.0.1:{app.port}"
    async with StreamClient(target) as holder:
        await holder.session("charlm").step(X[:1])  # holds the one stream this server allows
        async with StreamClient(target, reconnect_timeout_s=1.0) as refused:
            session = refused.session("charlm")
            for _ in range(2):  # retried with backoff for the reconnect timeout, then failed; and again
                started = time.monotonic()
                with pytest.raises(ConnectionError, match="RESOURCE_EXHAUSTED"):
                    await asyncio.wait_for(session.step(X[:1]), 10)
                assert 0.9 < time.monotonic() - started < 5
                assert 2 <= refused.attempts <= 40  # backed off, not a busy loop


async def test_concurrent_steps_of_one_session_go_in_order(start_server):
    app = await start_server()
    async with StreamClient(f"127.0.0.1:{app.port}") as client:
        session = client.session("charlm")
        replies = await asyncio.gather(*(session.step(X[t : t + 1]) for t in range(6)))
    assert [r.seq for r in replies] == [1, 2, 3, 4, 5, 6]  # gather keeps call order; the lock keeps seq order
    for t, reply in enumerate(replies):
        assert abs(reply.outputs["logits"][0] - EXPECTED[t]).max() <= TOLERANCE


async def test_a_server_slow_to_answer_its_handshake_is_reached_on_the_first_call(start_server):
    """A busy server may send its HTTP/2 settings some hundreds of milliseconds after the TCP connect. The
    channel's first connect attempt must wait for them rather than time out and fail the call."""
    app = await start_server()

    async def delayed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", app.port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer, 0), pipe(upstream_reader, writer, 0.5))

    proxy = await asyncio.start_server(delayed, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        async with open_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # not wait_for_ready
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proxy.close()
        await proxy.wait_closed()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stream_balance_spreads_first_then_favours_the_faster_streams():
    clock = Clock()
    balance = StreamBalance(3, clock=clock)
    tickets = []
    for _ in range(3):
        k = balance.pick()
        tickets.append((k, balance.sent(k)))
    assert [len(w) for w in balance.waiting] == [1, 1, 1]  # not yet measured: the least loaded first
    for (k, ticket), seconds in zip(tickets, (0.010, 0.025, 0.025), strict=True):
        clock.now = ticket + seconds
        balance.answered(k, ticket)
    assert balance.pick() == 0
    balance.sent(0)
    assert balance.pick() == 0  # 10 ms with one waiting promises 20 ms: sooner than 25
    balance.sent(0)
    assert balance.pick() == 1  # with two waiting, about 30 ms: later than 25


def test_stream_balance_leaves_a_stream_that_stopped_answering():
    """A stream whose message waits (measured or not) loses its share as the wait grows: a hung peer, or a
    stream the server refused, does not draw every call."""
    clock = Clock()
    balance = StreamBalance(2, clock=clock)
    measured = balance.sent(0)
    clock.now += 0.01
    balance.answered(0, measured)
    assert balance.pick() == 1  # never measured, nothing waiting: fast
    balance.sent(1)  # ... and it never answers
    clock.now += 0.001
    assert balance.pick() == 1  # waited 1 ms: still the promise of the soonest answer
    clock.now += 1.0
    assert [balance.pick() for _ in range(3)] == [0, 0, 0]


def test_stream_balance_forgets_a_slow_answer():
    """One slow answer (a restart waited out) does not sideline a stream for good: its average halves every
    half-life, the stream is tried again, and its next answer counts on what is left of it."""
    clock = Clock()
    balance = StreamBalance(2, half_life_s=0.5, clock=clock)
    slow = balance.sent(1)
    clock.now += 2.0
    balance.answered(1, slow)
    started = clock.now
    waiting = [balance.sent(0) for _ in range(3)]
    while (k := balance.pick()) == 0:  # stream 0 answers in 10 ms, three calls waiting on it all along
        clock.now += 0.010
        balance.answered(0, waiting.pop(0))
        waiting.append(balance.sent(0))
        assert clock.now - started < 5.0, "the slow stream was never tried again"
    assert clock.now - started > 1.0  # not at once: 2 s had to fade below stream 0's 4 × 10 ms
    ticket = balance.sent(k)
    clock.now += 0.010
    balance.answered(k, ticket)
    assert balance.pick() == 1  # its fresh 10 ms counted on the faded average, not on 2 s: used again


def test_stream_balance_does_not_measure_calls_given_up():
    clock = Clock()
    balance = StreamBalance(1, clock=clock)
    ticket = balance.sent(0)
    clock.now += 0.010
    balance.answered(0, ticket)
    given_up = balance.sent(0)
    clock.now += 5.0
    balance.answered(0, given_up, measured=False)  # cancelled by its caller: its time is not a latency
    assert balance.latency_s[0] == pytest.approx(0.010)
    assert balance.waiting == [[]]


async def test_a_gateway_spreads_concurrent_calls_over_its_streams(start_server):
    """Calls at once go over several streams (a connection each), every session's steps still in order and
    applied once; the outputs are those of one stream."""
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    x = np.eye(FEATURES, dtype=np.float32)
    groups = [[f"g{g}-{i}" for i in range(16)] for g in range(8)]

    async def drive(gateway: BatchClient, group: list[str]) -> list[np.ndarray]:
        outputs = []
        for t in range(5):
            replies = await gateway.step("charlm", {sid: x[(t + i) % FEATURES][None] for i, sid in enumerate(group)})
            assert all(isinstance(r, StepReply) and r.seq == t + 1 for r in replies.values()), replies
            outputs += [reply.outputs["logits"] for reply in replies.values()]
        return outputs

    async with BatchClient(target, streams=4) as spread:
        many = await asyncio.gather(*(drive(spread, group) for group in groups))
        assert spread.attempts == 4  # every stream carried calls
    async with BatchClient(target, streams=1) as single:
        one = await asyncio.gather(*(drive(single, [f"one-{sid}" for sid in group]) for group in groups))
        assert single.attempts == 1
    for spread_outputs, single_outputs in zip(many, one, strict=True):
        for a, b in zip(spread_outputs, single_outputs, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_stream_balance_skips_the_streams_being_moved_unless_all_are():
    balance = StreamBalance(3)
    assert balance.pick() == 0
    assert balance.pick({0}) == 1
    assert balance.pick({0, 1}) == 2
    assert balance.pick({0, 1, 2}) == 0


def test_spread_keeps_each_stream_on_a_process_of_its_own_then_balances():
    """Four streams, two server processes, connections landing as the kernel draws them: a stream is
    opened again while it lands where another is, until `tries` landings in a row found no free process;
    then it stays where fewest are."""
    spread = Spread(tries=3)
    draws = iter(["a", "a", "a", "b", "b", "a", "b", "b", "a"])

    def place(stream: str) -> int:
        attempts = 1
        while not spread.keep(stream, next(draws)):
            attempts += 1
        return attempts

    assert place("s1") == 1  # a
    assert place("s2") == 3  # a, a refused; b kept
    assert place("s3") == 3  # b, a: refused (no free process yet); b: the third in a row, a balanced one
    assert place("s4") == 2  # b refused (it holds more), a kept: every process seen, and a holds fewest
    assert sorted(spread.workers()) == ["a", "a", "b", "b"]
    spread.leave("s2")
    assert spread.keep("s2", "b")  # where fewest are
    assert spread.keep("s5", None)  # a server that does not say: kept, not counted
    assert sorted(spread.workers()) == ["a", "a", "b", "b"]


def test_spread_gives_up_on_a_single_process_and_caps_its_tries():
    spread = Spread(tries=2)
    assert spread.keep("s1", "only")
    assert not spread.keep("s2", "only")
    assert spread.keep("s2", "only")  # two in a row found nothing else: it is all there is
    assert spread.keep("s3", "only")
    lopsided = Spread(tries=2)
    assert lopsided.keep("s1", "a") and lopsided.keep("s2", "b")
    assert not lopsided.keep("s3", "a")
    assert lopsided.keep("s3", "a")  # a and b hold one each: balanced
    refusals = 0
    while not lopsided.keep("s4", "a"):  # a holds 2, b 1: refused, up to 4 × tries, then kept
        refusals += 1
    assert refusals == 4 * 2


def test_spread_looks_again_once_a_process_without_a_stream_turns_up():
    """After a restart every process is new: the belief that none is free (from before) must not keep a
    stream on one that already has one."""
    spread = Spread(tries=2)
    for stream, draws in (("s1", ["a"]), ("s2", ["a", "b"]), ("s3", ["a", "b"]), ("s4", ["a"])):
        while not spread.keep(stream, draws.pop(0)):
            pass
    assert sorted(spread.workers()) == ["a", "a", "b", "b"]
    for stream in ("s1", "s2", "s3", "s4"):
        spread.leave(stream)
    assert spread.keep("s1", "c")
    assert not spread.keep("s2", "c")  # d may be there: look again
    assert spread.keep("s2", "d")


def test_spread_moves_a_stream_only_where_that_evens_them_out():
    """A worker back after a crash: its streams had gone to the others. A stream of the process holding
    most moves to a process a probe found, if that one holds at least two fewer; its placement then looks
    for the room again before settling."""
    spread = Spread(tries=2)
    for stream in ("s1", "s2", "s3", "s4"):
        assert spread.keep(stream, "a") or spread.keep(stream, "a") or spread.keep(stream, "a")
    assert spread.crowded() and sorted(spread.workers()) == ["a"] * 4
    assert sorted(spread.to_move("b")) == ["s1", "s2", "s3", "s4"]
    spread.leave("s4")
    assert not spread.keep("s4", "a")  # b has room: look again
    assert spread.keep("s4", "b")
    assert sorted(spread.to_move("b")) == ["s1", "s2", "s3"]  # 3 against 1
    spread.leave("s3")
    assert spread.keep("s3", "b") or spread.keep("s3", "b") or spread.keep("s3", "b")
    assert spread.to_move("b") == [] and spread.to_move("a") == [] and spread.to_move("c") == ["s1", "s2"]


async def test_a_step_cancelled_while_its_message_is_written_does_not_stop_the_stream(start_server):
    """gRPC cancels a call whose write is cancelled (a caller's timeout): the stream's reader must take
    that for a broken stream and open another, not end, or every later step on it waits for ever."""
    app = await start_server()
    x = np.eye(FEATURES, dtype=np.float32)
    async with BatchClient(f"127.0.0.1:{app.port}", streams=1, reconnect_timeout_s=3) as gateway:
        await gateway.step("charlm", {"a": x[:1]})
        stream = gateway._streams[0]
        doomed = asyncio.create_task(gateway.step("charlm", {"b": x[:1]}))
        while not stream._pending:  # inside the write
            await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        assert stream.in_flight == 0  # the given-up message is not resent on every stream from now on
        replies = await asyncio.wait_for(gateway.step("charlm", {"c": x[:1]}), 10)
        assert isinstance(replies["c"], StepReply) and replies["c"].seq == 1


async def test_the_gateways_stub_outlives_its_streams_connections(start_server):
    """`stub` (GetSession on resume, say) is on a connection of its own: streams replace theirs as they
    are placed, and a stub kept from before must still work."""
    app = await start_server()
    x = np.eye(FEATURES, dtype=np.float32)
    async with BatchClient(f"127.0.0.1:{app.port}", streams=2) as gateway:
        stub = gateway.stub
        await gateway.step("charlm", {"kept": x[:1]})
        for stream in gateway._streams:
            await stream._reopen()  # as a stream placed again does
        await gateway.step("charlm", {"kept": x[1:2]})
        info = await stub.GetSession(pb.SessionRef(model="charlm", session_id="kept"))
        assert gateway.stub is stub and info.last_seq == 2


async def test_a_gateways_streams_spread_over_a_servers_workers(redis_store_url, tmp_path):
    """Four streams to a server of two worker processes: two on each, whatever the kernel drew, and every
    step answered as on one stream."""
    from collections import Counter

    from bench.process import ServerProcess, free_port
    from tests.conftest import TEST_REPO

    server = ServerProcess.rnnserve(free_port(), TEST_REPO, redis_store_url, "--workers", "2", log=tmp_path / "log")
    server.start()  # SERVING once both workers are up
    x = np.eye(FEATURES, dtype=np.float32)
    try:
        for round_ in range(3):
            async with BatchClient(f"127.0.0.1:{server.port}", streams=4) as gateway:
                groups = [[f"w{round_}-{g}-{i}" for i in range(8)] for g in range(12)]
                for t in range(3):
                    replies = await asyncio.gather(
                        *(gateway.step("charlm", {sid: x[t][None] for sid in group}) for group in groups)
                    )
                    assert all(isinstance(r, StepReply) and r.seq == t + 1 for rs in replies for r in rs.values())
                assert gateway.attempts == 4
                assert sorted(Counter(gateway.workers).values()) == [2, 2], gateway.workers
    finally:
        server.stop()


async def test_a_gateways_streams_spread_again_once_a_crashed_worker_is_back(redis_store_url, tmp_path):
    """A worker that crashes takes its streams' connections with it: they reconnect to the other worker,
    the only one listening, and four streams sit 4:0. Once the parent has the worker back, the gateway
    finds it (a probe connection now and then) and moves streams over, each once the calls on it are
    answered (no new call goes on it meanwhile): 2:2 again, though twelve callers never pause, and every
    step answered in order throughout."""
    from collections import Counter

    from bench.process import ServerProcess, free_port
    from tests.conftest import TEST_REPO
    from tests.service.test_workers import children

    server = ServerProcess.rnnserve(free_port(), TEST_REPO, redis_store_url, "--workers", "2", log=tmp_path / "log")
    server.start()  # SERVING once both workers are up
    assert server.process is not None
    x = np.eye(FEATURES, dtype=np.float32)
    stop = asyncio.Event()
    try:
        async with BatchClient(f"127.0.0.1:{server.port}", streams=4, rebalance_s=0.2) as gateway:

            async def caller(g: int) -> int:
                sessions = [f"c{g}-{i}" for i in range(8)]
                t = 0
                while not stop.is_set() or t == 0:
                    replies = await gateway.step("charlm", {sid: x[t % FEATURES][None] for sid in sessions})
                    assert all(isinstance(r, StepReply) and r.seq == t + 1 for r in replies.values()), replies
                    t += 1
                return t

            callers = [asyncio.create_task(caller(g)) for g in range(12)]
            deadline = time.monotonic() + 90  # a worker restarting on a busy machine takes its time
            while sorted(Counter(gateway.workers).values()) != [2, 2]:
                assert time.monotonic() < deadline, f"not 2:2 before the crash: {gateway.workers}"
                await asyncio.sleep(0.05)
            victim = children(server.process.pid)[0]
            os.kill(victim, signal.SIGKILL)
            while victim in {int(w.rpartition("/")[2]) for w in gateway.workers}:
                assert time.monotonic() < deadline, f"streams still on the dead worker: {gateway.workers}"
                await asyncio.sleep(0.05)
            while sorted(Counter(gateway.workers).values()) != [2, 2]:
                assert time.monotonic() < deadline, f"still {gateway.workers} ({gateway.moves} moved)"
                await asyncio.sleep(0.05)
            assert gateway.moves >= 1
            stop.set()
            steps = await asyncio.wait_for(asyncio.gather(*callers), 30)
            assert min(steps) > 1
    finally:
        stop.set()
        server.stop()


async def test_a_call_cancelled_while_it_waits_for_a_session_holds_no_other(start_server):
    """A gateway call cancelled while it waits for one of its sessions (another call of it in flight)
    gives back the sessions it had taken: their next steps go through."""
    app = await start_server()
    x = np.eye(FEATURES, dtype=np.float32)
    async with BatchClient(f"127.0.0.1:{app.port}") as gateway:
        await gateway.step("charlm", {"a": x[[1]], "b": x[[1]]})
        states = {sid: gateway._sessions["charlm", sid] for sid in "ab"}
        first, second = sorted(states, key=lambda sid: id(states[sid]))  # the order a call takes them in
        await states[second].order.acquire()  # another call of `second` in flight
        both = asyncio.create_task(gateway.step("charlm", {"a": x[[2]], "b": x[[2]]}))
        await asyncio.sleep(0.1)  # it holds `first` and waits for `second`
        both.cancel()
        await asyncio.gather(both, return_exceptions=True)
        states[second].order.release()
        replies = await asyncio.wait_for(gateway.step("charlm", {first: x[[3]]}), 10)
        assert isinstance(replies[first], StepReply) and replies[first].seq == 2


async def test_a_stream_client_keeps_to_a_smaller_server_message_limit(start_server):
    """A server started with max_message_bytes below its client's: the step past it fails at once with a
    ValueError naming the server's limit (not resent, breaking the stream under the other sessions, until
    the reconnect timeout), the other sessions go on, and the session steps on with shorter chunks."""
    app = await start_server(max_message_bytes=50_000)
    eye = np.eye(FEATURES, dtype=np.float32)
    async with StreamClient(f"127.0.0.1:{app.port}", reconnect_timeout_s=20) as client:
        long, other = client.session("charlm", "long"), client.session("charlm", "other")
        first = await long.step(eye[[1]])
        outcomes = await asyncio.wait_for(
            asyncio.gather(long.step(np.tile(eye[[2]], (300, 1))), other.step(eye[[3]]), return_exceptions=True), 10
        )
        assert isinstance(outcomes[0], ValueError) and "50000-byte limit of the server" in str(outcomes[0])
        assert isinstance(outcomes[1], StepReply) and outcomes[1].seq == 1
        assert first.seq == 1 and long.acked_seq == 1
        with pytest.raises(ValueError, match="50000-byte limit"):  # refused before it is sent, from now on
            await long.step(np.tile(eye[[2]], (300, 1)))
        assert (await long.step(np.tile(eye[[2]], (30, 1)))).seq == 2


async def test_a_client_keeps_to_the_limit_of_the_server_it_reaches(start_server, redis_store_url, tmp_path):
    """Two replicas on one Redis behind one target, A taking 4 MiB messages and B 50 KB. A long step written
    to A, which dies before answering, fails on reaching B as one that may have been applied (not as one
    never sent, whose advice, shorter chunks, would be wrong for it); on B a long step is refused before it
    is sent, and a short one goes on; back on A, long steps are taken again."""
    from bench.process import ServerProcess, free_port
    from tests.conftest import TEST_REPO

    eye = np.eye(FEATURES, dtype=np.float32)
    long = np.tile(eye[[2]], (300, 1))
    b = await start_server(url=redis_store_url, max_message_bytes=50_000)
    a = ServerProcess.rnnserve(free_port(), TEST_REPO, redis_store_url, "--workers", "1", log=tmp_path / "a.log")
    a.start()
    try:
        async with StreamClient(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", reconnect_timeout_s=30) as client:
            session = client.session("charlm", "m")
            assert (await session.step(eye[[1]])).seq == 1  # on A, the first address
            assert a.process is not None
            os.kill(a.process.pid, signal.SIGSTOP)  # A takes the long step's bytes and never answers
            lost = asyncio.create_task(session.step(long))
            await asyncio.sleep(0.5)
            a.kill()
            with pytest.raises(ConnectionError, match="may or may not have been applied"):
                await asyncio.wait_for(lost, 20)
            with pytest.raises(ValueError, match="50000-byte limit of the server"):
                await session.step(long)  # on B: refused before it is sent
            assert (await session.step(eye[[3]])).seq == 2
            a.start()
            await b.stop(grace_s=0.5)  # the client goes back to A
            assert (await asyncio.wait_for(session.step(long), 20)).seq == 3
    finally:
        a.kill()


def test_a_limit_no_rnnserve_server_has_is_not_taken_from_headers():
    from service.client import _header_limit

    name = "rnnserve-max-message-bytes"
    assert _header_limit({name: "200000"}, name, 1024) == 200_000
    for bogus in ("0", "1", "00100", "-1", "abc", "²", ""):
        assert _header_limit({name: bogus}, name, 1024) is None, bogus
    assert _header_limit({}, name, 1024) is None


async def test_two_sessions_objects_stepping_one_session_at_once_do_not_hang(start_server):
    """Two Session objects for one session id on one client send the same seq at once: their answers would
    pair with one request only, and the other would wait for ever. The second is refused at once."""
    app = await start_server()
    eye = np.eye(FEATURES, dtype=np.float32)
    async with StreamClient(f"127.0.0.1:{app.port}") as client:
        one, other = client.session("charlm", "twice"), client.session("charlm", "twice")
        outcomes = await asyncio.wait_for(
            asyncio.gather(one.step(eye[[1]]), other.step(eye[[1]]), return_exceptions=True), 10
        )
        assert sum(isinstance(o, StepReply) for o in outcomes) == 1
        refused = next(o for o in outcomes if not isinstance(o, StepReply))
        assert isinstance(refused, ValueError) and "already waiting" in str(refused)
        assert client.in_flight == 0


def _answer(**tensor: object) -> pb.StepResponse:
    response = pb.StepResponse(session_id="s", seq=3, version=1)
    response.outputs["y"].CopyFrom(pb.Tensor(**tensor))  # type: ignore[arg-type]
    return response


@pytest.mark.parametrize(
    "tensor",
    [
        {"shape": [1, 2], "raw": np.ones(2, np.float32).tobytes(), "data": [1.0, 2.0]},  # both filled
        {"shape": [-1, -2], "raw": np.ones(2, np.float32).tobytes()},
        {"shape": [1, 3], "raw": np.ones(2, np.float32).tobytes()},  # too few bytes for the shape
    ],
)
def test_an_answer_whose_outputs_do_not_parse_is_refused_not_misread(tensor):
    with pytest.raises(InvalidArgument):
        _reply(_answer(**tensor), 0.0)


@pytest.mark.parametrize(
    "tensor", [{"shape": [2, 2], "raw": np.arange(4, dtype="<f4").tobytes()}, {"shape": [2, 2], "data": [0, 1, 2, 3]}]
)
def test_an_answer_is_read_from_raw_or_data(tensor):
    reply = _reply(_answer(**tensor), 0.25)
    assert isinstance(reply, StepReply) and (reply.session_id, reply.seq, reply.version) == ("s", 3, 1)
    np.testing.assert_array_equal(reply.outputs["y"], np.arange(4, dtype=np.float32).reshape(2, 2))
    assert reply.latency_s == 0.25


@pytest.mark.parametrize("tensor", [{"raw": np.float32(7.5).tobytes()}, {"data": [7.5]}])
def test_an_output_of_one_value_a_session_is_read_as_a_0_d_array(tensor):
    """A model may answer one value a session (an output shaped [batch]): its tensor has no shape, and the
    client reads it rather than failing the whole call."""
    reply = _reply(_answer(**tensor), 0.0)
    assert isinstance(reply, StepReply)
    assert reply.outputs["y"].shape == () and reply.outputs["y"] == np.float32(7.5)
