"""One contract, two stores: compare-and-set per key, pipelined batches, TTL refreshed by every write."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import Unavailable
from service.server import open_store
from service.settings import RedisSettings
from service.state.store import ABSENT, Commit, Outcome, StateStore


@pytest.fixture
async def store(store_url):
    store = open_store(RedisSettings(url=store_url))
    await store.ping()
    yield store
    await store.close()


async def test_load_missing_is_none(store: StateStore):
    assert await store.load_many(["a", "b"]) == [None, None]


async def test_compare_and_set(store: StateStore):
    (first,) = await store.commit_many([Commit("k", None, "e:1", b"one")], ttl_s=60)
    assert first.outcome is Outcome.OK
    (ok,) = await store.commit_many([Commit("k", "e:1", "e:2", b"two")], ttl_s=60)
    assert ok.outcome is Outcome.OK
    (stale,) = await store.commit_many([Commit("k", "e:1", "e:2", b"lost")], ttl_s=60)
    assert (stale.outcome, stale.current) == (Outcome.CONFLICT, "e:2")
    (missing,) = await store.commit_many([Commit("nope", "e:1", "e:2", b"x")], ttl_s=60)
    assert missing.outcome is Outcome.MISSING
    assert await store.load_many(["k", "nope"]) == [b"two", None]


async def test_a_start_commit_finds_no_record_or_fails(store: StateStore):
    (first,) = await store.commit_many([Commit("k", ABSENT, "e:1", b"one")], ttl_s=60)
    assert first.outcome is Outcome.OK
    (late,) = await store.commit_many([Commit("k", ABSENT, "f:1", b"late start")], ttl_s=60)
    assert (late.outcome, late.current) == (Outcome.CONFLICT, "e:1")
    assert await store.load_many(["k"]) == [b"one"]
    assert await store.tokens(["k", "nope"]) == ["e:1", None]


async def test_a_batch_commits_each_key_independently(store: StateStore):
    await store.commit_many([Commit("a", None, "e:1", b"a1"), Commit("b", None, "e:1", b"b1")], ttl_s=60)
    results = await store.commit_many(
        [
            Commit("a", "e:1", "e:2", b"a2"),
            Commit("b", "e:9", "e:10", b"b10"),
            Commit("c", "e:1", "e:2", b"c2"),
            Commit("d", None, "f:1", b"d1"),
        ],
        ttl_s=60,
    )
    assert [r.outcome for r in results] == [Outcome.OK, Outcome.CONFLICT, Outcome.MISSING, Outcome.OK]
    assert await store.load_many(["a", "b", "c", "d"]) == [b"a2", b"b1", None, b"d1"]


async def test_conditional_delete(store: StateStore):
    await store.commit_many([Commit("k", None, "e:1", b"one")], ttl_s=60)
    (refused,) = await store.commit_many([Commit("k", "e:0", "e:2", b"", delete=True)], ttl_s=60)
    assert refused.outcome is Outcome.CONFLICT
    (done,) = await store.commit_many([Commit("k", "e:1", "e:2", b"", delete=True)], ttl_s=60)
    assert done.outcome is Outcome.OK
    assert await store.load_many(["k"]) == [None]
    assert not await store.delete("k")


async def test_ttl_is_set_and_refreshed_by_writes(store: StateStore):
    await store.commit_many([Commit("k", None, "e:1", b"one")], ttl_s=0.4)
    ttl = await store.ttl_ms("k")
    assert ttl is not None and 0 < ttl <= 400
    await asyncio.sleep(0.25)
    await store.commit_many([Commit("k", "e:1", "e:2", b"two")], ttl_s=0.4)
    await asyncio.sleep(0.25)  # 0.5 s after the first write: alive only because the second refreshed it
    assert await store.load_many(["k"]) == [b"two"]
    await asyncio.sleep(0.3)
    assert await store.load_many(["k"]) == [None]
    assert await store.ttl_ms("k") is None


async def test_unreachable_redis_is_unavailable():
    store = open_store(RedisSettings(url="redis://127.0.0.1:1/0", connect_timeout_s=0.2, socket_timeout_s=0.2))
    with pytest.raises(Unavailable, match="session store unreachable"):
        await store.ping()
    with pytest.raises(Unavailable):
        await store.commit_many([Commit("k", None, "e:1", b"x")], ttl_s=1)
    await store.close()


def test_unsupported_url_scheme_is_refused():
    with pytest.raises(ValueError, match="unsupported store URL scheme"):
        open_store(RedisSettings(url="memcached://localhost"))
