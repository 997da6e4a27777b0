"""The embedded store for a single process: the quick start and the demo. Not shared, not durable."""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass

from service.errors import RecordCorrupt
from service.state.store import ABSENT, APPLIED, Commit, CommitResult, Outcome, StateStore, Stored


@dataclass(slots=True)
class _Entry:
    token: str
    record: bytes
    expires: float


class MemoryStateStore(StateStore):
    """Same contract as Redis (compare-and-set, TTL refreshed by every write) inside this process.

    Expired entries are dropped when touched and, like Redis's active expiry, swept from a heap of
    deadlines on every write, so sessions that are never touched again do not hold memory.
    """

    durable = False

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._deadlines: list[tuple[float, str]] = []  # may hold stale deadlines of rewritten keys
        self._live_sets: dict[str, dict[str, float]] = {}  # a tenant's live sessions: key -> expiry

    def _live(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= time.monotonic():
            del self._entries[key]
            return None
        return entry

    def _sweep(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, key = heapq.heappop(self._deadlines)
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= now:
                del self._entries[key]
        if len(self._deadlines) > 2 * len(self._entries) + 64:  # stale deadlines of rewritten keys
            self._deadlines = [(e.expires, k) for k, e in self._entries.items()]
            heapq.heapify(self._deadlines)

    async def load_many(self, keys: Sequence[str]) -> list[Stored | None | RecordCorrupt]:
        return [Stored(entry.token, entry.record) if (entry := self._live(key)) else None for key in keys]

    async def commit_many(self, commits: Sequence[Commit]) -> list[CommitResult]:
        self._sweep()
        results = []
        for commit in commits:
            entry = self._live(commit.key)
            if commit.expected == ABSENT:
                if entry is not None:
                    results.append(CommitResult(Outcome.CONFLICT, entry.token))
                    continue
            elif commit.expected is not None:
                if entry is None:
                    results.append(CommitResult(Outcome.MISSING))
                    continue
                if entry.token != commit.expected:
                    results.append(CommitResult(Outcome.CONFLICT, entry.token))
                    continue
            live = self._live_sets.setdefault(commit.live, {}) if commit.live else None
            if live is not None and commit.live_limit > 0 and commit.key not in live:
                now = time.monotonic()
                for key in [key for key, expires in live.items() if expires <= now]:
                    del live[key]
                if len(live) >= commit.live_limit:
                    results.append(CommitResult(Outcome.LIMIT, str(len(live))))
                    continue
            expires = time.monotonic() + commit.ttl_s
            self._entries[commit.key] = _Entry(commit.token, commit.record, expires)
            heapq.heappush(self._deadlines, (expires, commit.key))
            if live is not None and commit.live_limit < 0:
                live.pop(commit.key, None)
            elif live is not None:
                live[commit.key] = expires
            results.append(APPLIED)
        return results

    async def delete(self, key: str, live: str = "") -> bool:
        if live:
            self._live_sets.get(live, {}).pop(key, None)
        return self._live(key) is not None and self._entries.pop(key, None) is not None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._deadlines.clear()
        self._live_sets.clear()

    async def ttl_ms(self, key: str) -> int | None:
        entry = self._live(key)
        return None if entry is None else int((entry.expires - time.monotonic()) * 1000)

    def __len__(self) -> int:
        """Entries held, expired or not (for tests of the sweep)."""
        return len(self._entries)
