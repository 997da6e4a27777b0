"""`rnnserve demo` on embedded defaults: starts a server, streams held-out text, stops the server."""

from __future__ import annotations

import re

from service.demo import run_demo
from tests.conftest import SHIPPED_REPO


async def test_demo_streams_held_out_text_and_reports_latency(capsys):
    assert await run_demo(SHIPPED_REPO, target=None, steps=40, generate=30) == 0
    out = capsys.readouterr().out
    assert "embedded defaults: in-memory state" in out
    assert len(re.findall(r"^\s+\d+\s+\S+\s+\S+\s+.* ms$", out, re.M)) == 40
    accuracy, perplexity = re.search(r"accuracy ([\d.]+)%, perplexity ([\d.]+) over 40", out).groups()
    assert float(perplexity) < 20 and float(accuracy) > 20  # a trained model, not noise (84 characters)
    assert "session" in out and "ended at seq 70" in out
