"""`rnnserve bench soak`, shortened: two replicas on one Redis, the streams moved between them every
"minute", and every session's stored seq checked against what the client saw acknowledged."""

from __future__ import annotations

from bench.soak import run
from tests.conftest import TEST_REPO


async def test_a_short_soak_moves_every_stream_and_finds_each_session_where_it_was_acknowledged():
    figures = await run(TEST_REPO, 2, 40, 4, 5.0, "charlm", None, minute_s=4)
    assert figures["sessions_not_matching_the_store"] == 0
    assert len(figures["minutes"]) == 2
    for minute in figures["minutes"]:
        assert minute["steps"] > 0.5 * 40 * 5.0 * 4  # open loop at 5 steps/s a session
    # Each applied step acknowledged at least once (a step in flight as its stream moves is resent: a replay).
    assert 0 < figures["steps_acknowledged"] <= sum(minute["steps"] for minute in figures["minutes"])
