"""Our Redis command packers write the same bytes as redis-py's own."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from service.settings import RedisSettings
from service.state.redis_store import STRING_LAYOUT, RedisStateStore, _pack
from service.state.store import ABSENT, Commit

_ARGS = st.one_of(st.binary(max_size=300), st.text(max_size=40), st.integers(-(2**63), 2**64))
# A command's name comes first (redis-py splits it on spaces: "SCRIPT LOAD"); ours never holds one.
_NAMES = st.sampled_from(["EVALSHA", "HMGET", "DEL", "PTTL", "SCRIPT"])
_COMMANDS = st.lists(st.tuples(_NAMES, st.lists(_ARGS, max_size=9)).map(lambda c: (c[0], *c[1])), max_size=20)


@settings(max_examples=200, deadline=None)
@given(_COMMANDS)
def test_pack_matches_redis_py(commands: list[tuple[object, ...]]) -> None:
    reference = Connection()
    assert b"".join(_pack(commands)) == b"".join(b"".join(reference.pack_command(*command)) for command in commands)


_COMMITS = st.lists(
    st.builds(
        Commit,
        key=st.text(min_size=1, max_size=30),
        expected=st.one_of(st.none(), st.just(ABSENT), st.text(max_size=20)),
        token=st.text(min_size=1, max_size=20),
        record=st.binary(max_size=200),
        ttl_s=st.one_of(st.floats(0, 1e6), st.integers(0, 2**60), st.sampled_from([2**53 + 2, float(2**53 + 2)])),
        live=st.sampled_from(["", "rnnserve:live:{tenant-a}", "rnnserve:live:{ténant}"]),
        live_limit=st.sampled_from([-1, 0, 1, 1000]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(_COMMITS)
def test_commit_call_packs_as_redis_py(commits: list[Commit]) -> None:
    """The commit script's call, packed by hand in one pass, is byte for byte what redis-py packs for the
    same commands written out argument by argument."""
    store = RedisStateStore(RedisSettings(url="redis://127.0.0.1:1/0"))
    store._cas_sha = "0123456789abcdef0123456789abcdef01234567"
    args: list[object] = ["EVALSHA", store._cas_sha, len(commits), *(c.key for c in commits), STRING_LAYOUT]
    staged: list[object] = ["MSET"]
    removed: list[object] = ["DEL"]
    for j, c in enumerate(commits):
        name = f"{c.key}:w{j}"
        args += (c.expected or "", c.token, max(1, int(c.ttl_s * 1000)), c.live, c.live_limit, name)
        staged += (name, c.token.encode() + b"\n" + c.record)
        removed.append(name)
    reference = Connection()
    expected = [("MULTI",), tuple(staged), tuple(args), tuple(removed), ("EXEC",)]
    packed = b"".join(_pack(store._commit_call(commits)))
    assert packed == b"".join(b"".join(reference.pack_command(*command)) for command in expected)
