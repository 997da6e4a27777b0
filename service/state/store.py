"""The StateStore interface: load many, commit many (per-key ok / conflict / missing), delete."""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from service.errors import RecordCorrupt
from service.repository import MODEL_NAME_PATTERN

# Key layout, in one place. The braces are a Redis Cluster hash tag: a session's keys share a slot.
# Model names cannot hold "/" (MODEL_NAME_PATTERN), so the first "/" splits model from session id and
# no two (model, session id) pairs share a key. A tenant's sessions (authentication on) live under
# "{prefix}:t:{tenant}:", which no key without a tenant starts with; tenant names hold no ":".
# A session's key is "{prefix}:s:{model/session_id}", or "{prefix}:t:{tenant}:s:{model/session_id}" for a
# tenant's (session_key makes both). A tenant's live sessions (with a per-tenant limit): a sorted set of
# session keys, scored by expiry.
LIVE_SESSIONS_KEY = "{prefix}:t:{tenant}:live"


def session_key(prefix: str, model: str, session_id: str, tenant: str = "") -> str:
    if "/" in model:
        raise ValueError(f"model name {model!r} does not match {MODEL_NAME_PATTERN}")
    if tenant:
        if ":" in tenant or "/" in tenant:
            raise ValueError(f"tenant {tenant!r} holds ':' or '/'")
        return f"{prefix}:t:{tenant}:s:{{{model}/{session_id}}}"
    return f"{prefix}:s:{{{model}/{session_id}}}"


def live_sessions_key(prefix: str, tenant: str) -> str:
    return LIVE_SESSIONS_KEY.format(prefix=prefix, tenant=tenant)


# `Commit.expected` for a write that must find no record (a session's start).
ABSENT = "!"


class Outcome(enum.Enum):
    OK = "ok"
    CONFLICT = "conflict"
    MISSING = "missing"
    ERROR = "error"  # the store refused this one commit (not applied); the others in the batch stand
    UNKNOWN = "unknown"  # the store failed while committing it: it may or may not have been applied
    LIMIT = "limit"  # a start that would take its tenant past its live-session limit (not applied)


@dataclass(frozen=True, slots=True)
class Stored:
    """A key's compare-and-set token and record bytes, read together."""

    token: str
    record: bytes


# Values, though not frozen: one of each is made per step, and a frozen dataclass costs more to make.
@dataclass(slots=True)
class Commit:
    """Write `record` under `key`, to live `ttl_s`, if the stored token equals `expected` (ABSENT: if there
    is no record; None: unconditionally).

    With `live` (a tenant's live-sessions key), the write also keeps that count: `live_limit` > 0 for a
    start, which is refused (LIMIT) if the key is not counted yet and the tenant holds that many live
    sessions; 0 for a step that keeps the session live; -1 for its end (a tombstone is not live)."""

    key: str
    expected: str | None
    token: str
    record: bytes
    ttl_s: float
    live: str = ""
    live_limit: int = 0


@dataclass(frozen=True, slots=True)
class CommitResult:
    outcome: Outcome
    # What the store found: on conflict, the token of whoever wrote last; on an error or the tenant's limit,
    # why. None for an applied commit.
    current: str | None = None


APPLIED = CommitResult(Outcome.OK)  # every applied commit's result (one value: most commits are)


class StateStore(abc.ABC):
    """Where session records live. Implementations raise `Unavailable` when they cannot answer."""

    #: False for a store that loses state with the process (the log says so at start-up).
    durable: bool = True

    @abc.abstractmethod
    async def load_many(self, keys: Sequence[str]) -> list[Stored | None | RecordCorrupt]:
        """The stored token and record of each key, None where there is none, or RecordCorrupt where the
        store holds something under the key that is not a session (that session only); one round trip."""

    @abc.abstractmethod
    async def commit_many(self, commits: Sequence[Commit]) -> list[CommitResult]:
        """Apply each commit independently (compare-and-set), one round trip for all of them."""

    async def confirm_replicated(self, records: Sequence[tuple[str, str]]) -> None:
        """Return once the store shows it holds each (key, token) as durably as a commit (with
        `redis.wait_replicas`: on that many replicas); raise `Unavailable` if it cannot show it. A replay
        answers from a record some other call wrote: this is what lets it count as acknowledged. Stores
        without replicas hold what they answered from already."""
        return None

    @abc.abstractmethod
    async def delete(self, key: str, live: str = "") -> bool:
        """Remove a key unconditionally (and from the live-sessions set `live`); True if it existed."""

    @abc.abstractmethod
    async def ttl_ms(self, key: str) -> int | None:
        """Milliseconds until the key expires; -1 if it never does; None if it does not exist."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise `Unavailable` if the store cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""
