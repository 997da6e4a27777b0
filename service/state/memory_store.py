"""The embedded store for a single process: the quick start and the demo. Not shared, not durable."""

from __future__ import annotations

import time
from collections.abc import Sequence

from service.state.store import ABSENT, Commit, CommitResult, Outcome, StateStore


class MemoryStateStore(StateStore):
    """Same contract as Redis (compare-and-set, TTL refreshed by every write) inside this process."""

    durable = False

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, bytes, float]] = {}

    def _live(self, key: str) -> tuple[str, bytes, float] | None:
        entry = self._entries.get(key)
        if entry is not None and entry[2] <= time.monotonic():
            del self._entries[key]
            return None
        return entry

    async def load_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [entry[1] if (entry := self._live(key)) else None for key in keys]

    async def tokens(self, keys: Sequence[str]) -> list[str | None]:
        return [entry[0] if (entry := self._live(key)) else None for key in keys]

    async def commit_many(self, commits: Sequence[Commit], ttl_s: float) -> list[CommitResult]:
        results = []
        for commit in commits:
            entry = self._live(commit.key)
            if commit.expected == ABSENT:
                if entry is not None:
                    results.append(CommitResult(Outcome.CONFLICT, entry[0]))
                    continue
            elif commit.expected is not None:
                if entry is None:
                    results.append(CommitResult(Outcome.MISSING))
                    continue
                if entry[0] != commit.expected:
                    results.append(CommitResult(Outcome.CONFLICT, entry[0]))
                    continue
            if commit.delete:
                self._entries.pop(commit.key, None)
            else:
                self._entries[commit.key] = (commit.token, commit.record, time.monotonic() + ttl_s)
            results.append(CommitResult(Outcome.OK, commit.token))
        return results

    async def delete(self, key: str) -> bool:
        return self._live(key) is not None and self._entries.pop(key, None) is not None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()

    async def ttl_ms(self, key: str) -> int | None:
        entry = self._live(key)
        return None if entry is None else int((entry[2] - time.monotonic()) * 1000)
