"""Session records on Redis Cluster: the same records and compare-and-set as `RedisStateStore`, sharded.

Each session's key hashes to a slot (its braces hold the session's hash tag), each slot is served by one
primary. The store keeps the slot map (`CLUSTER SLOTS`), a connection pool per primary, and sends each
node its share of a batch in one pipelined round trip, all nodes at once. A script call's keys must share
a slot (Redis checks declared keys, and only declared keys get MOVED/ASK during a migration), so the
commit script runs once per slot: in a batch of sessions that is about once per session, pipelined.

Redirections: a slot that moved (resharding, a failover) answers MOVED, a slot being migrated ASK (the
key is on the importing node: sent there after ASKING) or TRYAGAIN; a call so answered ran nothing, so
the store sends those keys again (on a fresh slot map, but for ASK), a few times, before it answers
UNAVAILABLE. A slot with no primary (CLUSTERDOWN, during a failover) is UNAVAILABLE at once. A node
that does not answer fails its own share of the batch (UNAVAILABLE; for commits, "may or may not have
been applied", settled by the client's resend) and makes the store read the slot map again before the
next call. Pools of nodes that serve no slot on a new map are closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, ResponseError, TryAgainError

from service.batching import raise_if_cancelled
from service.errors import RecordCorrupt, RnnServeError, StartupError, StoreRefused, Unavailable
from service.settings import RedisSettings, parse_cluster_url
from service.state.redis_store import (
    _MOVED_ON,
    HASH_LAYOUT,
    KEYS_PER_CALL,
    RedisStateStore,
    _Connections,
    _load_commands,
    _tls_context_check,
)
from service.state.store import Commit, CommitResult, Outcome, Stored

SLOTS = 16384
# Rounds of "read the slot map again and resend what was redirected" before a call is given up.
MAX_REDIRECTS = 5
_REDIRECTED = (MovedError, AskError, TryAgainError)
_PASSED = (*_REDIRECTED, ClusterDownError)  # answers that mean a call ran nothing: sorted out per key

Node = tuple[str, int]
T = TypeVar("T")


class RedisClusterStore(RedisStateStore):
    def __init__(self, settings: RedisSettings) -> None:  # not super().__init__: that opens one standalone pool
        assert settings.url is not None
        try:
            self._address = parse_cluster_url(settings.url)
        except ValueError as err:
            raise StartupError(str(err)) from None
        self._settings = settings
        self._tls: dict[str, Any] = {}
        if self._address.tls:
            _tls_context_check(settings)
            self._tls = {
                "connection_class": SSLConnection,
                "ssl_ca_certs": str(settings.tls_ca) if settings.tls_ca else None,
                "ssl_certfile": str(settings.tls_cert) if settings.tls_cert else None,
                "ssl_keyfile": str(settings.tls_key) if settings.tls_key else None,
            }
        self._configure(settings)
        self._layout = HASH_LAYOUT  # a staged record is a new key, which a slot being migrated refuses
        self._pools: dict[Node, tuple[aioredis.ConnectionPool, _Connections]] = {}
        self._slots: list[Node] | None = None  # the primary serving each slot
        self._refreshing: asyncio.Lock = asyncio.Lock()
        self._probes: dict[Node, str] = {}
        self._closed = False

    # -- nodes and slots -----------------------------------------------------------------------

    def _pool(self, node: Node) -> _Connections:
        if self._closed:
            raise Unavailable("this server is stopping (its session store closed); retry")
        if node not in self._pools:
            factory = aioredis.ConnectionPool(
                host=node[0],
                port=node[1],
                username=self._address.username,
                password=self._address.password,
                socket_timeout=self._settings.socket_timeout_s,
                socket_connect_timeout=self._settings.connect_timeout_s,
                retry=Retry(NoBackoff(), 0),  # no silent re-sends (see RedisStateStore)
                **self._tls,
            )
            connections = _Connections(
                factory.make_connection, self._settings.max_connections, self._settings.pool_timeout_s
            )
            self._pools[node] = (factory, connections)
        return self._pools[node][1]

    async def _slot_map(self) -> list[Node]:
        """The map read last (or now, if none is held). What it returns stays a whole map even if another
        call marks it stale at once."""
        slots = self._slots
        if slots is None:
            async with self._refreshing:
                slots = self._slots
                if slots is None:
                    slots = self._slots = await self._read_slot_map()
                    await self._forget_all_but(set(slots))
        return slots

    async def _read_slot_map(self) -> list[Node]:
        """CLUSTER SLOTS from the first node that answers: the nodes of the URL, then every node known."""
        candidates = list(dict.fromkeys([*self._address.nodes, *self._pools]))
        failures, refusals = [], []
        for node in candidates:
            try:
                (reply,) = await self._run("reading the cluster's slot map", [("CLUSTER", "SLOTS")], self._pool(node))
            except StoreRefused:  # credentials, TLS: the same for every node, and retrying will not help
                raise
            except Unavailable as err:
                raise_if_cancelled()  # a stop that met a failing connect must not become "try the next node"
                failures.append(f"{node[0]}:{node[1]}: {err.message}")
                continue
            if isinstance(reply, ResponseError):
                refusals.append(f"{node[0]}:{node[1]} refused CLUSTER SLOTS ({reply})")
                continue
            slots: list[Node | None] = [None] * SLOTS
            for start, end, primary, *_ in reply:
                host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
                for slot in range(int(start), int(end) + 1):
                    slots[slot] = (host or node[0], int(primary[1]))
            if any(owner is None for owner in slots):
                raise Unavailable(f"the cluster at {self._where} does not serve every slot yet (CLUSTERDOWN?); retry")
            return slots  # type: ignore[return-value]
        if refusals:
            raise StoreRefused(f"{'; '.join(refusals)[:400]}: is {self._where} a Redis Cluster?")
        raise Unavailable(f"no node of the cluster at {self._where} answered ({'; '.join(failures)[:400]}); retry")

    async def _forget_all_but(self, primaries: set[Node]) -> None:
        """Close the pools of nodes that serve no slot now (demoted in a failover, emptied by a resharding,
        or a node of the URL that is a replica); a connection still out is closed when it comes back."""
        for node in [node for node in self._pools if node not in primaries]:
            pool = self._pools.pop(node, None)  # close() may have taken it meanwhile
            self._probes.pop(node, None)
            if pool is not None:
                await pool[1].close()
                await pool[0].aclose()

    def _stale(self) -> None:
        """Read the slot map again before the next call (a redirection, or a node that did not answer)."""
        self._slots = None
        self._probes.clear()

    async def _per_node(
        self, what: str, keys: Sequence[str], send: Callable[[Node, list[int], bool], Awaitable[list[T]]]
    ) -> list[T | BaseException]:
        """`send(node, indexes, asking)` for each node's share of `keys`, all nodes at once; each key's
        result, an exception for a node that failed. A key answered ASK (its slot is being migrated, and
        the key is not, or no longer, on the source) goes to the importing node, after ASKING; keys answered
        MOVED or TRYAGAIN are sent again on a fresh slot map; up to MAX_REDIRECTS rounds in all."""
        results: list[T | BaseException | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        asked: dict[int, Node] = {}  # key -> the node importing its slot
        for _ in range(MAX_REDIRECTS):
            shares = _shares(keys, todo, asked, await self._slot_map())
            routes = list(shares)
            outcomes = await asyncio.gather(
                *(send(node, shares[node, asking], asking) for node, asking in routes), return_exceptions=True
            )
            raise_if_cancelled()
            todo, asked, moved = [], {}, False
            for route, outcome in zip(routes, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, Exception):
                        raise outcome
                    self._stale()
                    for i in shares[route]:
                        results[i] = outcome
                    continue
                for i, result in zip(shares[route], outcome, strict=True):
                    if isinstance(result, AskError) and not isinstance(result, MovedError):  # MovedError is one
                        todo.append(i)
                        asked[i] = (str(result.host), int(result.port))
                    elif isinstance(result, _REDIRECTED):
                        todo.append(i)
                        moved = True
                    else:
                        results[i] = self._unless_down(what, result)
            if not todo:
                return results  # type: ignore[return-value]
            if moved:
                self._stale()
                await asyncio.sleep(0.05)  # a migration or failover under way: give it a moment
        for i in todo:
            results[i] = Unavailable(f"session store at {self._where}: its slot kept moving while {what}; retry")
        return results  # type: ignore[return-value]

    def _unless_down(self, what: str, result: T) -> T | Unavailable:
        if not isinstance(result, ClusterDownError):
            return result
        self._stale()  # no primary for the slot yet (a failover): the call ran nothing
        return Unavailable(
            f"session store at {self._where}: the cluster serves this session's slot on no primary right now "
            f"({result}) while {what}; retry"
        )

    # -- the store -------------------------------------------------------------------------------

    async def load_many(self, keys: Sequence[str]) -> list[Stored | None | RecordCorrupt]:
        if not keys:
            return []

        async def send(node: Node, share: list[int], asking: bool) -> list[Any]:
            commands = [c for i in share for c in _load_commands(keys[i])]
            replies = await self._run("loading sessions", commands, self._pool(node), asking)
            return [_both(replies[2 * j], replies[2 * j + 1]) for j in range(len(share))]

        replies = await self._per_node("loading sessions", keys, send)
        return [  # a failed node fails all
            self._stored(key, *reply) if isinstance(reply, tuple) else self._stored(key, reply, None)
            for key, reply in zip(keys, replies, strict=True)
        ]

    async def commit_many(self, commits: Sequence[Commit]) -> list[CommitResult]:
        """Each node's share in calls of the batch script, one slot a call (`KEYS_PER_CALL` keys at most),
        then WAIT where `redis.wait_replicas` asks; a call answered MOVED/ASK/TRYAGAIN ran nothing and is
        sent again."""

        async def send(node: Node, share: list[int], asking: bool) -> list[Any]:
            by_slot: dict[int, list[int]] = {}
            for i in share:
                by_slot.setdefault(key_slot(commits[i].key.encode()), []).append(i)
            calls = [
                same[i : i + KEYS_PER_CALL] for same in by_slot.values() for i in range(0, len(same), KEYS_PER_CALL)
            ]
            results = await self._commit_calls(
                [[commits[i] for i in call] for call in calls], self._pool(node), _PASSED, asking
            )
            by_index = dict(zip((i for call in calls for i in call), results, strict=True))
            return [by_index[i] for i in share]

        outcomes = await self._per_node("committing sessions", [c.key for c in commits], send)
        return [
            outcome if isinstance(outcome, CommitResult) else CommitResult(Outcome.UNKNOWN, _reason(outcome))
            for outcome in outcomes
        ]

    async def confirm_replicated(self, records: Sequence[tuple[str, str]]) -> None:
        if not self._wait[0]:
            return

        async def send(node: Node, share: list[int], asking: bool) -> list[Any]:
            probe = await self._probe_key_on(node)
            if probe is None:  # the node serves no slot on the map read since its share was made: send again
                return [TryAgainError(f"{node[0]}:{node[1]} serves no slot now")] * len(share)
            return await self._confirm_round([records[i] for i in share], probe, self._pool(node), _PASSED, asking)

        for held in await self._per_node("confirming replication", [key for key, _ in records], send):
            if isinstance(held, RnnServeError):
                raise held
            if held is not True:
                raise Unavailable(_MOVED_ON)

    async def _probe_key_on(self, node: Node) -> str | None:
        """A key that lives on `node` (its hash tag chosen for a slot the node serves): the write WAIT waits
        for. None if the node serves no slot."""
        slots = await self._slot_map()
        if node not in slots:
            return None
        if node not in self._probes:
            n = 0
            while slots[key_slot(f"{self._probe_key}:{{{n}}}".encode())] != node:
                n += 1
            self._probes[node] = f"{self._probe_key}:{{{n}}}"
        return self._probes[node]

    async def _single(self, what: str, key: str, *command: Any) -> Any:
        async def send(node: Node, share: list[int], asking: bool) -> list[Any]:
            return await self._run(what, [command], self._pool(node), asking)

        (reply,) = await self._per_node(what, [key], send)
        if isinstance(reply, BaseException):
            if isinstance(reply, ResponseError):
                raise StoreRefused(f"session store {self._where} refused {what}: {reply}")
            raise reply
        return reply

    async def delete(self, key: str, live: str = "") -> bool:
        if live:  # refused where settings are read (RedisSettings): the live set would sit in another slot
            raise StoreRefused("per-tenant session limits are not kept on Redis Cluster")
        return bool(await self._single("deleting a session", key, "DEL", key))

    async def ttl_ms(self, key: str) -> int | None:
        ttl = await self._single("reading a session's ttl", key, "PTTL", key)
        return None if ttl == -2 else int(ttl)

    async def ping(self) -> None:
        """Reads the slot map, loads the commit script on every primary (checks WAIT where asked)."""
        self._stale()
        slots = await self._slot_map()
        for node in dict.fromkeys(slots):
            pool = self._pool(node)
            await self._load_script(pool)
            await self._check_wait(pool)

    async def close(self) -> None:
        self._closed = True
        for factory, connections in self._pools.values():
            await connections.close()
            await factory.aclose()
        self._pools.clear()


def _shares(
    keys: Sequence[str], todo: list[int], asked: dict[int, Node], slots: list[Node]
) -> dict[tuple[Node, bool], list[int]]:
    """The keys to send (indexes into `keys`) by node, and whether after ASKING: a key answered ASK goes to
    the node importing its slot, any other to its slot's primary."""
    shares: dict[tuple[Node, bool], list[int]] = {}
    for i in todo:
        node = asked.get(i) or slots[key_slot(keys[i].encode())]
        shares.setdefault((node, i in asked), []).append(i)
    return shares


def _both(first: Any, second: Any) -> tuple[Any, Any] | ResponseError:
    """A session's two reads (its hash and its record key share a slot): the pair, or a redirection either
    was answered with, which stands for both (`_per_node` sends them again)."""
    for reply in (first, second):
        if isinstance(reply, _PASSED):
            return reply
    return first, second


def _reason(outcome: BaseException | object) -> str:
    if isinstance(outcome, RnnServeError):
        return outcome.message
    return str(outcome)
