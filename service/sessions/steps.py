"""What the engine takes and gives: steps, their results, and what is known of a stored session."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.state.record import Tensors

# The step path's dataclasses are not frozen: a frozen dataclass's __init__ costs five times a plain one's,
# and several are made per step. Treat them as values all the same.


@dataclass(slots=True)
class Step:
    """One request: T >= 1 time steps for one session."""

    model: str
    session_id: str
    # 1, 2, 3, ... for the session; None: the server numbers the step (last + 1), for Triton clients that
    # send no `rnnserve_seq`. Such a step cannot be told from its resend, which is applied again.
    seq: int | None
    x: np.ndarray
    version: int = 0
    start: bool = False
    end: bool = False
    # The client's name for this start (any non-zero number, new for each start): a resent start with
    # the same id is judged as seq 1 of the session it started, not as a new start. 0: none.
    start_id: int = 0
    # Whose session it is, where authentication is on ('' where it is off): keys are namespaced by it.
    tenant: str = ""


@dataclass(slots=True)
class StepResult:
    model: str
    version: int
    session_id: str
    seq: int
    outputs: Tensors
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SessionInfo:
    model: str
    session_id: str
    version: int | None
    last_seq: int
    fingerprint: str
    ttl_ms: int | None
    start_id: int  # the client's name for the session's start; 0: none


Answer = StepResult | BaseException  # what a step gets: its result, or the error that refused it
