"""This replica's view of its sessions: a bounded cache of records, and per-session ordering.

The cache is a hint, never the truth: a step planned on a cached record commits only if the store still
holds that record (compare-and-set), and anything but a plain next step is judged on a fresh load.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable

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


class SessionTurns:
    """One step of a session at a time on this replica, the others waiting in arrival order.

    A turn is a callable that starts the work; whoever ends a turn calls `leave`, which starts the next.
    Callbacks, not locks: no task waits per step.
    """

    def __init__(self) -> None:
        # A held key: None while nothing waits behind its holder (most keys: no line made per step).
        self._waiting: dict[str, deque[Callable[[], None]] | None] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def enter(self, key: str, turn: Callable[[], None]) -> None:
        """Run `turn` now if `key` has no step here, else once the steps before it have left."""
        if self.claim(key):
            turn()
        else:
            self.wait(key, turn)

    def claim(self, key: str) -> bool:
        """Take `key`'s turn if no one holds it (True); the holder must `leave`."""
        if key in self._waiting:
            return False
        self._waiting[key] = None
        return True

    def wait(self, key: str, turn: Callable[[], None]) -> None:
        """Run `turn` after the steps already holding or waiting for `key` (which someone holds)."""
        waiting = self._waiting[key]
        if waiting is None:
            waiting = self._waiting[key] = deque()
        waiting.append(turn)

    def leave(self, key: str) -> None:
        waiting = self._waiting[key]
        if waiting:
            # Soon, not now: a turn that ends at once (a refused step) would otherwise start the next one
            # inside this call, and a long queue of refusals would recurse as deep as it is long.
            asyncio.get_running_loop().call_soon(waiting.popleft())
        else:
            del self._waiting[key]
