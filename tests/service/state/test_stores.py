"""One contract, two stores: compare-and-set per key, pipelined batches, TTL refreshed by every write."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest
import redis

from bench.process import RedisProcess
from service.errors import RecordCorrupt, Unavailable
from service.server import open_store
from service.settings import RedisSettings
from service.state.memory_store import MemoryStateStore
from service.state.redis_store import HASH_LAYOUT, KEYS_PER_CALL, NO_TOKEN, STRING_LAYOUT
from service.state.store import ABSENT, Commit, Outcome, StateStore, Stored, session_key
from tests.faults import RedisProxy

LAYOUTS = [STRING_LAYOUT, HASH_LAYOUT]


@pytest.fixture
async def store(store_url):
    store = open_store(RedisSettings(url=store_url))
    await store.ping()
    yield store
    await store.close()


async def records(store: StateStore, *keys: str) -> list[bytes | None]:
    return [None if s is None else s.record for s in await store.load_many(keys)]


async def test_load_missing_is_none(store: StateStore):
    assert await store.load_many(["a", "b"]) == [None, None]


async def test_compare_and_set(store: StateStore):
    (first,) = await store.commit_many([Commit("k", None, "e:1", b"one", 60)])
    assert first.outcome is Outcome.OK
    (ok,) = await store.commit_many([Commit("k", "e:1", "e:2", b"two", 60)])
    assert ok.outcome is Outcome.OK
    (stale,) = await store.commit_many([Commit("k", "e:1", "e:2", b"lost", 60)])
    assert (stale.outcome, stale.current) == (Outcome.CONFLICT, "e:2")
    (missing,) = await store.commit_many([Commit("nope", "e:1", "e:2", b"x", 60)])
    assert missing.outcome is Outcome.MISSING
    assert await store.load_many(["k", "nope"]) == [Stored("e:2", b"two"), None]


async def test_a_start_commit_finds_no_record_or_fails(store: StateStore):
    (first,) = await store.commit_many([Commit("k", ABSENT, "e:1", b"one", 60)])
    assert first.outcome is Outcome.OK
    (late,) = await store.commit_many([Commit("k", ABSENT, "f:1", b"late start", 60)])
    assert (late.outcome, late.current) == (Outcome.CONFLICT, "e:1")
    assert await store.load_many(["k"]) == [Stored("e:1", b"one")]


async def test_a_batch_commits_each_key_independently(store: StateStore):
    await store.commit_many([Commit("a", None, "e:1", b"a1", 60), Commit("b", None, "e:1", b"b1", 60)])
    results = await store.commit_many(
        [
            Commit("a", "e:1", "e:2", b"a2", 60),
            Commit("b", "e:9", "e:10", b"b10", 60),
            Commit("c", "e:1", "e:2", b"c2", 60),
            Commit("d", None, "f:1", b"d1", 60),
        ]
    )
    assert [r.outcome for r in results] == [Outcome.OK, Outcome.CONFLICT, Outcome.MISSING, Outcome.OK]
    assert await records(store, "a", "b", "c", "d") == [b"a2", b"b1", None, b"d1"]


async def test_delete(store: StateStore):
    await store.commit_many([Commit("k", None, "e:1", b"one", 60)])
    assert await store.delete("k")
    assert await store.load_many(["k"]) == [None]
    assert not await store.delete("k")


async def test_ttl_is_set_per_commit_and_refreshed_by_writes(store: StateStore):
    await store.commit_many([Commit("k", None, "e:1", b"one", 0.4), Commit("long", None, "e:1", b"x", 60)])
    ttl = await store.ttl_ms("k")
    assert ttl is not None and 0 < ttl <= 400
    assert (await store.ttl_ms("long") or 0) > 50_000
    await asyncio.sleep(0.25)
    await store.commit_many([Commit("k", "e:1", "e:2", b"two", 0.4)])
    await asyncio.sleep(0.25)  # 0.5 s after the first write: alive only because the second refreshed it
    assert await records(store, "k") == [b"two"]
    await asyncio.sleep(0.3)
    assert await store.load_many(["k"]) == [None]
    assert await store.ttl_ms("k") is None


async def test_expired_entries_that_are_never_touched_again_are_swept():
    store = MemoryStateStore()
    await store.commit_many([Commit(f"k{i}", None, "e:1", b"x" * 100, 0.05) for i in range(20_000)])
    assert len(store) == 20_000
    await asyncio.sleep(0.1)
    await store.commit_many([Commit("other", None, "e:1", b"y", 60)])  # any write sweeps what has expired
    assert len(store) == 1
    for seq in range(2, 2_000):  # rewriting one key must not grow the deadline heap without bound
        await store.commit_many([Commit("other", f"e:{seq - 1}", f"e:{seq}", b"y", 60)])
    assert len(store._deadlines) < 100


async def test_unreachable_redis_is_unavailable_and_names_the_store():
    url = "redis://user:secret@127.0.0.1:1/0"
    store = open_store(RedisSettings(url=url, connect_timeout_s=0.2, socket_timeout_s=0.2))
    with pytest.raises(Unavailable, match="session store unreachable at redis://user:\\*\\*\\*@127.0.0.1:1/0") as info:
        await store.ping()
    assert "secret" not in info.value.message
    with pytest.raises(Unavailable):
        await store.commit_many([Commit("k", None, "e:1", b"x", 1)])
    await store.close()


async def test_more_calls_than_pooled_connections_wait_instead_of_failing(redis_store_url):
    """Load is never an error: past max_connections, calls queue for a connection (up to pool_timeout_s)."""
    store = open_store(RedisSettings(url=redis_store_url, max_connections=2, pool_timeout_s=30))
    await store.ping()
    keys = [f"k{i}" for i in range(500)]
    results = await asyncio.gather(*(store.commit_many([Commit(key, ABSENT, "e:1", key.encode(), 60)]) for key in keys))
    assert all(r.outcome is Outcome.OK for (r,) in results)
    loaded = await asyncio.gather(*(store.load_many([key]) for key in keys))
    assert [s.record for (s,) in loaded] == [key.encode() for key in keys]  # type: ignore[union-attr]
    await store.close()


async def test_a_pool_that_stays_busy_is_unavailable_after_its_timeout(redis_proc, redisdb):
    proxy = await RedisProxy(redis_proc.port).start()
    store = open_store(RedisSettings(url=proxy.url, max_connections=1, pool_timeout_s=0.3, socket_timeout_s=5))
    await store.ping()
    proxy.hold_replies()  # the one connection waits for its answer
    busy = asyncio.create_task(store.load_many(["a"]))
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    with pytest.raises(Unavailable, match="no pooled connection came free in 0.3s"):
        await store.load_many(["k"])
    assert time.perf_counter() - started < 1.5
    proxy.release()
    assert await busy == [None]
    assert await store.load_many(["k"]) == [None]  # and the connection is back in the pool
    await store.close()
    await proxy.close()


def test_session_keys_are_injective():
    assert session_key("p", "a", "b/c") != session_key("p", "a-b", "c")
    with pytest.raises(ValueError):
        session_key("p", "a/b", "c")  # not a model name: it would share a key with ("a", "b/c")


def test_unsupported_url_scheme_is_refused():
    with pytest.raises(ValueError, match="unsupported store URL scheme"):
        open_store(RedisSettings(url="memcached://localhost"))


async def test_a_waiter_that_gives_up_as_a_connection_comes_free_does_not_take_it_along():
    """The holder releases in the very tick the waiter is cancelled (its pool timeout): the connection
    must go back to the pool, not vanish with the waiter (which left the pool dead for good)."""
    from service.state.redis_store import _Connections

    made: list[object] = []
    pool = _Connections(lambda: made.append(object()) or made[-1], size=1, timeout_s=5)  # type: ignore[arg-type,return-value]
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)  # the waiter waits for the one connection

    def release_and_give_up() -> None:
        pool.release(held, broken=False)
        waiter.cancel()

    asyncio.get_running_loop().call_soon(release_and_give_up)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    again = await asyncio.wait_for(pool.acquire(), 1)  # the pool still has its connection
    assert again is held and len(made) == 1


async def test_a_batch_longer_than_one_script_call_commits_every_key(redis_store_url):
    """A batch goes to Redis in script calls of KEYS_PER_CALL keys, pipelined: every key gets its own result."""
    store = open_store(RedisSettings(url=redis_store_url))
    keys = [f"k{i}" for i in range(2 * KEYS_PER_CALL + 3)]
    await store.commit_many([Commit(key, None, "e:1", b"one", 60) for key in keys[::2]])  # every other key
    results = await store.commit_many([Commit(key, "e:1", "e:2", key.encode(), 60) for key in keys])
    assert [r.outcome for r in results] == [Outcome.OK if i % 2 == 0 else Outcome.MISSING for i in range(len(keys))]
    assert await records(store, *keys) == [key.encode() if i % 2 == 0 else None for i, key in enumerate(keys)]
    await store.close()


def _redis_client(server: RedisProcess) -> redis.Redis:
    return redis.Redis(port=server.port)


@pytest.mark.parametrize("layout", ["string", "hash"])
async def test_a_write_redis_refuses_is_an_error_for_its_key_and_changes_nothing(tmp_path, layout):
    """Out of memory (noeviction): each write is refused with Redis's message, and nothing is written. With
    records in hashes, a stale commit in the same batch is still a conflict; with records staged in the
    commit's transaction, Redis refuses the transaction whole, the stale commit with it. A read-only replica:
    the call is UNAVAILABLE."""
    primary = RedisProcess(tmp_path / "primary")
    replica = RedisProcess(tmp_path / "replica")
    for server in (primary, replica):
        server.directory.mkdir()
        server.start()
    try:
        store = open_store(RedisSettings(url=primary.url, record_layout=layout))
        await store.commit_many([Commit("held", None, "e:1", b"one", 60)])
        with _redis_client(primary) as client:
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)  # far below what is used: every write is refused
        stale, fresh = Commit("held", "e:0", "e:2", b"x", 60), Commit("new", None, "f:1", b"y", 60)
        conflict, refused = await store.commit_many([stale, fresh])
        if layout == "hash":
            assert (conflict.outcome, conflict.current) == (Outcome.CONFLICT, "e:1")
        else:
            assert conflict.outcome is Outcome.ERROR and "OOM" in (conflict.current or "")
        assert refused.outcome is Outcome.ERROR and "OOM" in (refused.current or "")
        with _redis_client(primary) as client:
            client.config_set("maxmemory", 0)
        assert await records(store, "held", "new") == [b"one", None]
        await store.close()

        with _redis_client(replica) as client:
            client.replicaof("127.0.0.1", primary.port)
        # A replica (after a failover, the old primary): the call fails as a whole, UNAVAILABLE (retry,
        # on a new connection: under Sentinel, to the new primary), and writes nothing.
        on_replica = open_store(RedisSettings(url=replica.url, record_layout=layout))
        with pytest.raises(Unavailable, match="read-only replica"):
            await on_replica.commit_many([Commit("other", None, "f:1", b"y", 60)])
        assert await records(on_replica, "other") == [None]
        await on_replica.close()
    finally:
        replica.close()
        primary.close()


async def test_a_key_of_another_type_refuses_its_own_commit_only(redis_store_url):
    """Each key is compared and set on its own: a key Redis cannot read as a session (another type) is
    an error for its commit, and the commits before and after it in the same call are applied."""
    store = open_store(RedisSettings(url=redis_store_url))
    with redis.Redis.from_url(redis_store_url) as client:
        client.rpush("b", "a list, not a session")
    results = await store.commit_many([Commit(key, None, "e:1", key.encode(), 60) for key in ("a", "b", "c")])
    assert [r.outcome for r in results] == [Outcome.OK, Outcome.ERROR, Outcome.OK]
    assert "WRONGTYPE" in (results[1].current or "")
    assert await records(store, "a", "c") == [b"a", b"c"]
    await store.close()


@pytest.mark.parametrize("layout", ["string", "hash"])
async def test_a_call_redis_answers_with_one_error_is_of_unknown_outcome(tmp_path, layout):
    """A whole call refused (here BUSY: another script holds Redis) may or may not have written its keys:
    its commits are UNKNOWN, which the engine answers as UNAVAILABLE "may or may not have been applied". A
    call in a transaction that Redis refused whole (EXECABORT) wrote nothing: its commits are refused."""
    server = RedisProcess(tmp_path)
    server.start()
    try:
        with _redis_client(server) as client:
            client.config_set("busy-reply-threshold", 10)  # ms before other clients are told BUSY
        store = open_store(RedisSettings(url=server.url, record_layout=layout))
        await store.ping()
        spinning = asyncio.create_task(asyncio.to_thread(_spin_a_script, server))
        await asyncio.sleep(0.3)
        results = await store.commit_many([Commit("k", None, "e:1", b"x", 60)])
        assert [r.outcome for r in results] == [Outcome.ERROR if layout == "string" else Outcome.UNKNOWN]
        assert "BUSY" in (results[0].current or "")
        with _redis_client(server) as client:
            client.script_kill()
        await spinning
        await store.close()
    finally:
        server.close()


def _spin_a_script(server: RedisProcess) -> None:
    with _redis_client(server) as client, contextlib.suppress(redis.ResponseError):
        client.eval("while true do end", 0)  # until SCRIPT KILL


async def test_a_key_of_another_type_loads_as_corrupt_for_that_key_only(redis_store_url):
    store = open_store(RedisSettings(url=redis_store_url))
    await store.commit_many([Commit("a", None, "e:1", b"one", 60)])
    with redis.Redis.from_url(redis_store_url) as client:
        client.rpush("b", "a list, not a session")
    a, b, c = await store.load_many(["a", "b", "c"])
    assert a == Stored("e:1", b"one") and c is None
    assert isinstance(b, RecordCorrupt) and "WRONGTYPE" in b.message
    await store.close()


async def test_records_in_either_layout_are_read_and_continued_by_both(redis_store_url):
    """Replicas writing strings (this version) and hashes (rnnserve 0.1, or this version with
    redis.record_layout=hash while 0.1 still runs) share a session: a random interleaving of their commits,
    starts, stale writers, ends and deletes against a model of the contract. Each reads what the other
    wrote, a write replaces the other layout, the ttl is the last write's, and no staged record is left."""
    rng = random.Random(7)
    stores = {layout: open_store(RedisSettings(url=redis_store_url, record_layout=layout)) for layout in LAYOUTS}
    with redis.Redis.from_url(redis_store_url) as client:
        try:
            held: dict[str, tuple[str, bytes] | None] = dict.fromkeys(["a", "b", "c"])  # the model: token, record
            for n in range(400):
                layout = rng.choice(LAYOUTS)
                store = stores[layout]
                key = rng.choice(list(held))
                token, record, ttl_s = f"e:{n}", rng.randbytes(rng.choice([0, 1, 9, 4574])), rng.choice([60, 600])
                now = held[key]
                choice = rng.random()
                if choice < 0.08:
                    assert await store.delete(key) is (now is not None)
                    held[key] = None
                    continue
                if choice < 0.25:  # a stale writer: another token than the stored one
                    expected = "e:stale" if now is not None else "e:gone"
                elif choice < 0.35 or now is None:  # a start
                    expected = ABSENT
                else:
                    expected = now[0]
                (result,) = await store.commit_many([Commit(key, expected, token, record, ttl_s)])
                if expected == ABSENT and now is not None:
                    assert (result.outcome, result.current) == (Outcome.CONFLICT, now[0])
                elif expected != ABSENT and now is None:
                    assert result.outcome is Outcome.MISSING
                elif now is not None and expected not in (ABSENT, now[0]):
                    assert (result.outcome, result.current) == (Outcome.CONFLICT, now[0])
                else:
                    assert (result.outcome, result.current) == (Outcome.OK, None), (n, layout, result)
                    held[key] = (token, record)
                    kind = client.type(key)
                    assert kind == (b"string" if layout == "string" else b"hash"), (n, layout, kind)
                    assert ttl_s * 1000 - 5000 < client.pttl(key) <= ttl_s * 1000
                for reader in stores.values():
                    (stored,) = await reader.load_many([key])
                    assert (None if stored is None else (stored.token, stored.record)) == held[key], (n, key)
                    ttl = await reader.ttl_ms(key)
                    assert ttl is None if held[key] is None else abs(ttl - client.pttl(key)) < 1000  # type: ignore[operator]
                assert not list(client.scan_iter("*:w[0-9]*")), "a staged record outlived its call"
        finally:
            for store in stores.values():
                await store.close()


async def test_a_key_twice_in_one_call_is_committed_in_order(redis_store_url):
    """The store's contract holds however a caller batches: each commit on its own, in order (the engine
    never sends a session twice in a batch)."""
    for layout in LAYOUTS:
        store = open_store(RedisSettings(url=redis_store_url, record_layout=layout))
        try:
            first, second = Commit(layout, ABSENT, "e:1", b"a", 60), Commit(layout, "e:1", "e:2", b"b", 60)
            assert [r.outcome for r in await store.commit_many([first, second])] == [Outcome.OK, Outcome.OK]
            assert await store.load_many([layout]) == [Stored("e:2", b"b")]
        finally:
            await store.close()


async def test_an_empty_string_is_no_record(redis_store_url):
    """As the commit script reads it: a start that expects no record replaces it."""
    store = open_store(RedisSettings(url=redis_store_url))
    try:
        with redis.Redis.from_url(redis_store_url) as client:
            client.set("empty", b"")
        assert await store.load_many(["empty"]) == [None]
        (start,) = await store.commit_many([Commit("empty", ABSENT, "f:1", b"one", 60)])
        assert start.outcome is Outcome.OK
    finally:
        await store.close()


async def test_a_start_replaces_a_string_that_is_no_record(redis_store_url):
    """A string under a session's key that this service did not write (no token in its head) reads as a
    record with the token NO_TOKEN, which does not decode (DATA_LOSS for its steps); a start, which expects
    that token, replaces it, and a step that expects another does not."""
    store = open_store(RedisSettings(url=redis_store_url))
    try:
        with redis.Redis.from_url(redis_store_url) as client:
            client.set("odd", b"x" * 100)
        (stored,) = await store.load_many(["odd"])
        assert stored == Stored(NO_TOKEN, b"x" * 100)
        (stale,) = await store.commit_many([Commit("odd", "e:1", "e:2", b"two", 60)])
        assert (stale.outcome, stale.current) == (Outcome.CONFLICT, NO_TOKEN)
        (start,) = await store.commit_many([Commit("odd", NO_TOKEN, "f:1", b"one", 60)])
        assert start.outcome is Outcome.OK
        assert await records(store, "odd") == [b"one"]
    finally:
        await store.close()
