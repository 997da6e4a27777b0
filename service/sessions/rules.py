"""The session contract as pure functions: no I/O, no clock, property-tested.

Given what a step asks for and what the store holds, `judge` says whether to apply the step (and on
top of what), answer it from the stored record (a resend), or refuse it:

- A start (seq 1) replaces whatever is stored, unless it is the stored session's own start sent again
  (the same non-zero `start_id`): then it is judged as seq 1 of that session, so a resent start never
  wipes out steps acknowledged since.
- `seq == last + 1` applies. `seq == last` with the same input digest is a resend: the stored outputs
  again. `seq == last` with another input is not a resend and is refused. Any other seq is refused with
  the seq expected.
- A later step that names its start (a non-zero `start_id`) is refused unless the stored session is that
  start: a restart lost in a store failover, or another client's restart, is never continued as if it
  were this client's session.
- A step the server numbers (`seq` None: Triton clients that send no `rnnserve_seq`) applies at
  `last + 1`; it can never be recognised as a resend.
- A tombstone (an ended session) answers a resend of its end step; anything else but a new start is
  NOT_FOUND, saying the session ended.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from service.errors import (
    AnotherStart,
    NotARetry,
    RecordCorrupt,
    RnnServeError,
    SeqOutOfOrder,
    SessionEnded,
    SessionNotFound,
)
from service.state.record import DIGEST_BYTES, SessionRecord
from service.state.store import ABSENT


# Not frozen, as the step path's other dataclasses (see steps.py): values all the same.
@dataclass(slots=True)
class Ask:
    """What the contract needs to know of a step."""

    session_id: str
    seq: int | None  # None: the server numbers the step
    start: bool
    end: bool
    start_id: int  # the client's name for its start; 0: none
    digest: bytes


@dataclass(slots=True)
class Apply:
    """Apply the step as `seq`, on `base` (None: fresh state), if the store still holds `expected`;
    `restarts` a start that replaces a live (stored, not ended) session."""

    seq: int
    base: SessionRecord | None
    expected: str
    restarts: bool = False


@dataclass(slots=True)
class Replay:
    """A resend of the stored last step: answer with its outputs, change nothing."""

    record: SessionRecord


Verdict = Apply | Replay | RnnServeError


_SHAPE_2D = struct.Struct("<2q")
_FLOAT32 = np.dtype("<f4")  # made once: a dtype given as text is parsed on every call


def input_digest(x: np.ndarray, end: bool) -> bytes:
    """Identifies a step's input: its float32 values, shape and end flag."""
    data = np.ascontiguousarray(x, dtype=_FLOAT32)
    shape = _SHAPE_2D.pack(*data.shape) if data.ndim == 2 else struct.pack(f"<{data.ndim}q", *data.shape)
    # One call on the joined bytes: the same digest as updates in turn, at less cost per step (and joining
    # a copy of the array's bytes costs less than joining a view of them).
    return hashlib.blake2b(shape + (b"E" if end else b"-") + data.tobytes(), digest_size=DIGEST_BYTES).digest()


def judge(ask: Ask, token: str | None, record: SessionRecord | RecordCorrupt | None, model: str) -> Verdict:
    """The verdict on `ask` given the stored `token` and `record` (None: nothing stored).

    A record that does not parse (RecordCorrupt) refuses every step but a new start.
    """
    if ask.start:
        if isinstance(record, SessionRecord) and ask.start_id and record.start_id == ask.start_id:
            return _judge_step(ask, 1, record, model)
        live = isinstance(record, SessionRecord) and not record.ended
        return Apply(1, None, token or ABSENT, restarts=live)
    if isinstance(record, RecordCorrupt):
        return record
    if record is None:
        return SessionNotFound(
            f"session {ask.session_id!r} of model {model!r} has expired or was never started; "
            "start it again with start=true and seq=1"
        )
    if ask.start_id and record.start_id != ask.start_id:  # not the start this step belongs to
        return AnotherStart(ask.session_id, model)
    if ask.seq is None:
        if record.ended:
            return _ended(ask, record, model)
        return Apply(record.seq + 1, record, record.token)
    return _judge_step(ask, ask.seq, record, model)


def plain_next(ask: Ask, record: SessionRecord) -> bool:
    """Whether `ask` is the plain next step of the live session `record`: the step path's common case,
    told at less cost than by `judge`, which applies it as `Apply(record.seq + 1, record, record.token)`."""
    return (
        not ask.start
        and not record.ended
        and (ask.seq is None or ask.seq == record.seq + 1)
        and (not ask.start_id or ask.start_id == record.start_id)
    )


def _judge_step(ask: Ask, seq: int, record: SessionRecord, model: str) -> Verdict:
    if seq == record.seq and ask.digest == record.digest:
        return Replay(record)
    if record.ended:
        return _ended(ask, record, model)
    if seq == record.seq + 1:
        return Apply(seq, record, record.token)
    if seq == record.seq:
        return NotARetry(ask.session_id, seq)
    return SeqOutOfOrder(ask.session_id, seq, record.seq + 1)


def _ended(ask: Ask, record: SessionRecord, model: str) -> SessionEnded:
    if ask.start:  # a start named like the ended session's own: it is that start, resent
        how = "to start the session again, send a start with a new start_id"
    else:
        how = "start a new session (start=true, seq 1) to continue"
    return SessionEnded(f"session {ask.session_id!r} of model {model!r} ended at seq {record.seq}; {how}")
