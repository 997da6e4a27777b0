"""Errors the service answers with. Each says what the client did wrong and what to do about it.

The core (sessions, batching, state, runtime) raises these and knows nothing of gRPC; `Code` carries the
gRPC status numbers, and the API adapters map them in one place (`service/api/status.py`).
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """gRPC status codes by number (google.rpc.Code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RnnServeError(Exception):
    """Base of every error a client may see; the message is safe to send."""

    code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RnnServeError):
    """Malformed input: shape, dtype, NaN/Inf, bad session id, bad flags."""

    code = Code.INVALID_ARGUMENT


class ModelNotFound(RnnServeError):
    code = Code.NOT_FOUND


class SessionNotFound(RnnServeError):
    code = Code.NOT_FOUND


class SessionEnded(SessionNotFound):
    """A step for a session that ended (its tombstone is still there)."""


class SeqOutOfOrder(RnnServeError):
    """A seq that is neither the next one nor a retry of the last one."""

    code = Code.FAILED_PRECONDITION

    def __init__(self, session_id: str, seq: int, expected_seq: int) -> None:
        super().__init__(
            f"session {session_id!r}: got seq {seq}, expected seq {expected_seq} "
            f"(or {expected_seq - 1} to repeat the last step); resend from seq {expected_seq}"
        )
        self.expected_seq = expected_seq


class NotARetry(SeqOutOfOrder):
    """The last applied seq again, with another input: not a resend of that step."""

    def __init__(self, session_id: str, seq: int) -> None:
        RnnServeError.__init__(
            self,
            f"session {session_id!r}: seq {seq} was already applied with a different input, so this is not a "
            f"resend of it and was not applied; the session expects seq {seq + 1}",
        )
        self.expected_seq = seq + 1


class FailedPrecondition(RnnServeError):
    """Version pin mismatch, or a bidirectional model asked to stream."""

    code = Code.FAILED_PRECONDITION


class AnotherStart(FailedPrecondition):
    """A step of a start the store does not hold: the session was started again since, or this start was
    lost (a store failover that dropped unreplicated writes)."""

    def __init__(self, session_id: str, model: str) -> None:
        super().__init__(
            f"session {session_id!r} of model {model!r} holds another start than this step's start_id: it was "
            "started again since, or this start was lost in a store failover; start it again (start=true, seq 1, "
            "a new start_id)"
        )


class WriteConflict(RnnServeError):
    """Another writer advanced the session first; this step was not applied."""

    code = Code.ABORTED


class Unavailable(RnnServeError):
    """Store unreachable, model not ready, or the server is draining. Retry, possibly elsewhere."""

    code = Code.UNAVAILABLE


class Drained(Unavailable):
    """A drain cut a stream's reading: what it read is answered, the rest goes to another replica. An orderly
    end of the stream, not counted among the errors (a rollout would count one for every open stream)."""


class StoreRefused(Unavailable):
    """The store answered but refused a command (a key of the wrong type, out of memory, read-only)."""


class Overloaded(RnnServeError):
    code = Code.RESOURCE_EXHAUSTED


class Unauthenticated(RnnServeError):
    """No bearer token, or one the token file does not hold (where authentication is on)."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(RnnServeError):
    """A tenant asking for an operator's call (loading or unloading models)."""

    code = Code.PERMISSION_DENIED


class RecordCorrupt(RnnServeError):
    """A stored record that does not parse or does not fit its model."""

    code = Code.DATA_LOSS


class StartupError(Exception):
    """The server cannot start (a port taken, the store unreachable); the message says why and what to do."""
