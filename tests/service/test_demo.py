"""`rnnserve demo` on embedded defaults: starts a server, streams held-out text, stops the server; and says
what is wrong, instead of a traceback, when it cannot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.process import ROOT, free_port
from service.demo import run_demo
from tests.conftest import SHIPPED_REPO


async def test_demo_streams_held_out_text_and_reports_latency(capsys):
    assert await run_demo(SHIPPED_REPO, target=None, steps=40, generate=30) == 0
    out = capsys.readouterr().out
    assert "embedded defaults, in-memory state" in out
    assert len(re.findall(r"^\s+\d+\s+\S+\s+\S+\s+.* ms$", out, re.M)) == 40
    accuracy, perplexity = re.search(r"accuracy ([\d.]+)%, perplexity ([\d.]+) over 40", out).groups()
    assert float(perplexity) < 20 and float(accuracy) > 20  # a trained model, not noise (84 characters)
    assert "session" in out and "ended at seq 70" in out


def demo(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "demo", "--steps", "5", "--generate", "3", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | (env or {}),
    )


def test_the_embedded_demo_ignores_the_environment():
    """With RNNSERVE_* variables of a production shell exported, the demo still runs on its own defaults."""
    done = demo("--model-repo", str(SHIPPED_REPO), env={"RNNSERVE_REDIS__URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 0, done.stderr
    assert "in-memory state" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope"], "the server has no model 'nope'; the demo streams text to one of: charlm-gru"),
        (["--model", "glucose-lstm"], "glucose-lstm is a forecast model; the demo streams text to a character"),
        (["--target", f"127.0.0.1:{free_port()}"], "no rnnserve answers at 127.0.0.1:"),
        (["--steps", "0"], "argument --steps: must be 1 or more, got 0"),
    ],
)
def test_what_the_demo_cannot_do_is_said_plainly(args, message):
    done = demo("--model-repo", str(SHIPPED_REPO), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_without_its_held_out_text_the_demo_says_where_it_looked(tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_REPO / "charlm-lstm", repo / "charlm-lstm")
    (repo / "charlm-lstm" / "heldout_sample.txt").unlink()
    done = demo("--model-repo", str(repo), cwd=tmp_path)
    assert done.returncode == 2
    assert "no held-out text for charlm-lstm" in done.stderr and "Traceback" not in done.stderr


def test_run_away_from_a_model_repository_the_demo_says_how_to_point_it_at_one(tmp_path):
    done = demo(cwd=tmp_path)  # the default --model-repo, models, is not there
    assert done.returncode == 2
    assert "model repository models is not a directory" in done.stderr and "--model-repo" in done.stderr
    assert "Traceback" not in done.stderr
