"""Session records in Redis: one key per session (a string, token then record; or, as rnnserve 0.1 wrote it,
a hash {token, rec}: see the layouts below), compare-and-set in Lua for many sessions per call, pipelined.

Every write sets the TTL. A lost connection or a timeout becomes `Unavailable`; since a commit that
timed out may or may not have been applied, the client's resend of the same step settles it (a resend
of an applied step returns the stored outputs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import re
import ssl
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection as Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ExecAbortError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.batching import raise_if_cancelled
from service.errors import RecordCorrupt, StartupError, StoreRefused, Unavailable
from service.settings import SENTINEL_SCHEME, RedisSettings, parse_sentinel_url
from service.state.store import APPLIED, Commit, CommitResult, Outcome, StateStore, Stored
from service.tls import load_key_pair

TOKEN_FIELD = "token"
RECORD_FIELD = "rec"

# How a session's record is kept under its key. "string" (the default): the key is a string, the record's
# token, a newline, then the record's bytes. The records are staged by a plain MSET in the commit's own
# transaction, and the commit script renames each into place where its compare succeeds: their bytes never
# pass through Lua, where making a Lua string of a 4.5 KB record cost Redis about half of the 10.6 us a
# session's commit took. "hash": the key is a hash, fields token and rec, as rnnserve 0.1 wrote it. Both
# layouts read both, and a write in one replaces the other, so replicas of 0.1 and of this version can share
# a Redis while "hash" is set (see docs/ARCHITECTURE.md). Redis Cluster keeps "hash": a staged record is a new
# key, which a slot being migrated refuses.
STRING_LAYOUT, HASH_LAYOUT = "string", "hash"
# What a string record's token is when its value holds none (something else wrote the key): a start, which
# expects it, replaces the record; no writer makes such a token ("epoch:seq"). The commit script reads a
# token in the value's first TOKEN_HEAD bytes (a token is at most 37), as the literals there say.
NO_TOKEN = "?"
TOKEN_HEAD = 64

# One call commits many sessions. ARGV[1]: the layout to write ("string" or "hash"). KEYS: the sessions.
# ARGV, six per key: expected token ('' = unconditional, '!' = no record), new token, ttl ms, the tenant's
# live-sessions key ('' = not counted), the count's part (N > 0: a start, refused while the key is uncounted
# and N sessions are live; 0: a step that keeps it live; -1: its end), and the record's staging key (string)
# or the record (hash). Returns, per key: 0 applied (a bare integer: most keys are, and a pair each cost
# Redis and the reply's reader more), {1, current} conflict, {2, ''} missing, {3, error} refused (OOM, a key
# of another type), {4, live} the tenant's limit. The live set is scored by expiry
# (Redis's clock), so an idled-out session stops counting, and expires itself with the last of them. A
# session's staged record, where applied, is renamed to the session's key (`_commit_call` deletes the rest).
# Every Redis call is a pcall: each key is compared and set on its own, and one key's error never stops the
# keys after it (a script that stopped half way would leave the keys before it applied and the whole call
# answered as an error). The exception is READONLY: this Redis became a replica (a failover), no key of the
# call can have been written, and the call's error makes the connection go (to the new primary, under
# Sentinel).
_COMMIT_MANY = """
local hashed = ARGV[1] == 'hash'
local out = {}
local now = nil
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
local function over_limit(live, key, limit)
  local counted = redis.pcall('ZSCORE', live, key)
  if type(counted) == 'table' and counted.err then
    return {3, counted.err}
  elseif counted then
    return nil
  end
  redis.pcall('ZREMRANGEBYSCORE', live, '-inf', clock())
  local held = redis.pcall('ZCARD', live)
  if type(held) == 'number' and held >= limit then
    return {4, tostring(held)}
  end
  return nil
end
-- The key's token (false: no record) and whether it is a string; or nil and the error of a key that is
-- neither a string nor a hash. The layout this call writes is tried first.
local function string_token(key)
  local head = redis.pcall('GETRANGE', key, 0, 63)
  if type(head) == 'table' then
    return nil, head.err
  elseif head == '' then
    return false, true
  end
  return string.match(head, '^([^\\n]*)\\n') or '?', true
end
local function hash_token(key)
  local held = redis.pcall('HGET', key, 'token')
  if type(held) == 'table' then
    return nil, held.err
  end
  return held, false
end
local function token_of(key)
  local first, second = string_token, hash_token
  if hashed then
    first, second = hash_token, string_token
  end
  local current, is_string = first(key)
  if current == nil then
    current, is_string = second(key)
  end
  return current, is_string
end
for i = 1, #KEYS do
  local a = 1 + (i - 1) * 6
  local key = KEYS[i]
  local expected, token, ttl, live, part = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], tonumber(ARGV[a + 5])
  local current, is_string = token_of(key)
  local refused = nil
  if current == nil then
    refused = {3, is_string}
  elseif expected == '!' and current then
    refused = {1, current}
  elseif expected ~= '' and expected ~= '!' and not current then
    refused = {2, ''}
  elseif expected ~= '' and expected ~= '!' and current ~= expected then
    refused = {1, current}
  elseif live ~= '' and part > 0 then
    refused = over_limit(live, key, part)
  end
  if refused then
    out[i] = refused
  else
    local written
    if hashed then
      if current and is_string then
        redis.pcall('DEL', key)
      end
      written = redis.pcall('HSET', key, 'token', token, 'rec', ARGV[a + 6])
    else
      written = redis.pcall('RENAME', ARGV[a + 6], key)
    end
    if type(written) == 'table' and written.err and string.sub(written.err, 1, 8) == 'READONLY' then
      return redis.error_reply(written.err)
    elseif type(written) == 'table' and written.err then
      out[i] = {3, written.err}
    else
      redis.pcall('PEXPIRE', key, ttl)
      if live ~= '' and part < 0 then
        redis.pcall('ZREM', live, key)
      elseif live ~= '' then
        local ttl_ms = tonumber(ttl)
        redis.pcall('ZADD', live, clock() + ttl_ms, key)
        local left = redis.pcall('PTTL', live)
        if type(left) == 'number' and (left == -1 or (left >= 0 and left < ttl_ms)) then
          redis.pcall('PEXPIRE', live, ttl_ms)
        end
      end
      out[i] = 0
    end
  end
end
return out
"""
# Keys per script call: a call holds Redis for its whole run (about 10 us a key), so a long batch is cut
# into several calls, pipelined in one round trip.
KEYS_PER_CALL = 256
_OUTCOMES = {0: Outcome.OK, 1: Outcome.CONFLICT, 2: Outcome.MISSING, 3: Outcome.ERROR, 4: Outcome.LIMIT}


class _Connections:
    """A LIFO pool of redis-py connections for pipelined round trips.

    redis-py's Pipeline and BlockingConnectionPool cost more CPU per round trip than the round trip
    (a health probe of the socket on every checkout, a condition variable, command stacks): profiled
    at about 260 us per step. This pool keeps what matters: at most `size` connections in use, a caller
    waits up to `timeout_s` for one (a semaphore: a waiter that gives up can never take a connection
    with it), a connection that failed mid-trip is dropped (its replies are lost).
    """

    def __init__(self, factory: Callable[[], Connection], size: int, timeout_s: float) -> None:
        self._factory = factory
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []
        self.closed = False  # a connection in use when the pool closed is closed when it comes back

    async def acquire(self) -> Connection:
        if self.closed:
            raise PoolClosed
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolExhausted from None
        return self._idle.pop() if self._idle else self._factory()

    def release(self, connection: Connection, *, broken: bool) -> None:
        if not broken and not self.closed:
            self._idle.append(connection)
        self._slots.release()

    async def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect()


_MOVED_ON = "the session moved on, or this store does not hold it, while confirming a replay; resend it"


class PoolExhausted(Exception):
    """Every pooled connection stayed busy for the pool timeout."""


class PoolClosed(Exception):
    """The store was closed (the server is stopping)."""


class RedisStateStore(StateStore):
    def __init__(self, settings: RedisSettings) -> None:
        if not settings.url:
            raise ValueError("RedisStateStore needs a redis:// or rediss:// URL")
        self._configure(settings)
        # redis-py parses the URL (TLS, auth, database, unix sockets) and makes the connections.
        tls: dict[str, Any] = {}
        if settings.url.startswith(SENTINEL_SCHEME):
            self._finish_init(settings, _sentinel_pool(settings))
            return
        if settings.url.startswith("rediss://"):
            _tls_context_check(settings)
            tls = {
                "ssl_ca_certs": str(settings.tls_ca) if settings.tls_ca else None,
                "ssl_certfile": str(settings.tls_cert) if settings.tls_cert else None,
                "ssl_keyfile": str(settings.tls_key) if settings.tls_key else None,
            }
        try:
            factory = aioredis.ConnectionPool.from_url(
                settings.url,
                **tls,
                socket_timeout=settings.socket_timeout_s,
                socket_connect_timeout=settings.connect_timeout_s,
                decode_responses=False,
                # No silent re-sends: a commit that timed out may have been applied, and sending it again
                # would report a conflict with itself. Failures surface as UNAVAILABLE; the client's resend
                # of the same step is what settles them.
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError:  # its message may quote the password: not passed on
            raise StartupError(
                f"cannot parse the Redis URL {self._where}: percent-encode characters such as / # ? @ in the "
                "user and password (e.g. / as %2F)"
            ) from None
        self._finish_init(settings, factory)

    def _configure(self, settings: RedisSettings) -> None:
        """What every Redis store keeps of its settings (the cluster store, which opens no single pool, too)."""
        assert settings.url is not None
        self._where = _redacted(settings.url)
        self._probe_key = f"{settings.key_prefix}:replication-probe"
        self._wait = (settings.wait_replicas, settings.wait_timeout_ms)
        self._pool_timeout_s = settings.pool_timeout_s
        self._socket_timeout_s = settings.socket_timeout_s
        self._cas_sha = hashlib.sha1(_COMMIT_MANY.encode()).hexdigest()
        self._layout = settings.record_layout

    def _finish_init(self, settings: RedisSettings, factory: aioredis.ConnectionPool) -> None:
        self._factory = factory
        self._connections = _Connections(factory.make_connection, settings.max_connections, settings.pool_timeout_s)

    async def _run(
        self,
        what: str,
        commands: Sequence[tuple[Any, ...] | list[bytes]],
        connections: _Connections | None = None,
        asking: bool = False,
    ) -> list[Any]:
        """One pipelined round trip (on `connections`, this store's pool by default): each command's reply,
        or the ResponseError Redis answered it with. With `asking`, each command goes after an ASKING (a
        cluster node importing the slot serves it)."""
        connections = connections or self._connections
        if asking:
            commands = [sent for command in commands for sent in (("ASKING",), command)]
        connection = await self._acquire(connections, what)
        broken = True
        try:
            # connect() is where Sentinel's connections ask for the primary. It is bounded by redis-py's own
            # connect and socket timeouts, not cancelled from outside: a connection cancelled half way
            # through its handshake leaves its socket open.
            if not connection.is_connected:
                await connection.connect()  # type: ignore[no-untyped-call]
            # One deadline for the whole round trip, rather than redis-py's one per reply.
            async with asyncio.timeout(self._socket_timeout_s):
                await connection.send_packed_command(_pack(commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await connection.read_response(disable_decoding=True, timeout=math.inf))
                    except ReadOnlyError:  # a failover made this Redis a replica: the connection must go
                        raise
                    except ResponseError as refused:  # this command only; the others stand
                        replies.append(refused)
            broken = False
            return replies[1::2] if asking else replies
        except ReadOnlyError as err:
            raise Unavailable(
                f"session store at {self._where} is a read-only replica now (a failover?) while {what}; retry"
            ) from err
        except AuthenticationError as err:  # a ConnectionError to redis-py, but retrying will not help
            raise StoreRefused(
                f"session store {self._where} refused the credentials while {what} ({err}); check the user and "
                "password in the Redis URL"
            ) from err
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as err:
            failure = _tls_failure(err)
            if failure is not None:  # a certificate that does not verify: retrying will not help
                raise StoreRefused(
                    f"TLS with the session store at {self._where} failed while {what} ({failure}); check "
                    "--redis-tls-ca (and --redis-tls-cert/--redis-tls-key where Redis asks for a client certificate)"
                ) from err
            reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            raise Unavailable(
                f"session store unreachable at {self._where} while {what} ({reason[:300]}); retry"
            ) from err
        except RedisError as err:  # Redis answered, and refused: retrying will not help
            raise StoreRefused(f"session store {self._where} refused {what}: {err}") from err
        finally:
            if broken or connections.closed:
                await connection.disconnect()
            connections.release(connection, broken=broken)

    async def _acquire(self, connections: _Connections, what: str) -> Connection:
        try:
            return await connections.acquire()
        except PoolExhausted:
            raise Unavailable(
                f"session store at {self._where}: no pooled connection came free in {self._pool_timeout_s:g}s "
                f"while {what} (Redis slow or not answering, or more load than redis.max_connections "
                "allows); retry"
            ) from None
        except PoolClosed:
            raise Unavailable(f"this server is stopping (its session store closed) while {what}; retry") from None

    async def _one(self, what: str, *command: Any, connections: _Connections | None = None) -> Any:
        (reply,) = await self._run(what, [command], connections)
        if isinstance(reply, ResponseError):
            raise StoreRefused(f"session store {self._where} refused {what}: {reply}")
        return reply

    async def load_many(self, keys: Sequence[str]) -> list[Stored | None | RecordCorrupt]:
        if not keys:
            return []
        replies = await self._run("loading sessions", [c for key in keys for c in _load_commands(key)])
        return [self._stored(key, replies[2 * i], replies[2 * i + 1]) for i, key in enumerate(keys)]

    def _stored(self, key: str, as_string: Any, as_hash: Any) -> Stored | None | RecordCorrupt:
        """A session's record from its two reads (`_load_commands`: as a string, as a hash; where the key
        exists, one of them is refused WRONGTYPE): None where nothing is stored; RecordCorrupt where the key
        is neither (that session only). Any other error is raised: the store's trouble (a cluster without a
        primary for the slot, a command the ACL refuses), not the session's."""
        for reply in (as_string, as_hash):
            if isinstance(reply, ResponseError) and not str(reply).startswith("WRONGTYPE"):
                raise StoreRefused(f"session store {self._where} refused loading sessions: {reply}")
            if isinstance(reply, BaseException) and not isinstance(reply, ResponseError):
                raise reply
        if as_string == b"":  # as the commit script reads it: no record
            return None
        if isinstance(as_string, bytes):
            return Stored(*_split_string_record(as_string))
        if isinstance(as_hash, ResponseError):  # refused as a string and as a hash
            return RecordCorrupt(f"the store holds something else than a session under {key!r} ({as_hash})")
        if as_hash is None or as_string is None:
            return None
        token, record = as_hash
        return None if token is None or record is None else Stored(token.decode(), record)

    async def commit_many(self, commits: Sequence[Commit]) -> list[CommitResult]:
        calls = [commits[i : i + KEYS_PER_CALL] for i in range(0, len(commits), KEYS_PER_CALL)]
        return cast(list[CommitResult], await self._commit_calls(calls))  # no error types passed through

    async def _commit_calls(
        self,
        calls: Sequence[Sequence[Commit]],
        connections: _Connections | None = None,
        passed: tuple[type[ResponseError], ...] = (),
        asking: bool = False,
    ) -> list[CommitResult | ResponseError]:
        """One round trip: each call of the batch script (`KEYS_PER_CALL` keys at most), then WAIT where
        `redis.wait_replicas` asks; each commit's result, in the calls' order. A call's reply is a list of
        per-key results, or one error for the whole call: NOSCRIPT (Redis lost its script cache, and none
        of the call ran: loaded again and resent once), an error of the `passed` types (a cluster's
        redirection: none of the call ran), returned for each of its commits, or any other, after which each
        of its commits may or may not have been applied (UNKNOWN)."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        sent = [self._commit_call(call) for call in calls]
        replicas, wait_ms = self._wait
        acknowledged, refused = replicas, ""
        for attempt in range(2):
            commands = [command for i in todo for command in sent[i]]
            if replicas:  # in the same round trip: the replicas that hold every write of this connection
                commands.append(("WAIT", replicas, wait_ms))
            answers = await self._run("committing sessions", commands, connections, asking)
            if replicas:
                waited = answers.pop()
                if isinstance(waited, ResponseError):  # WAIT refused (an ACL without it): applied, unconfirmed
                    refused = f"WAIT refused: {waited}"
                    waited = 0
                acknowledged = min(acknowledged, waited)
            end = 0
            for i in todo:
                replies[i] = _script_reply(answers[end : end + len(sent[i])])
                end += len(sent[i])
            todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
            if not todo:
                break
            if attempt == 0:
                await self._load_script(connections)
        results = _call_results(calls, replies, passed)
        if acknowledged < replicas:  # applied on the primary, which may lose it in a failover: not acknowledged
            why = refused or f"{acknowledged} of {replicas} replicas confirmed the write within {wait_ms} ms"
            results = [
                CommitResult(Outcome.UNKNOWN, why) if isinstance(r, CommitResult) and r.outcome is Outcome.OK else r
                for r in results
            ]
        return results

    async def confirm_replicated(self, records: Sequence[tuple[str, str]]) -> None:
        if not self._wait[0]:
            return
        if not all(await self._confirm_round(records, self._probe_key)):
            raise Unavailable(_MOVED_ON)

    async def _confirm_round(
        self,
        records: Sequence[tuple[str, str]],
        probe_key: str,
        connections: _Connections | None = None,
        passed: tuple[type[ResponseError], ...] = (),
        asking: bool = False,
    ) -> list[bool | ResponseError]:
        """In one round trip on one connection (to the primary the records must be on): each record's token
        read, a write of its own to `probe_key`, then WAIT. Replicas apply the primary's writes in order, so
        once they hold this write they hold every record written before it. Whether each record still holds
        its token (or its read's error, of the `passed` types); Unavailable when replication is not confirmed."""
        replicas, wait_ms = self._wait
        commands: list[tuple[Any, ...] | list[bytes]] = [read for key, _ in records for read in _token_commands(key)]
        commands += [("INCR", probe_key), ("WAIT", replicas, wait_ms)]
        *reads, probe, waited = await self._run("confirming replication", commands, connections, asking)
        tokens = [_token_read(reads[2 * i], reads[2 * i + 1]) for i in range(len(records))]
        if isinstance(probe, passed):  # the probe key's slot moved: nothing confirmed, all sent again
            return [TryAgainError(f"the replication probe's slot moved ({probe})")] * len(records)
        refused = [r for r in (probe, waited) if isinstance(r, ResponseError)]
        refused += [t for t in tokens if isinstance(t, ResponseError) and not isinstance(t, passed)]
        if refused:
            why = refused[0]
            raise Unavailable(f"session store at {self._where} could not confirm a stored step ({why}); resend it")
        if waited < replicas:
            raise Unavailable(
                f"session store at {self._where}: {waited} of {replicas} replicas confirmed the stored step within "
                f"{wait_ms} ms (redis.wait_replicas); resend it"
            )
        return [
            stored if isinstance(stored, ResponseError) else stored == token
            for stored, (_, token) in zip(tokens, records, strict=True)
        ]

    def _commit_call(self, commits: Sequence[Commit]) -> list[tuple[Any, ...] | list[bytes]]:
        """One call of the commit script. String layout: in a transaction, after an MSET staging each record
        (under its key's name, ":w" and its place in the call), and before a DEL of what the script did not
        rename; the transaction runs whole or not at all, so no other client sees a staged record, and none
        outlives its call."""
        if self._layout == HASH_LAYOUT:
            args: list[Any] = ["EVALSHA", self._cas_sha, len(commits), *(c.key for c in commits), self._layout]
            for c in commits:
                args += (c.expected or "", c.token, _ttl_ms(c.ttl_s), c.live, c.live_limit, c.record)
            return [tuple(args)]
        # Packed here, in one pass, as `_pack` would pack the EVALSHA's arguments: each key and staged name
        # encoded once, the arguments most commits share (ttl, live key, limit) packed once a call, and no
        # record's bytes copied before the write.
        count = len(commits)
        keys: list[bytes] = []
        arguments: list[bytes] = []
        staged, removed = [b"*%d\r\n$4\r\nMSET\r\n" % (1 + 2 * count)], [b"*%d\r\n$3\r\nDEL\r\n" % (1 + count)]
        shared: dict[tuple[type, float, str, int], bytes] = {}
        for j, c in enumerate(commits):  # apart by place: a key twice in a call is applied twice, in order
            key = c.key.encode()
            name, head, expected = b"%b:w%d" % (key, j), c.token.encode(), (c.expected or "").encode()
            # The ttl's type in the key: an int and a float of one value are one dict key, and past 2**53 s
            # their milliseconds differ.
            if (tail := shared.get(shares := (type(c.ttl_s), c.ttl_s, c.live, c.live_limit))) is None:
                live = c.live.encode()
                tail = _BULK % _bulk_int(_ttl_ms(c.ttl_s)) + _BULK % (len(live), live)
                tail += _BULK % _bulk_int(c.live_limit)
                shared[shares] = tail
            keys.append(_BULK % (len(key), key))
            arguments.append(_COMMIT_ARGS % (len(expected), expected, len(head), head, tail, len(name), name))
            staged += (_STAGED % (len(name), name, len(head) + 1 + len(c.record), head), c.record, b"\r\n")
            removed.append(_BULK % (len(name), name))
        sha, layout = self._cas_sha.encode(), self._layout.encode()
        call = b"*%d\r\n$7\r\nEVALSHA\r\n" % (4 + 7 * count) + _BULK % (len(sha), sha) + _BULK % _bulk_int(count)
        script = [call, *keys, _BULK % (len(layout), layout), *arguments]
        return [("MULTI",), staged, script, removed, ("EXEC",)]

    async def _load_script(self, connections: _Connections | None = None) -> None:
        sha = await self._one("loading the commit script", "SCRIPT", "LOAD", _COMMIT_MANY, connections=connections)
        self._cas_sha = sha.decode() if isinstance(sha, bytes) else str(sha)

    async def delete(self, key: str, live: str = "") -> bool:
        if not live:
            return bool(await self._one("deleting a session", "DEL", key))
        deleted, uncounted = await self._run("deleting a session", [("DEL", key), ("ZREM", live, key)])
        for reply in (deleted, uncounted):
            if isinstance(reply, ResponseError):
                raise StoreRefused(f"session store {self._where} refused deleting a session: {reply}")
        return bool(deleted)

    async def ttl_ms(self, key: str) -> int | None:
        ttl = await self._one("reading a session's ttl", "PTTL", key)
        return None if ttl == -2 else int(ttl)

    async def ping(self) -> None:
        """Also loads the commit script, so the first commits need not; with `redis.wait_replicas`, checks
        that WAIT is allowed (an ACL that refuses it would leave every step unconfirmed)."""
        await self._load_script()
        await self._check_wait()

    async def _check_wait(self, connections: _Connections | None = None) -> None:
        if self._wait[0]:
            await self._one("checking that WAIT is allowed", "WAIT", 0, 0, connections=connections)

    async def close(self) -> None:
        await self._connections.close()
        await self._factory.aclose()


def _sentinel_pool(settings: RedisSettings) -> aioredis.ConnectionPool:
    """Connections to whichever Redis the sentinels name as the primary, asked each time a connection is
    made: a failover breaks the old ones (a dead primary's, or READONLY from a demoted one)."""
    assert settings.url is not None
    address = parse_sentinel_url(settings.url)
    sentinels = _Sentinels(address.sentinels, address.master, settings.connect_timeout_s, settings.socket_timeout_s)
    return aioredis.ConnectionPool(
        connection_class=_PrimaryConnection,
        sentinels=sentinels,
        db=address.db,
        username=address.username,
        password=address.password,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=Retry(NoBackoff(), 0),  # no silent re-sends (see RedisStateStore)
    )


class _Sentinels:
    """Asks a Sentinel group for its primary's address: SENTINEL GET-MASTER-ADDR-BY-NAME to one sentinel,
    on a connection of its own that is closed at once."""

    def __init__(self, addresses: list[tuple[str, int]], master: str, connect_s: float, reply_s: float) -> None:
        self.addresses = addresses
        self.master = master
        self._connect_s = connect_s
        self._reply_s = reply_s

    async def ask(self, host: str, port: int) -> tuple[str, int]:
        """The primary's address by this sentinel; `_NoPrimary` if it answers without one, OSError,
        TimeoutError or EOFError if it does not answer."""
        async with asyncio.timeout(self._connect_s):
            reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.writelines(_pack([("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)]))
            async with asyncio.timeout(self._reply_s):
                header = await reader.readline()
                if header != b"*2\r\n":  # *-1: it knows no primary of that name; -NOAUTH...: it wants a password
                    raise _NoPrimary(f"answered {header.strip()[:100].decode(errors='replace')!r}")
                primary_host, primary_port = [await _bulk(reader) for _ in range(2)]
            return primary_host.decode(), int(primary_port)
        except (ValueError, UnicodeDecodeError) as err:
            raise _NoPrimary(f"answered something else than an address ({err})") from err
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _NoPrimary(Exception):
    """A sentinel answered, and named no primary."""


async def _bulk(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readline()
    if not header.startswith(b"$"):
        raise ValueError(f"{header.strip()[:100]!r}")
    data = await reader.readexactly(int(header[1:]) + 2)
    return data[:-2]


class _PrimaryConnection(aioredis.Connection):
    """A connection to the primary a sentinel names, checked to be one (ROLE), each time it connects; the
    sentinels are tried in turn until one names a reachable primary."""

    def __init__(self, *, sentinels: _Sentinels, **kwargs: Any) -> None:
        self._sentinels = sentinels
        super().__init__(**kwargs)

    async def connect(self) -> None:
        if self.is_connected:
            return
        failures: list[str] = []
        answered = 0  # sentinels that answered without naming a primary
        for host, port in self._sentinels.addresses:
            try:
                self.host, self.port = await self._sentinels.ask(host, port)
            except _NoPrimary as err:
                answered += 1
                failures.append(f"sentinel {host}:{port} {err}")
                continue
            except (OSError, TimeoutError, EOFError) as err:
                raise_if_cancelled()
                failures.append(f"sentinel {host}:{port}: {type(err).__name__} {err}".strip())
                continue
            try:
                await super().connect()  # type: ignore[no-untyped-call]
                role = await self._role()
            except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                await self.disconnect()
                failures.append(f"primary {self.host}:{self.port} named by {host}:{port}: {err}")
                continue
            if role in (b"master", None):
                return
            await self.disconnect()  # a stale sentinel's answer: ask the next one
            failures.append(f"{host}:{port} named {self.host}:{self.port}, a {role.decode(errors='replace')}")
        why = "; ".join(failures)
        if answered == len(self._sentinels.addresses):  # every sentinel answered: a setting is wrong, not an outage
            raise ResponseError(
                f"no sentinel knows a primary named {self._sentinels.master!r} ({why}); check the name in the "
                "redis+sentinel:// URL (sentinels are asked without a password)"
            )
        raise RedisConnectionError(f"no sentinel named a reachable primary for {self._sentinels.master!r} ({why})")

    async def _role(self) -> bytes | None:
        """What ROLE says this Redis is; None if ROLE is not allowed (an ACL): then it is taken on trust."""
        await self.send_command("ROLE")
        try:
            reply = await self.read_response(disable_decoding=True)
        except ResponseError:
            return None
        return bytes(reply[0])


def _script_reply(replies: list[Any]) -> Any:
    """The commit script's reply among its call's (`_commit_call`): alone, or inside its transaction. A
    transaction Redis refused whole (EXECABORT: a command refused as it was queued, OOM) ran nothing: that is
    `_NotRun`. One that never began (MULTI refused: BUSY) ran each command alone, or not: the script's own
    reply says which."""
    if len(replies) == 1:
        return replies[0]
    began, _, script, _, executed = replies
    if isinstance(executed, list):
        return executed[1]
    if isinstance(began, ResponseError):
        return script
    if isinstance(executed, ExecAbortError):
        refused = next((r for r in replies[1:-1] if isinstance(r, ResponseError)), executed)
        return _NotRun(_redis_message(refused))
    return executed  # whether it ran is unknown


class _NotRun(Exception):
    """A call's transaction that Redis refused whole: none of its commits was applied."""


def _call_results(
    calls: Sequence[Sequence[Commit]], replies: list[Any], passed: tuple[type[ResponseError], ...]
) -> list[CommitResult | ResponseError]:
    """Each commit's result from its call's script reply (`_script_reply`)."""
    results: list[CommitResult | ResponseError] = []
    for call, reply in zip(calls, replies, strict=True):
        if isinstance(reply, passed):
            results += [reply] * len(call)
        elif isinstance(reply, _NotRun):
            results += [CommitResult(Outcome.ERROR, str(reply))] * len(call)
        elif isinstance(reply, RedisError):  # BUSY, a script error: whether any key was written is unknown
            results += [CommitResult(Outcome.UNKNOWN, str(reply))] * len(call)
        else:
            results += [APPLIED if result == 0 else _refused(*result) for result in reply]
    return results


def _refused(code: int, current: bytes) -> CommitResult:
    return CommitResult(_OUTCOMES[code], current.decode() or None)


def _redis_message(err: ResponseError) -> str:
    """Redis's own error text: redis-py drops the code of the errors it has a class for."""
    code = "OOM" if isinstance(err, OutOfMemoryError) else "NOPERM" if isinstance(err, NoPermissionError) else ""
    return f"{code} {err}" if code else str(err)


def _load_commands(key: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A session's reads, in one round trip: its key as a string (this version's layout), then as a hash (an
    earlier version's)."""
    return ("GET", key), ("HMGET", key, TOKEN_FIELD, RECORD_FIELD)


def _split_string_record(value: bytes) -> tuple[str, bytes]:
    """A string record's token and record, as the commit script reads them: the token ends at a newline
    within the first TOKEN_HEAD bytes; a value without one (not a record this service wrote, which does not
    decode) has the token NO_TOKEN."""
    head, newline, record = value.partition(b"\n")
    if not newline or len(head) >= TOKEN_HEAD:
        return NO_TOKEN, value
    return head.decode(errors="replace"), record


def _token_commands(key: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return ("GETRANGE", key, 0, TOKEN_HEAD - 1), ("HGET", key, TOKEN_FIELD)


def _token_read(head: Any, in_hash: Any) -> str | None | ResponseError:
    """A session's token from `_token_commands`' replies, as the commit script reads it: None where there
    is no record; the error where the key is neither a string nor a hash, or a read was refused otherwise."""
    if isinstance(head, bytes) and head:
        return _split_string_record(head)[0]
    for reply in (head, in_hash):
        if isinstance(reply, ResponseError) and not str(reply).startswith("WRONGTYPE"):
            return reply
    if isinstance(head, ResponseError) and isinstance(in_hash, ResponseError):
        return in_hash
    return None if in_hash is None or isinstance(in_hash, ResponseError) else str(in_hash.decode())


_STAGED = b"$%d\r\n%b\r\n$%d\r\n%b\n"  # a staged record's name and its value up to the record: token "\n"
_BULK = b"$%d\r\n%b\r\n"
# A commit's arguments to the commit script: its expected token, its token, the shared ttl, live key and
# limit (packed already), its staged record's name.
_COMMIT_ARGS = b"$%d\r\n%b\r\n$%d\r\n%b\r\n%b$%d\r\n%b\r\n"


def _ttl_ms(ttl_s: float) -> int:
    """A commit's time to live as the script takes it: whole milliseconds, at least 1."""
    return max(1, int(ttl_s * 1000))


def _bulk_int(value: int) -> tuple[int, bytes]:
    """An integer argument's length and digits, for `_BULK`."""
    digits = b"%d" % value
    return len(digits), digits


def _pack(commands: Sequence[tuple[Any, ...] | list[bytes]]) -> list[bytes]:
    """Commands in the Redis protocol (RESP arrays of bulk strings), in parts for one write; a command
    already packed (a list of parts) goes as it is. Ours take bytes, str and int arguments only; one format
    per command (cached by its length) instead of redis-py's general packer, which cost several times more
    per command."""
    out: list[bytes] = []
    for command in commands:
        if isinstance(command, list):
            out += command
            continue
        args: list[int | bytes] = []
        for arg in command:
            data = arg if type(arg) is bytes else arg.encode() if type(arg) is str else b"%d" % arg
            args += (len(data), data)
        out.append(_resp_format(len(command)) % tuple(args))
    return out


@functools.cache
def _resp_format(arguments: int) -> bytes:
    return b"*%d\r\n" % arguments + b"$%d\r\n%b\r\n" * arguments


def _redacted(url: str) -> str:
    """The URL without its password (in the user part, or a `password=` query parameter), for messages
    and logs."""
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at:
        user = credentials.partition(":")[0]
        rest = f"{user + ':***@' if user else '***@'}{host}"
    rest = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", rest)
    return f"{scheme}://{rest}"


def _tls_context_check(settings: RedisSettings) -> None:
    """Read the rediss:// CA and client certificate now, so a wrong file stops the start with its name
    (the connection would only ever say that it failed)."""
    try:
        context = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
        if settings.tls_cert and settings.tls_key:
            load_key_pair(context, settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError, ValueError) as err:
        raise StartupError(
            f"cannot use the Redis TLS files (--redis-tls-ca, --redis-tls-cert, --redis-tls-key): {err}"
        ) from err


def _tls_failure(err: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a failed connection, if any (a certificate that does not verify: retrying
    cannot help)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
