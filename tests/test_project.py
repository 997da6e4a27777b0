"""The repository's promises: generated stubs are fresh, CI runs the README's test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_committed_stubs_equal_a_fresh_generation():
    result = subprocess.run(
        [sys.executable, "protos/generate.py", "--check", "service/api/pb"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_service_imports_without_torch():
    code = "import sys, service.server, service.client, service.demo; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_serve_refuses_to_start_without_its_store_or_models(tmp_path):
    cases = [
        (["--model-repo", "models", "--redis-url", "redis://127.0.0.1:1/0"], "session store unreachable"),
        (["--model-repo", str(tmp_path)], "no servable model version"),
        (["--model-repo", "models", "--redis-url", "memcached://x"], "unsupported store URL scheme"),
    ]
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--port", "0", "--metrics-port", "0", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
