"""Our Redis command packer writes the same bytes as redis-py's own."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from service.state.redis_store import _pack

_ARGS = st.one_of(st.binary(max_size=300), st.text(max_size=40), st.integers(-(2**63), 2**64))
# A command's name comes first (redis-py splits it on spaces: "SCRIPT LOAD"); ours never holds one.
_NAMES = st.sampled_from(["EVALSHA", "HMGET", "DEL", "PTTL", "SCRIPT"])
_COMMANDS = st.lists(st.tuples(_NAMES, st.lists(_ARGS, max_size=9)).map(lambda c: (c[0], *c[1])), max_size=20)


@settings(max_examples=200, deadline=None)
@given(_COMMANDS)
def test_pack_matches_redis_py(commands: list[tuple[object, ...]]) -> None:
    reference = Connection()
    assert b"".join(_pack(commands)) == b"".join(b"".join(reference.pack_command(*command)) for command in commands)
