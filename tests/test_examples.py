"""The examples under examples/, run as a user would against `rnnserve serve` on the shipped models."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bench.process import ROOT, ServerProcess, free_port
from tests.conftest import SHIPPED_REPO


@pytest.fixture(scope="module")
def target(redis_proc, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("examples") / "server.log"
    server = ServerProcess.rnnserve(port, SHIPPED_REPO, f"redis://127.0.0.1:{redis_proc.port}/0", log=log)
    server.start()
    yield f"127.0.0.1:{port}"
    assert server.stop() == 0, log.read_text()


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_native_client(target):
    out = run("native_client.py", "--target", target, "--text", "Romeo")
    assert out.count("-> next") == 5
    assert "ended at seq 6" in out


def test_triton_stream(target):
    out = run("triton_stream.py", "--target", target, "--steps", "6")
    assert [line.split(":")[0] for line in out.splitlines()] == [f"step {n}" for n in range(1, 7)]


def test_gateway_with_many_sessions(target):
    out = run("gateway.py", "--target", target, "--sensors", "300", "--readings", "5")
    assert "300 sensors x 5 readings = 1500 steps" in out
    assert "forecasts received for 300 sensors" in out


def test_fan_in_gateway(target):
    out = run("fan_in_gateway.py", "--target", target, "--sensors", "1500", "--readings", "4", "--group", "600")
    assert "1500 sensors x 4 readings = 6000 steps" in out
    assert "3 groups of up to 600 sensors a message" in out
    assert "forecasts received for 1500 sensors, 0 steps refused" in out


def test_the_load_generator_runs_as_documented(target):
    """`rnnserve bench load` on its defaults (charlm-lstm, the newest version the server loads), fan-in."""
    done = subprocess.run(
        [sys.executable, "-m", "service", "bench", "load", "--target", target, "--sessions", "8", "--steps", "3"]
        + ["--streams", "2", "--per-message", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["steps"] == 8 * 3 and summary["errors"] == {}
