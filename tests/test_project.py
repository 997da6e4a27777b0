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
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make lint" in ci


def test_service_imports_without_torch():
    code = "import sys, service.server, service.client, service.demo; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_serve_refuses_to_start_without_models_or_with_a_store_it_cannot_use(tmp_path):
    """(A store that is merely unreachable is no reason not to start: the server starts unready; see
    tests/service/test_operations.py.)"""
    cases = [
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


def rnnserve(*args: str, code: str = "pass") -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter; `code` runs first (to make a package look missing)."""
    program = f"import sys; {code}; from service.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", program, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_command_line_says_what_it_needs():
    assert rnnserve("--log-level", "DEBUG", "train", "--help").returncode == 0
    missing = rnnserve("train", "--help", code="sys.modules['onnx'] = None")  # the train extra is absent
    assert missing.returncode == 2
    assert "needs the train extra (onnx is missing)" in missing.stderr and "Traceback" not in missing.stderr
    serve_help = rnnserve("serve", "--help")
    assert serve_help.returncode == 0
    for flag, variable in (
        ("--redis-url", "RNNSERVE_REDIS__URL"),
        ("--batching-max-batch-wait-us", "RNNSERVE_BATCHING__MAX_BATCH_WAIT_US"),
        ("--sessions-ended-ttl-s", "RNNSERVE_SESSIONS__ENDED_TTL_S"),
        ("--workers", "RNNSERVE_WORKERS"),
    ):
        assert flag in serve_help.stdout and variable in serve_help.stdout
    assert rnnserve("serve", "--log-level", "WARNING", "--port", "x").returncode == 2  # parsed, then refused
    optional = rnnserve("serve", "--workers", "abc")  # a flag that also takes "none"
    assert optional.returncode == 2 and "--workers: invalid int value: 'abc'" in optional.stderr, optional.stderr
    long_steps = rnnserve("bench", "--long-steps", "1000")
    assert long_steps.returncode != 0 and "at least 2000" in long_steps.stderr
    fan_in_triton = rnnserve(
        "bench", "load", "--target", "127.0.0.1:1", "--per-message", "4", "--protocol", "triton"
    )  # StreamBatch is native: refused, not silently measured on the native protocol
    assert fan_in_triton.returncode == 2 and "native protocol, ping-pong only" in fan_in_triton.stderr


def test_every_serve_setting_is_a_flag():
    from service.cli import _parser, settings_from

    args = _parser().parse_args(
        ["serve", "--metrics-port", "none", "--runtime-providers", "CUDAExecutionProvider,CPUExecutionProvider"]
        + ["--no-runtime-io-binding", "--sessions-ended-ttl-s", "5", "--redis-url", "redis://h:1/0"]
    )
    settings = settings_from(args)
    assert settings.metrics_port is None
    assert settings.runtime.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert (settings.runtime.io_binding, settings.sessions.ended_ttl_s, settings.redis.url) == (
        False,
        5.0,
        "redis://h:1/0",
    )
