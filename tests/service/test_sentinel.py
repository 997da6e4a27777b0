"""Redis Sentinel: the service follows a failover by itself, and with `redis.wait_replicas` no
acknowledged step is lost when the primary dies.

A primary, two replicas and three sentinels run on loopback (real redis-server processes): with
`wait_replicas: 1` a step is acknowledged once one replica holds it, so the promoted replica (the one
furthest ahead) holds every acknowledged step, and the other replica lets commits be acknowledged again
after the failover (with one replica alone, nothing would be acknowledged until a replica returned). 50 sessions
stream through one rnnserve server whose store URL names only the sentinels; the primary is SIGKILLed
mid-run. Every step a session had acknowledged must still be there on the promoted replica: each
session's outputs equal its offline run, step for step, and its stored seq is its last step.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from bench.process import RedisProcess, free_port
from service.client import StepError, StreamClient
from service.errors import StoreRefused, Unavailable
from service.server import open_store
from service.settings import RedisSettings, parse_sentinel_url
from service.state.record import decode
from service.state.store import Commit, Outcome, session_key
from tests.conftest import TEST_REPO, exchange, held_out_text, offline_logits, one_hot_text, vocabulary
from tests.service.stored import stored_record
from tests.service.test_session_contract import TOLERANCE, assert_error, assert_matches, last_seq, steps

MASTER = "rnnserve-primary"
SESSIONS, STEPS, KILL_AFTER = 50, 16, 5


class SentinelGroup:
    """A primary, two replicas of it and three sentinels watching it, each a redis-server of its own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.primary = RedisProcess(directory)
        self.replicas = [RedisProcess(replica_of=self.primary.port) for _ in range(2)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{MASTER}"

    def start(self) -> None:
        self.primary.start()
        for replica in self.replicas:
            replica.start()  # returns once it has synced
        for i, port in enumerate(self.sentinel_ports):
            config = self.directory / f"sentinel-{i}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 500\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
                f"logfile {self.directory / f'sentinel-{i}.log'}\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    ["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        # Failover needs sentinels that know each other and the replicas.
        self._until(lambda: all(self._sentinel_sees(port) for port in self.sentinel_ports), "the sentinels to meet")

    def _sentinel_sees(self, port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as client:
                return (
                    len(client.execute_command("SENTINEL", "REPLICAS", MASTER)) == 2
                    and len(client.execute_command("SENTINEL", "SENTINELS", MASTER)) == 2
                )
        except redis.RedisError:
            return False

    def _until(self, condition, what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:g}s for {what}")
            time.sleep(0.05)

    def kill_primary(self) -> None:
        """SIGKILL: no shutdown, no last sync to the replicas."""
        assert self.primary.process is not None
        self.primary.process.kill()
        self.primary.process.wait(10)
        self.primary.process = None

    def primary_port(self) -> int:
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=1) as client:
            host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        return int(port)

    def logs(self) -> str:
        """The sentinels' logs, for a failover that did not happen."""
        return "\n".join(path.read_text()[-3000:] for path in sorted(self.directory.glob("sentinel-*.log")))

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                sentinel.wait(10)
        for server in (*self.replicas, self.primary):
            server.close()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path)
    try:
        group.start()
        yield group
    finally:
        group.close()


def test_the_sentinel_url_names_sentinels_master_db_and_credentials():
    address = parse_sentinel_url("redis+sentinel://u:p%40ss@h1:26379,[::1]:26380/my%20master/3")
    assert address.sentinels == [("h1", 26379), ("::1", 26380)]
    assert (address.master, address.db, address.username, address.password) == ("my master", 3, "u", "p@ss")
    assert parse_sentinel_url("redis+sentinel://h:1/m").db == 0
    for bad in ("redis+sentinel://h/m", "redis+sentinel://h:1", "redis+sentinel://h:1/m/x", "redis+sentinel://:1/m"):
        with pytest.raises(ValueError, match="redis\\+sentinel://") as refused:
            parse_sentinel_url(bad.replace("h:", "secret@h:"))
        assert "secret" not in str(refused.value)


async def test_a_killed_primary_loses_no_acknowledged_step(sentinels, start_server):  # the server stops first
    app = await start_server(
        url=sentinels.url,
        redis={"wait_replicas": 1, "wait_timeout_ms": 500, "socket_timeout_s": 1.0, "connect_timeout_s": 0.5},
    )
    text = held_out_text()
    xs = {f"s{i}": one_hot_text(text[i * 20 : i * 20 + STEPS], vocabulary()) for i in range(SESSIONS)}
    got: dict[str, list[np.ndarray]] = {sid: [] for sid in xs}
    underway = asyncio.Event()
    killed_at: list[float] = []
    recovered_at: list[float] = []
    retried: list[str] = []

    async def stream(client: StreamClient, sid: str) -> None:
        session = client.session("charlm", sid)
        for t in range(STEPS):
            while True:
                try:
                    reply = await session.step(xs[sid][t : t + 1])
                    break
                except StepError as err:  # a failover under way: the same step again (a replay if it landed)
                    assert err.code is grpc.StatusCode.UNAVAILABLE, err
                    retried.append(err.message)
                    await asyncio.sleep(0.1)
            if retried and killed_at and not recovered_at:
                recovered_at.append(time.monotonic())
            got[sid].append(reply.outputs["logits"][0])
            if t == KILL_AFTER:
                underway.set()

    async with StreamClient(f"127.0.0.1:{app.port}") as client:
        streams = asyncio.gather(*(stream(client, sid) for sid in xs))
        await underway.wait()
        old_primary = sentinels.primary.port
        sentinels.kill_primary()
        killed_at.append(time.monotonic())
        try:
            await asyncio.wait_for(streams, 90)
        except TimeoutError:
            pytest.fail(f"the sessions did not finish within 90 s of the kill; the sentinels said:\n{sentinels.logs()}")

    await asyncio.wait_for(app.stop(grace_s=0.5), 20)  # no retry loop outlives a stop after a failover
    assert retried, "the kill fell between steps: nothing was tested"
    assert sentinels.primary_port() != old_primary  # the replica was promoted, and the service followed it
    with redis.Redis(port=sentinels.primary_port()) as store:
        for sid, x in xs.items():
            expected = offline_logits(TEST_REPO / "charlm" / "1", x)
            np.testing.assert_allclose(np.stack(got[sid]), expected, atol=TOLERANCE)
            blob = stored_record(store, session_key("rnnserve", "charlm", sid))
            assert blob is not None, sid
            record = decode(blob)
            assert record.seq == STEPS
    print(f"failover: first step answered {recovered_at[0] - killed_at[0]:.2f}s after the kill; {len(retried)} retries")


async def test_with_wait_replicas_a_step_no_replica_holds_is_never_acknowledged(start_server, tmp_path):
    """No replica: the step is written on the primary, answered UNAVAILABLE, and so is every resend (its
    replay too: the record is not replicated). Once a replica has synced, the resend is acknowledged."""
    (tmp_path / "primary").mkdir()
    primary = RedisProcess(tmp_path / "primary")
    primary.start()
    replica = RedisProcess(replica_of=primary.port)
    try:
        app = await start_server(url=primary.url, redis={"wait_replicas": 1, "wait_timeout_ms": 50})
        target = f"127.0.0.1:{app.port}"
        start = steps("w", 1, 1)
        start[0].start_id = 7  # so that its resend is a resend, not a new start
        for _ in range(2):
            (answer,) = await exchange(target, start)
            assert_error(answer, grpc.StatusCode.UNAVAILABLE, "0 of 1 replicas confirmed", "resend")
        assert await last_seq(target, "w") == 1  # written on the primary all the same
        replica.start()
        for _ in range(200):
            (answer,) = await exchange(target, start)
            if not answer.HasField("error"):
                break
            await asyncio.sleep(0.05)
        assert answer.replayed
        assert_matches([answer], first=1)
        assert_matches(await exchange(target, steps("w", 2, 3)), first=2)  # acknowledged on the replica's word
    finally:
        replica.close()
        primary.close()


@contextlib.contextmanager
def primary_with_replica(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    """A primary and a replica that has synced with it."""
    (tmp_path / "p").mkdir()
    primary = RedisProcess(tmp_path / "p")
    replica = RedisProcess(replica_of=primary.port)
    try:
        primary.start()
        replica.start()
        yield primary, replica
    finally:
        replica.close()
        primary.close()


async def test_a_replay_is_confirmed_only_where_its_record_is_and_the_probe_was_written(tmp_path):
    with primary_with_replica(tmp_path) as (primary, _):
        store = open_store(RedisSettings(url=primary.url, wait_replicas=1, wait_timeout_ms=200))
        try:
            (applied,) = await store.commit_many([Commit("k", None, "e:1", b"rec", 60)])
            assert applied.outcome is Outcome.OK
            await store.confirm_replicated([("k", "e:1")])  # there, and replicated
            # Another primary (after a failover) without the record: not confirmed, whatever WAIT says.
            with pytest.raises(Unavailable, match="moved on, or this store does not hold it"):
                await store.confirm_replicated([("k", "e:1"), ("gone", "e:1")])
            with pytest.raises(Unavailable, match="moved on"):
                await store.confirm_replicated([("k", "e:2")])
            # The probe write refused (out of memory): WAIT would prove nothing.
            with redis.Redis(port=primary.port) as client:
                client.config_set("maxmemory-policy", "noeviction")
                client.config_set("maxmemory", 1)
                with pytest.raises(Unavailable, match="could not confirm a stored step .command not allowed"):
                    await store.confirm_replicated([("k", "e:1")])
                client.config_set("maxmemory", 0)
        finally:
            await store.close()


async def test_a_wait_an_acl_refuses_stops_the_start_and_leaves_commits_unconfirmed(tmp_path):
    with primary_with_replica(tmp_path) as (primary, _):
        with redis.Redis(port=primary.port) as client:
            client.execute_command("ACL", "SETUSER", "nowait", "on", ">pw", "~*", "+@all", "-wait")
        url = f"redis://nowait:pw@127.0.0.1:{primary.port}/0"
        store = open_store(RedisSettings(url=url, wait_replicas=1, wait_timeout_ms=200))
        try:
            with pytest.raises(StoreRefused, match="WAIT"):
                await store.ping()
            (commit,) = await store.commit_many([Commit("k", None, "e:1", b"rec", 60)])
            assert commit.outcome is Outcome.UNKNOWN and "WAIT refused" in (commit.current or "")
        finally:
            await store.close()


def test_a_wait_longer_than_the_round_trip_is_refused():
    with pytest.raises(ValueError, match="wait_timeout_ms must be shorter"):
        RedisSettings(url="redis://h:1/0", wait_replicas=1, wait_timeout_ms=3000, socket_timeout_s=2)


class FakeSentinel:
    """Answers every connection with `reply` (raw bytes), then closes it."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.asked = 0

    async def start(self) -> int:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.asked += 1
            await reader.read(1000)
            writer.write(self.reply)
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(answer, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def bulk_address(port: int) -> bytes:
    return b"*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%d\r\n" % (len(str(port)), port)


async def test_sentinels_are_asked_in_turn_until_one_names_a_reachable_primary(tmp_path):
    with primary_with_replica(tmp_path) as (primary, replica):
        torn = FakeSentinel(b"*2\r\n$9\r\n127.0")  # closes mid-reply
        stale = FakeSentinel(bulk_address(replica.port))  # names the replica
        good = FakeSentinel(bulk_address(primary.port))
        ports = [await s.start() for s in (torn, stale, good)]
        url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/mymaster"
        store = open_store(RedisSettings(url=url))
        try:
            await store.ping()
            (applied,) = await store.commit_many([Commit("k", None, "e:1", b"rec", 60)])
            assert applied.outcome is Outcome.OK
            assert [s.asked for s in (torn, stale, good)] == [1, 1, 1]
        finally:
            await store.close()
            for fake in (torn, stale, good):
                await fake.close()


async def test_sentinels_that_know_no_such_primary_stop_the_start():
    unknown, wants_password = FakeSentinel(b"*-1\r\n"), FakeSentinel(b"-NOAUTH Authentication required.\r\n")
    ports = [await unknown.start(), await wants_password.start()]
    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/mymaster"
    store = open_store(RedisSettings(url=url))
    try:
        with pytest.raises(StoreRefused, match="no sentinel knows a primary named 'mymaster'") as refused:
            await store.ping()
        assert "NOAUTH" in str(refused.value)
    finally:
        await store.close()
        await unknown.close()
        await wants_password.close()
    down = FakeSentinel(b"")  # answers nothing: an outage, not a setting
    url = f"redis+sentinel://127.0.0.1:{await down.start()},127.0.0.1:{free_port()}/mymaster"
    store = open_store(RedisSettings(url=url))
    try:
        with pytest.raises(Unavailable, match="no sentinel named a reachable primary"):
            await store.ping()
    finally:
        await store.close()
        await down.close()
