"""The session contract's pure rules, checked as properties over every kind of step and stored record."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from service.errors import AnotherStart, NotARetry, RecordCorrupt, SeqOutOfOrder, SessionEnded, SessionNotFound
from service.sessions.rules import Apply, Ask, Replay, input_digest, judge, plain_next
from service.state.record import SessionRecord
from service.state.store import ABSENT

DIGESTS = st.sampled_from([bytes([i]) * 16 for i in range(3)])
START_IDS = st.sampled_from([0, 1, 2])


@st.composite
def records(draw: st.DrawFn) -> SessionRecord:
    return SessionRecord(
        fingerprint=b"f" * 32,
        epoch=draw(st.sampled_from([1, 3])),
        seq=draw(st.integers(1, 6)),
        states={},
        outputs={},
        start_id=draw(START_IDS),
        digest=draw(DIGESTS),
        ended=draw(st.booleans()),
    )


@st.composite
def asks(draw: st.DrawFn) -> Ask:
    start = draw(st.booleans())
    numbered = start or draw(st.booleans())
    return Ask(
        session_id="s",
        seq=(1 if start else draw(st.integers(1, 8))) if numbered else None,
        start=start,
        end=draw(st.booleans()),
        start_id=draw(START_IDS),  # later steps name their start too (0: unchecked)
        digest=draw(DIGESTS),
    )


def applied(ask: Ask, verdict: Apply, epoch: int = 5) -> SessionRecord:
    """The record a committed Apply leaves."""
    base = verdict.base
    return SessionRecord(
        fingerprint=b"f" * 32,
        epoch=base.epoch if base else epoch,
        seq=verdict.seq,
        states={},
        outputs={},
        start_id=base.start_id if base else ask.start_id,
        digest=ask.digest,
        ended=ask.end,
    )


@given(asks(), st.none() | records())
def test_an_apply_moves_exactly_one_seq_on_from_what_it_expects(ask: Ask, record: SessionRecord | None):
    verdict = judge(ask, record.token if record else None, record, "m")
    if not isinstance(verdict, Apply):
        return
    if verdict.base is None:
        assert ask.start and verdict.seq == 1
        assert verdict.expected == (record.token if record else ABSENT)
        assert record is None or not ask.start_id or record.start_id != ask.start_id
    else:
        assert record is not None and not record.ended and verdict.base is record
        assert verdict.seq == record.seq + 1 and verdict.expected == record.token
        assert ask.seq in (None, record.seq + 1)


@given(asks(), st.none() | records())
def test_a_resend_of_an_applied_step_is_a_replay(ask: Ask, record: SessionRecord | None):
    """Unless the server numbered it, or it is a start without a start id: those are documented."""
    verdict = judge(ask, record.token if record else None, record, "m")
    if not isinstance(verdict, Apply):
        return
    after = applied(ask, verdict)
    again = judge(ask, after.token, after, "m")
    if ask.seq is None or (ask.start and not ask.start_id):
        assert not isinstance(again, Replay)
    else:
        assert isinstance(again, Replay) and again.record is after


@given(asks(), records())
def test_replays_need_the_same_seq_and_input(ask: Ask, record: SessionRecord):
    verdict = judge(ask, record.token, record, "m")
    if isinstance(verdict, Replay):
        assert ask.digest == record.digest
        assert (1 if ask.start else ask.seq) == record.seq
        assert not ask.start or (ask.start_id and ask.start_id == record.start_id)


@given(asks(), records())
def test_refusals_say_what_the_session_expects(ask: Ask, record: SessionRecord):
    verdict = judge(ask, record.token, record, "m")
    if isinstance(verdict, SeqOutOfOrder):
        assert verdict.expected_seq == record.seq + 1 and not record.ended
        if isinstance(verdict, NotARetry):
            assert ask.digest != record.digest
    if isinstance(verdict, SessionEnded):
        assert record.ended and f"ended at seq {record.seq}" in verdict.message
        # What to send instead: a resent start of the ended session needs a start_id of its own.
        assert ("new start_id" in verdict.message) == ask.start
    if isinstance(verdict, SeqOutOfOrder | SessionNotFound):
        assert "session 's'" in verdict.message  # the refusal names the session it is about
    if isinstance(verdict, SessionNotFound):
        assert "model 'm'" in verdict.message
    if record.ended and not ask.start and ask.start_id in (0, record.start_id):
        assert isinstance(verdict, Replay | SessionEnded)


@given(asks(), records())
def test_a_step_of_another_start_is_never_applied_nor_replayed(ask: Ask, record: SessionRecord):
    """A later step that names a start the store does not hold (restarted since, or its start lost in a
    failover) is refused, whatever its seq: it must not continue another start's state."""
    verdict = judge(ask, record.token, record, "m")
    if not ask.start and ask.start_id and ask.start_id != record.start_id:
        assert isinstance(verdict, AnotherStart) and verdict.code.name == "FAILED_PRECONDITION"
        assert "session 's' of model 'm'" in verdict.message and "start it again" in verdict.message
    else:
        assert not isinstance(verdict, AnotherStart)


@given(asks(), records())
def test_a_plain_next_step_is_what_judge_applies_on_the_record(ask: Ask, record: SessionRecord):
    """The step path applies a plain next step without judging it: `judge` must agree every time, and
    tell every other case apart."""
    verdict = judge(ask, record.token, record, "m")
    assert plain_next(ask, record) == (verdict == Apply(record.seq + 1, record, record.token))


@given(asks())
def test_without_a_record_only_a_start_applies(ask: Ask):
    verdict = judge(ask, None, None, "m")
    if ask.start:
        assert verdict == Apply(1, None, ABSENT)
    else:
        assert isinstance(verdict, SessionNotFound) and not isinstance(verdict, SessionEnded)
        assert "session 's' of model 'm'" in verdict.message and "start=true and seq=1" in verdict.message


@given(asks())
def test_a_corrupt_record_refuses_all_but_a_start(ask: Ask):
    corrupt = RecordCorrupt("does not parse")
    verdict = judge(ask, "t:1", corrupt, "m")
    assert verdict == Apply(1, None, "t:1") if ask.start else verdict is corrupt


def test_the_digest_tells_inputs_shapes_and_ends_apart():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    digests = {
        input_digest(x, False),
        input_digest(x, True),
        input_digest(x.reshape(3, 2), False),
        input_digest(x + 1, False),
        input_digest(x[:1], False),
    }
    assert len(digests) == 5
    assert input_digest(x.astype(np.float64), False) == input_digest(x, False)


def test_the_digest_of_an_input_never_changes():
    """Stored records carry it and every server version compares it: a replica of another release must
    recognise a resend (these values were computed by the first release with digests)."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert input_digest(x, False).hex() == "37a1b561941871a9e132dcf165ec8dad"
    assert input_digest(x, True).hex() == "55abf63587e15af9f9db01bc1a80dbf7"
    assert input_digest(np.asfortranarray(x), False).hex() == "37a1b561941871a9e132dcf165ec8dad"
