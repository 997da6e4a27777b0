"""This replica's view of its sessions: a bounded cache of records, and per-session ordering.

The cache is a hint, never the truth: a step planned on a cached record commits only if the store still
holds that record (compare-and-set), and anything but a plain next step is judged on a fresh load.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from service.state.record import SessionRecord


class RecordCache:
    """The most recently used sessions' records, at most `limit` of them (0: none)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> SessionRecord | None:
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
        return record

    def remember(self, key: str, record: SessionRecord) -> None:
        """Keep `record` (whose arrays must own their memory, not view a batch's) for `key`."""
        if self._limit == 0 or record.ended:
            self.forget(key)
            return
        self._records[key] = record
        self._records.move_to_end(key)
        while len(self._records) > self._limit:
            self._records.popitem(last=False)

    def forget(self, key: str) -> None:
        self._records.pop(key, None)

    def fingerprints(self) -> set[bytes]:
        """The model versions the cached sessions run on."""
        return {record.fingerprint for record in self._records.values()}


class SessionLocks:
    """One step of a session at a time on this replica, in arrival order (asyncio.Lock is FIFO)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    async def acquire(self, key: str) -> None:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user(key)
            raise

    def release(self, key: str) -> None:
        self._locks[key][0].release()
        self._release_user(key)

    def _release_user(self, key: str) -> None:
        lock, users = self._locks[key]
        if users == 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)
