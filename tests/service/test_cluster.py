"""Redis Cluster: sessions sharded over three primaries (each with a replica), real redis-server processes
made into a cluster by `redis-cli --cluster create`. 1,000 sessions stream through rnnserve while a
primary is SIGKILLed (its replica takes over) or while slots migrate between primaries; every session
must end exactly as its offline run, step for step, and its stored seq must be its last step."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import redis
from redis.crc import key_slot

from bench.process import RedisCluster, free_port
from service.client import BatchClient, StepReply
from service.errors import StoreRefused, Unavailable
from service.server import open_store
from service.settings import RedisSettings, Settings, parse_cluster_url
from service.state.record import decode
from service.state.store import ABSENT, Commit, Outcome, session_key
from tests.conftest import TEST_REPO, offline_logits, redis_certificates, vocabulary
from tests.service.stored import stored_record
from tests.service.test_session_contract import TOLERANCE

SESSIONS, STEPS, GROUP = 1000, 10, 250
FEATURES = len(vocabulary())


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    group = RedisCluster(primaries=3, replicas=1, node_timeout_ms=1000)
    group.start()
    yield group
    group.close()


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    eye = np.eye(FEATURES, dtype=np.float32)
    return {f"c{i}": eye[rng.integers(0, FEATURES, STEPS)] for i in range(SESSIONS)}


async def stream_all(
    target: str, xs: dict[str, np.ndarray], at_step: int, fault: Callable[[], object]
) -> tuple[dict[str, list[np.ndarray]], list[str], float]:
    """Every session's STEPS steps, GROUP sessions a StepBatch, four gateways' worth of batches at once;
    `fault` runs (in a thread) once the first group has taken `at_step` steps. A refused step is sent
    again. Returns the outputs, the refusals, and the seconds from the fault to the last refusal."""
    got: dict[str, list[np.ndarray]] = {sid: [] for sid in xs}
    refused: list[str] = []
    last_refusal = [0.0]
    faulted = asyncio.Event()
    started = [0.0]
    faults: list[asyncio.Task[object]] = []

    async def group(gateway: BatchClient, sids: list[str], first: bool) -> None:
        for t in range(STEPS):
            pending = list(sids)
            while pending:
                replies = await gateway.step("charlm", {sid: xs[sid][t : t + 1] for sid in pending})
                pending = []
                for sid, reply in replies.items():
                    if isinstance(reply, StepReply):
                        got[sid].append(reply.outputs["logits"][0])
                        continue
                    assert reply.code is grpc.StatusCode.UNAVAILABLE, (sid, t, reply)
                    refused.append(reply.message)
                    last_refusal[0] = time.monotonic()
                    pending.append(sid)
                if pending:
                    await asyncio.sleep(0.1)
            if first and t == at_step:
                started[0] = time.monotonic()
                faults.append(asyncio.create_task(asyncio.to_thread(fault)))
                faulted.set()
            elif not first and t == at_step:
                await faulted.wait()  # every group is mid-stream when the fault starts

    sids = list(xs)
    async with BatchClient(target, reconnect_timeout_s=60) as gateway:
        await asyncio.wait_for(
            asyncio.gather(*(group(gateway, sids[i : i + GROUP], i == 0) for i in range(0, len(sids), GROUP))), 180
        )
    await asyncio.gather(*faults)
    return got, refused, max(0.0, last_refusal[0] - started[0])


def check_every_session(cluster: RedisCluster, xs: dict[str, np.ndarray], got: dict[str, list[np.ndarray]]) -> None:
    """Outputs equal to the offline run, step for step; the stored record at the last step."""
    nodes = {node.port: redis.Redis(port=node.port) for node in cluster.alive()}
    try:
        for sid, x in xs.items():
            np.testing.assert_allclose(
                np.stack(got[sid]), offline_logits(TEST_REPO / "charlm" / "1", x), atol=TOLERANCE
            )
            key = session_key("rnnserve", "charlm", sid)
            blob = stored_record(nodes[cluster.primary_of(key).port], key)
            assert blob is not None and decode(blob).seq == STEPS, sid
    finally:
        for client in nodes.values():
            client.close()


async def test_the_store_contract_holds_on_a_cluster(cluster):
    store = open_store(RedisSettings(url=cluster.url))
    await store.ping()
    try:
        keys = [session_key("rnnserve", "charlm", f"k{i}") for i in range(600)]  # more than one script call a node
        assert {r.outcome for r in await store.commit_many([Commit(k, ABSENT, "e:1", b"one", 60) for k in keys])} == {
            Outcome.OK
        }
        late = await store.commit_many([Commit(keys[0], ABSENT, "f:1", b"late", 60)])
        assert late[0].outcome is Outcome.CONFLICT and late[0].current == "e:1"
        mixed = await store.commit_many(
            [Commit(keys[1], "e:1", "e:2", b"two", 60), Commit(keys[2], "x:9", "e:2", b"no", 60)]
            + [Commit("rnnserve:s:{charlm/none}", "e:1", "e:2", b"no", 60)]
        )
        assert [r.outcome for r in mixed] == [Outcome.OK, Outcome.CONFLICT, Outcome.MISSING]
        loaded = await store.load_many(keys[:3])
        assert [s.record for s in loaded] == [b"one", b"two", b"one"]  # type: ignore[union-attr]
        assert 0 < await store.ttl_ms(keys[0]) <= 60_000
        assert await store.delete(keys[0]) and await store.ttl_ms(keys[0]) is None
        per_node = [redis.Redis(port=node.port).dbsize() for node in cluster.nodes]
        assert sum(1 for n in per_node if n > 150) >= 3  # spread over every primary (and its replica)
    finally:
        await store.close()


async def test_a_half_migrated_slot_is_served_through_asking(cluster):
    """A slot left MIGRATING/IMPORTING (a resharding stopped half way) with the session's key already moved:
    the source answers ASK, and the store asks the importing node, for loads, commits and new sessions."""
    store = open_store(RedisSettings(url=cluster.url))
    await store.ping()
    try:
        key = session_key("rnnserve", "charlm", "a")
        assert (await store.commit_many([Commit(key, ABSENT, "e:1", b"one", 60)]))[0].outcome is Outcome.OK
        source = cluster.primary_of(key)
        target = next(node for node in cluster.primaries() if node is not source)
        slot = key_slot(key.encode())
        cluster.move_slot(slot, target, finish=False)
        (loaded,) = await store.load_many([key])
        assert loaded is not None and loaded.record == b"one"  # type: ignore[union-attr]
        assert (await store.commit_many([Commit(key, "e:1", "e:2", b"two", 60)]))[0].outcome is Outcome.OK
        other = next(
            session_key("rnnserve", "charlm", f"b{i}")
            for i in range(100_000)
            if key_slot(session_key("rnnserve", "charlm", f"b{i}").encode()) == slot
        )
        assert (await store.commit_many([Commit(other, ABSENT, "e:1", b"new", 60)]))[0].outcome is Outcome.OK
        with redis.Redis(port=target.port) as client:
            client.execute_command("ASKING")
            assert client.hget(key, "rec") == b"two"  # Redis Cluster keeps the hash layout
    finally:
        await store.close()


async def test_a_slot_map_marked_stale_while_it_is_read_is_still_whole(cluster):
    """The URL names a replica first, so every read of the slot map opens a pool on it and closes it again
    (it serves no slot), which awaits. Other batches meeting MOVED mark the map stale meanwhile, here on
    every turn of the loop: each call must still get a whole map (it once got None: INTERNAL, and a dead
    readiness probe)."""
    replica = next(node for node in cluster.nodes if node not in cluster.primaries())
    store = open_store(RedisSettings(url=f"redis+cluster://127.0.0.1:{replica.port},127.0.0.1:{cluster.nodes[0].port}"))
    running = True

    async def moved_elsewhere() -> None:
        while running:
            store._stale()  # what a concurrent batch answered MOVED does
            await asyncio.sleep(0)

    marking = asyncio.create_task(moved_elsewhere())
    try:
        keys = [session_key("rnnserve", "charlm", f"m{i}") for i in range(20)]
        for _ in range(30):
            await store.ping()
            assert await store.load_many(keys) == [None] * len(keys)
    finally:
        running = False
        await marking
        await store.close()


async def test_a_replay_is_confirmed_after_the_probe_keys_slot_moved(cluster):
    """With WAIT, a replay is confirmed by a write to a probe key on the session's node. When a resharding
    takes the probe's slot away, the store picks another probe key instead of failing every replay."""
    store = open_store(RedisSettings(url=cluster.url, wait_replicas=1, wait_timeout_ms=1000))
    await store.ping()
    try:
        key = session_key("rnnserve", "charlm", "s1")
        assert (await store.commit_many([Commit(key, ABSENT, "e:1", b"x", 60)]))[0].outcome is Outcome.OK
        await store.confirm_replicated([(key, "e:1")])
        home = cluster.primary_of(key)
        probe = next(f"rnnserve:replication-probe:{{{n}}}" for n in range(100_000)
                     if cluster.primary_of(f"rnnserve:replication-probe:{{{n}}}") is home)  # fmt: skip
        elsewhere = next(node for node in cluster.primaries() if node is not home)
        cluster.move_slot(key_slot(probe.encode()), elsewhere)
        for _ in range(3):
            await store.confirm_replicated([(key, "e:1")])
    finally:
        await store.close()


async def test_wrong_credentials_stop_the_start_and_demoted_nodes_lose_their_pools(cluster):
    store = open_store(RedisSettings(url=cluster.url))
    await store.ping()
    try:
        await store.load_many([session_key("rnnserve", "charlm", f"p{i}") for i in range(30)])
        victim = cluster.primary_of(session_key("rnnserve", "charlm", "p0"))
        (replica,) = cluster.replicas_of(victim)
        with redis.Redis(port=replica.port) as client:
            client.execute_command("CLUSTER", "FAILOVER")
        cluster.wait_promoted(victim, session_key("rnnserve", "charlm", "p0"))
        for _ in range(3):  # MOVED, a fresh slot map, the demoted node's pool closed
            with contextlib.suppress(Unavailable):
                await store.load_many([session_key("rnnserve", "charlm", f"p{i}") for i in range(30)])
        with redis.Redis(port=victim.port) as client:
            others = [c for c in client.client_list() if "M" not in c["flags"] and c["cmd"] != "client|list"]
        assert not others, others  # the store's connections are gone (M: the link to its new primary)
    finally:
        await store.close()
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as client:
            client.config_set("masterauth", "s3cret")
            client.config_set("requirepass", "s3cret")
    port = cluster.nodes[0].port
    for url in (f"redis+cluster://:nope@127.0.0.1:{port}", f"redis+cluster://127.0.0.1:{port}"):
        store = open_store(RedisSettings(url=url))
        try:
            with pytest.raises(StoreRefused, match="credentials"):  # not "retry": a start stops on it
                await store.ping()
        finally:
            await store.close()


async def test_a_cluster_over_tls(tmp_path, start_server):
    """rediss+cluster://: TLS to every node (the nodes speak TLS only, replication and cluster bus too), the
    nodes' certificates checked against --redis-tls-ca; another CA stops the start."""
    group = RedisCluster(primaries=3, replicas=0, tls=redis_certificates(tmp_path))
    group.start()
    try:
        assert group.url.startswith("rediss+cluster://")
        app = await start_server(url=group.url, redis={"tls_ca": tmp_path / "ca.pem"})
        x = next(iter(inputs().values()))
        sids = [f"t{i}" for i in range(30)]  # spread over the three primaries
        async with BatchClient(f"127.0.0.1:{app.port}") as gateway:
            for t in range(3):
                replies = await gateway.step("charlm", {sid: x[t : t + 1] for sid in sids})
                assert all(isinstance(r, StepReply) and r.seq == t + 1 for r in replies.values()), replies
        store = open_store(RedisSettings(url=group.url, tls_ca=tmp_path / "other.pem"))
        try:
            with pytest.raises(StoreRefused, match="TLS"):
                await store.ping()
        finally:
            await store.close()
    finally:
        group.close()


def test_the_cluster_url_and_what_a_cluster_cannot_do():
    address = parse_cluster_url("redis+cluster://u:p%40w@10.0.0.1:7000,[::1]:7001/")
    assert address.nodes == [("10.0.0.1", 7000), ("::1", 7001)] and address.password == "p@w"
    assert not address.tls and parse_cluster_url("rediss+cluster://h:7000").tls
    with pytest.raises(ValueError, match="rediss"):
        RedisSettings(url="redis+cluster://h:7000", tls_ca="ca.pem")  # TLS files without a TLS URL
    for bad in ("redis+cluster://h:7000/0", "redis+cluster://h", "redis+cluster://h:7000?x=1"):
        with pytest.raises(ValueError, match="redis\\+cluster://"):
            RedisSettings(url=bad)
    with pytest.raises(ValueError, match="not kept on Redis Cluster"):
        Settings(redis={"url": "redis+cluster://h:7000"}, auth={"token_file": "t", "max_sessions_per_tenant": 3})


async def test_a_cluster_no_node_of_which_answers_is_unavailable():
    store = open_store(RedisSettings(url=f"redis+cluster://127.0.0.1:{free_port()}", connect_timeout_s=0.3))
    try:
        with pytest.raises(Unavailable, match="no node of the cluster"):
            await store.ping()
    finally:
        await store.close()


async def test_a_shard_without_any_node_left_is_unavailable_never_data_loss(cluster, start_server):
    """A primary and its replica both gone: Redis answers CLUSTERDOWN for the slots (every slot, with the
    default cluster-require-full-coverage). That is the store's trouble, not the session's: UNAVAILABLE,
    never DATA_LOSS, and nothing stored changes."""
    app = await start_server(url=cluster.url, redis={"socket_timeout_s": 1.0, "connect_timeout_s": 0.5})
    x = next(iter(inputs().values()))[:1]
    sids = [f"d{i}" for i in range(30)]
    async with BatchClient(f"127.0.0.1:{app.port}", reconnect_timeout_s=5) as gateway:
        assert all(isinstance(r, StepReply) for r in (await gateway.step("charlm", dict.fromkeys(sids, x))).values())
        victim = cluster.primary_of(session_key("rnnserve", "charlm", sids[0]))
        shard = [victim, *cluster.replicas_of(victim)]
        survivor = next(node for node in cluster.nodes if node not in shard)
        elsewhere = [sid for sid in sids if cluster.primary_of(session_key("rnnserve", "charlm", sid)) not in shard]
        for node in shard:
            node.kill()
        with redis.Redis(port=survivor.port) as client:
            deadline = time.monotonic() + 15
            while b"cluster_state:fail" not in client.execute_command("CLUSTER", "INFO"):
                assert time.monotonic() < deadline, "the cluster never noticed its lost shard"
                time.sleep(0.1)
        replies = await gateway.step("charlm", dict.fromkeys(elsewhere, x))  # their primaries answer CLUSTERDOWN
        codes = {r.code for r in replies.values() if not isinstance(r, StepReply)}
        assert codes == {grpc.StatusCode.UNAVAILABLE}, [r for r in replies.values() if not isinstance(r, StepReply)]
        assert all(gateway.acked_seq("charlm", sid) == 1 for sid in sids)  # refused steps left the sessions at 1
    store = open_store(RedisSettings(url=f"redis+cluster://127.0.0.1:{survivor.port}"))
    try:
        with pytest.raises(Unavailable, match="no primary"):  # their own primaries answer: CLUSTERDOWN
            await store.load_many([session_key("rnnserve", "charlm", sid) for sid in elsewhere])
    finally:
        await store.close()


async def test_1000_sessions_survive_a_killed_primary(cluster, start_server):
    """With redis.wait_replicas 1 a step is acknowledged once the primary's replica holds it, so the replica
    that takes over holds every acknowledged step. The killed node comes back (as a pod would) and joins
    as the new primary's replica, after which its shard acknowledges steps again."""
    app = await start_server(
        url=cluster.url,
        redis={"wait_replicas": 1, "wait_timeout_ms": 500, "socket_timeout_s": 1.0, "connect_timeout_s": 0.5},
    )
    xs = inputs()
    victim = cluster.primary_of(session_key("rnnserve", "charlm", "c0"))

    def kill_then_restart() -> None:
        victim.kill()
        cluster.wait_promoted(victim, session_key("rnnserve", "charlm", "c0"))  # after the node timeout and a vote
        time.sleep(1)
        victim.start()

    got, refused, recovered_s = await stream_all(f"127.0.0.1:{app.port}", xs, 4, kill_then_restart)
    assert refused, "the kill fell between steps: nothing was tested"
    cluster.wait_ok([node.port for node in cluster.nodes])
    assert cluster.primary_of(session_key("rnnserve", "charlm", "c0")) is not victim
    check_every_session(cluster, xs, got)
    print(f"\nkilled primary: {len(refused)} steps refused and resent, the last {recovered_s:.1f}s after the kill")


async def test_1000_sessions_continue_exactly_while_slots_migrate(cluster, start_server):
    app = await start_server(url=cluster.url)
    xs = inputs()
    source = cluster.primary_of(session_key("rnnserve", "charlm", "c0"))
    with redis.Redis(port=source.port) as client:
        source_id = client.execute_command("CLUSTER", "MYID").decode()
        primaries = {
            int(primary[1])
            for _, _, primary, *_ in client.execute_command("CLUSTER", "SLOTS")
            if primary[1] != source.port
        }
    target = next(node for node in cluster.nodes if node.port in primaries)
    with redis.Redis(port=target.port) as client:
        target_id = client.execute_command("CLUSTER", "MYID").decode()

    def reshard() -> None:
        subprocess.run(
            [
                "redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}",
                "--cluster-from", source_id, "--cluster-to", target_id,
                "--cluster-slots", "3000", "--cluster-yes", "--cluster-pipeline", "10",
            ],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
        )  # fmt: skip

    got, refused, _ = await stream_all(f"127.0.0.1:{app.port}", xs, 3, reshard)
    cluster.wait_ok([node.port for node in cluster.alive()])
    check_every_session(cluster, xs, got)
    moved = sum(1 for sid in xs if cluster.primary_of(session_key("rnnserve", "charlm", sid)) is target)
    print(
        f"\nresharding: 3000 slots moved under load; {len(refused)} steps refused and resent; "
        f"{moved} sessions now on the target"
    )
