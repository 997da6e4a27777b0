"""A session's record as the Redis store keeps it (see service/state/redis_store.py): the tests that read,
tamper with or set back stored records go through these, not through the key layout."""

from __future__ import annotations

import redis


def stored_record(client: redis.Redis, key: str) -> bytes | None:
    """The record's bytes, as this version writes them (a string) or as an earlier one did (a hash)."""
    if client.type(key) == b"hash":
        legacy = client.hget(key, "rec")
        return None if legacy is None else bytes(legacy)
    value = client.get(key)
    return None if value is None else bytes(value).partition(b"\n")[2]


def stored_token(client: redis.Redis, key: str) -> str | None:
    if client.type(key) == b"hash":
        legacy = client.hget(key, "token")
        return None if legacy is None else bytes(legacy).decode()
    value = client.get(key)
    return None if value is None else bytes(value).partition(b"\n")[0].decode()


def replace_record(client: redis.Redis, key: str, blob: bytes) -> None:
    """Other bytes under the session's token (a corrupted or rewritten record), in its layout, its ttl kept."""
    if client.type(key) == b"hash":
        client.hset(key, "rec", blob)
        return
    token = stored_token(client, key)
    assert token is not None, f"no session stored under {key!r}"
    client.set(key, token.encode() + b"\n" + blob, keepttl=True)
