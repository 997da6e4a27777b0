"""Session records in Redis: one hash per session ({token, rec}), compare-and-set in Lua, pipelined.

Every write sets the TTL. A lost connection or a timeout becomes `Unavailable`; since a commit that
timed out may or may not have been applied, the client's resend of the same step settles it (a resend
of an applied step returns the stored outputs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import StoreRefused, Unavailable
from service.settings import RedisSettings
from service.state.store import Commit, CommitResult, Outcome, StateStore, Stored

TOKEN_FIELD = "token"
RECORD_FIELD = "rec"

# KEYS[1] session; ARGV: expected token ('' = unconditional, '!' = no record), new token, record, ttl ms.
# Returns {0, token} applied, {1, current} conflict, {2, ''} missing.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], 'token')
if ARGV[1] == '!' then
  if current then return {1, current} end
elseif ARGV[1] ~= '' then
  if not current then return {2, ''} end
  if current ~= ARGV[1] then return {1, current} end
end
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'rec', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {0, ARGV[2]}
"""
_OUTCOMES = {0: Outcome.OK, 1: Outcome.CONFLICT, 2: Outcome.MISSING}


class RedisStateStore(StateStore):
    def __init__(self, settings: RedisSettings) -> None:
        if not settings.url:
            raise ValueError("RedisStateStore needs a redis:// or rediss:// URL")
        self._where = _redacted(settings.url)
        # A blocking pool: past `max_connections` calls in flight, a call waits (up to pool_timeout_s) for
        # a connection instead of failing. Load never becomes an error; an unreachable Redis does.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=settings.max_connections,
            timeout=settings.pool_timeout_s,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.connect_timeout_s,
            decode_responses=False,
            # No silent re-sends: a commit that timed out may have been applied, and sending it again
            # would report a conflict with itself. Failures surface as UNAVAILABLE; the client's resend
            # of the same step is what settles them.
            retry=Retry(NoBackoff(), 0),
        )
        self._pool = pool
        self._pool_timeout_s = settings.pool_timeout_s
        self._redis = aioredis.Redis(connection_pool=pool)
        self._cas_sha = hashlib.sha1(_COMPARE_AND_SET.encode()).hexdigest()

    async def _run(self, what: str, pipeline: Any, *, raise_on_error: bool = True) -> list[Any]:
        try:
            return list(await pipeline.execute(raise_on_error=raise_on_error))
        except (RedisConnectionError, RedisTimeoutError, OSError) as err:
            if self._pool_exhausted(err):
                raise Unavailable(
                    f"session store at {self._where}: every pooled connection stayed busy for "
                    f"{self._pool_timeout_s:g}s while {what}; retry, or raise redis.max_connections"
                ) from err
            raise Unavailable(
                f"session store unreachable at {self._where} while {what} ({type(err).__name__}); retry"
            ) from err
        except RedisError as err:  # Redis answered, and refused: retrying will not help
            raise StoreRefused(f"session store {self._where} refused {what}: {err}") from err
        finally:
            await pipeline.reset()  # returns its connection to the pool, or drops a broken one

    @staticmethod
    def _pool_exhausted(err: Exception) -> bool:
        # BlockingConnectionPool's own timeout; it carries no type of its own.
        return isinstance(err, RedisConnectionError) and "No connection available" in str(err)

    async def load_many(self, keys: Sequence[str]) -> list[Stored | None]:
        if not keys:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, TOKEN_FIELD, RECORD_FIELD)
        return [
            None if token is None or record is None else Stored(token.decode(), record)
            for token, record in await self._run("loading sessions", pipe)
        ]

    async def commit_many(self, commits: Sequence[Commit]) -> list[CommitResult]:
        replies: list[Any] = [None] * len(commits)
        todo = list(range(len(commits)))
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for i in todo:
                c = commits[i]
                ttl_ms = max(1, int(c.ttl_s * 1000))
                pipe.evalsha(self._cas_sha, 1, c.key, c.expected or "", c.token, c.record, ttl_ms)
            answers = await self._run("committing sessions", pipe, raise_on_error=False)
            for i, reply in zip(todo, answers, strict=True):
                replies[i] = reply
            # NOSCRIPT: Redis restarted or flushed its script cache; those commits were not applied.
            todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
            if not todo:
                break
            if attempt == 0:
                await self._load_script()
        return [
            CommitResult(Outcome.ERROR, str(reply))
            if isinstance(reply, RedisError)
            else CommitResult(_OUTCOMES[int(reply[0])], reply[1].decode() or None)
            for reply in replies
        ]

    async def _load_script(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.script_load(_COMPARE_AND_SET)
        (sha,) = await self._run("loading the commit script", pipe)
        self._cas_sha = sha.decode() if isinstance(sha, bytes) else str(sha)

    async def delete(self, key: str) -> bool:
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(key)
        (removed,) = await self._run("deleting a session", pipe)
        return bool(removed)

    async def ttl_ms(self, key: str) -> int | None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.pttl(key)
        (ttl,) = await self._run("reading a session's ttl", pipe)
        return None if ttl == -2 else int(ttl)

    async def ping(self) -> None:
        """Also loads the commit script, so the first commits need not."""
        await self._load_script()

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()  # a pool passed in is not closed with its client


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}://{user + ':***@' if user else '***@'}{host}"
